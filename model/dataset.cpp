#include "model/dataset.hpp"

#include <sstream>
#include <stdexcept>

#include <filesystem>

namespace fedmoe::model {

namespace fs = std::filesystem;

Tokenizer load_tokenizer(const std::string& flag, const std::string& model_dir) {
  std::string path = flag;
  if (path.empty() && !model_dir.empty() && fs::exists(fs::path(model_dir) / "tokenizer.json"))
    path = (fs::path(model_dir) / "tokenizer.json").string();
  if (path.empty()) path = kDefaultTokenizerPath;
  if (!fs::exists(path)) throw DataError("tokenizer not found: " + path + " (pass --tokenizer PATH)");
  return Tokenizer::from_file(path);
}

TextEncoder encoder_for(const Tokenizer& tok) {
  TextEncoder enc;
  enc.encode = [&tok](std::string_view s) { return tok.encode(s); };
  enc.im_start = tok.token_to_id("<|im_start|>").value_or(-1);
  enc.im_end = tok.token_to_id("<|im_end|>").value_or(-1);
  enc.eos = tok.token_to_id("<|endoftext|>").value_or(-1);
  return enc;
}

std::vector<Example> load_examples(const std::vector<std::string>& paths) {
  std::vector<Example> out;
  for (const auto& p : paths) {
    if (!fs::exists(p)) throw DataError("data file not found: " + p);
    if (p.size() > 6 && p.substr(p.size() - 6) == ".jsonl") {
      auto ex = read_jsonl(p);
      out.insert(out.end(), ex.begin(), ex.end());
    } else {
      for (auto& d : read_documents(p)) out.push_back(Example{Example::Kind::text, std::move(d), {}, {}, {}});
    }
  }
  if (out.empty()) throw DataError("no examples in the data files");
  return out;
}

DataSplit prepare(const std::vector<Example>& examples, const Tokenizer& tok, size_t seq_len, double val_fraction,
                  uint64_t seed) {
  auto enc = encoder_for(tok);
  auto split = split_indices(examples.size(), val_fraction, seed);
  auto pack_of = [&](const std::vector<size_t>& idx) {
    std::vector<TokenizedExample> t;
    for (size_t i : idx) t.push_back(tokenize(examples[i], enc));
    return pack(t, seq_len, enc.eos >= 0 ? enc.eos : 0);
  };
  DataSplit d{pack_of(split.train), pack_of(split.validation)};
  if (d.train.empty()) throw DataError("the training data is empty after tokenization");
  return d;
}

std::vector<std::pair<std::string, std::vector<Example>>> load_domain_examples(const std::vector<std::string>& specs) {
  std::vector<std::pair<std::string, std::vector<Example>>> out;
  for (const auto& spec : specs) {
    const auto eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size())
      throw std::invalid_argument("'" + spec + "': expected EXPERT=FILE[,FILE...]");
    std::vector<std::string> files;
    std::stringstream list(spec.substr(eq + 1));
    for (std::string f; std::getline(list, f, ',');)
      if (!f.empty()) files.push_back(f);
    out.emplace_back(spec.substr(0, eq), load_examples(files));
  }
  return out;
}

}  // namespace fedmoe::model
