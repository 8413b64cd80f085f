// Byte-level BPE tokenizer that reproduces Hugging Face `tokenizers` ids exactly for the Qwen2 /
// Qwen2.5 / Qwen3 tokenizer.json (NFC normalizer, Split on the Qwen pre-tokenizer regex, ByteLevel,
// BPE by merge rank, added tokens matched first). The reference is the Rust implementation (the
// `tokenizers` npm binding); tests/tokenizer/golden.mjs checks it, and tests/test_tokenizer.cpp
// compares this encoder with it line by line.
//
// Where the reference has version-bound behaviour, this one copies it on purpose (see
// tokenizer.cpp): NFC with Unicode 9.0 data (HF's unicode-normalization-alignments crate), \p{L} and
// \p{N} as Unicode 16.0 (HF's Oniguruma), whatever ICU version is installed.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fedmoe::model {

// One entry of tokenizer.json's "added_tokens": matched in the text before anything else.
struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;      // decode(..., skip_special_tokens=true) drops it
  bool lstrip = false;       // the match swallows the whitespace on its left
  bool rstrip = false;       // ... and on its right
  bool normalized = false;   // matched in the NFC-normalized text instead of the raw text
  bool single_word = false;  // only matched when not glued to a word character on either side
};

class Tokenizer {
 public:
  // Loads a Hugging Face tokenizer.json. Throws std::runtime_error naming the file for I/O and JSON
  // errors, and naming the field for configurations this implementation does not reproduce.
  static Tokenizer from_file(const std::string& path);
  // Same, from the JSON text; `origin` names the source in error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& origin);

  // HF's encode(text, add_special_tokens=false). Invalid UTF-8 is first replaced with U+FFFD per
  // maximal invalid subsequence (WHATWG / Rust from_utf8_lossy), i.e. the string a JavaScript or
  // Python caller holding the same bytes would pass to HF. Thread-safe.
  std::vector<int32_t> encode(std::string_view text) const;

  // HF's decode: ByteLevel decoding, invalid UTF-8 in the result replaced by U+FFFD. Like HF, ids
  // that name no token are skipped. Thread-safe.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // One past the largest id (base vocabulary and added tokens).
  int32_t vocab_size() const;
  // Token strings in HF's form (byte-level characters for the base vocabulary, e.g. "Ġthe"; the
  // content for added tokens). Added tokens take precedence, as in HF.
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  // Shared and immutable apart from an internal, locked word cache: copies are cheap.
  std::shared_ptr<const Impl> impl_;
};

// NFC exactly as the tokenizer applies it (Unicode 9.0 data, like HF), after sanitize_utf8: the
// text decode(encode(text)) returns when no added token strips whitespace.
std::string normalize_nfc(std::string_view text);

// Replaces each maximal invalid UTF-8 subsequence with U+FFFD (Rust's String::from_utf8_lossy,
// the WHATWG TextDecoder).
std::string sanitize_utf8(std::string_view bytes);

}  // namespace fedmoe::model
