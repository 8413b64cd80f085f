// Byte-level BPE as Hugging Face `tokenizers` (Rust, 0.23) runs it for Qwen2/Qwen3 tokenizer.json:
//
//   text -> added tokens matched on the raw text -> NFC per remaining segment -> added tokens
//   marked `normalized` matched in it -> Split on the Qwen regex (Isolated) -> each piece's bytes as
//   GPT-2 byte-level characters -> BPE by merge rank -> ids
//
// The regex is not run through a regex engine: a hand-written scanner over code points implements
// exactly the leftmost-first, backtracking semantics of HF's Oniguruma for this one pattern (see
// next_piece), which is both faster and free of engine differences.
//
// Two places copy the reference's Unicode versions rather than the installed ICU's, because HF's
// ids depend on them (measured with the `tokenizers` 0.23.2 npm binding):
//  - NFC: HF normalizes with the unicode-normalization-alignments crate, whose tables are Unicode
//    9.0: combining marks added later have combining class 0 there and are never reordered or
//    composed. ICU's FilteredNormalizer2 over [:age=9.0:] gives exactly that.
//  - \p{L} / \p{N}: HF's Oniguruma has Unicode 16.0 properties; Debian 12's ICU 72 has 15.0. The
//    Unicode 15.1/16.0 letters and numbers are listed below, and anything newer than 16.0 that a
//    later ICU knows counts as unassigned, as it does for Oniguruma.
#include "model/tokenizer.hpp"
#include "model/utf8.hpp"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>
#include <unicode/bytestream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include <nlohmann/json.hpp>

namespace fedmoe::model {

using json = nlohmann::json;

namespace {

// The pre-tokenizer pattern of Qwen2, Qwen2.5 and Qwen3 (tokenizer.json spells it with \r, \n).
constexpr std::string_view kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------
// UTF-8

// Length of the well-formed sequence at s[i] (> 0), or minus the length of the maximal invalid
// subsequence there (< 0): the unit Rust's from_utf8_lossy and WHATWG's TextDecoder replace by one
// U+FFFD (Unicode 15, table 3-7 and "U+FFFD Substitution of Maximal Subparts").
int utf8_step(std::string_view s, size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  int need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;       // no overlong forms
    else if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;       // no overlong forms
    else if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return -1;
  }
  for (int k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return -k;
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < lo || b > hi) return -k;
    lo = 0x80;
    hi = 0xBF;
  }
  return need + 1;
}

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const int step = utf8_step(s, i);
    if (step < 0) return false;
    i += step;
  }
  return true;
}

// Decodes the (valid) sequence at s[i] and advances i.
char32_t next_code_point(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  const auto cont = [&](size_t k) { return static_cast<char32_t>(static_cast<unsigned char>(s[i + k]) & 0x3F); };
  char32_t c;
  if (b0 < 0xE0) {
    c = (char32_t(b0 & 0x1F) << 6) | cont(1);
    i += 2;
  } else if (b0 < 0xF0) {
    c = (char32_t(b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2);
    i += 3;
  } else {
    c = (char32_t(b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
    i += 4;
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100.. in byte order, so every byte is one visible character.

struct ByteLevel {
  std::array<char32_t, 256> byte_to_char{};
  std::array<int16_t, 0x144> char_to_byte{};  // -1 for characters outside the alphabet

  ByteLevel() {
    char_to_byte.fill(-1);
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      byte_to_char[b] = printable ? char32_t(b) : next++;
      char_to_byte[byte_to_char[b]] = static_cast<int16_t>(b);
    }
  }

  // The byte a character stands for, or -1.
  int byte_of(char32_t c) const { return c < char_to_byte.size() ? char_to_byte[c] : -1; }

  std::string encode(std::string_view bytes) const {
    std::string out;
    for (unsigned char b : bytes) append_utf8(out, byte_to_char[b]);
    return out;
  }
};

const ByteLevel& byte_level() {
  static const ByteLevel table;
  return table;
}

// ---------------------------------------------------------------------------------------------
// Character classes of the pre-tokenizer regex: \p{L}, \p{N}, \s (Unicode White_Space, which is
// what Oniguruma's \s is for UTF-8) and everything else.

enum CharClass : uint8_t { kOther, kLetter, kNumber, kSpace };

// Letters and numbers assigned in Unicode 15.1 and 16.0, which HF's Oniguruma knows and ICU 72
// does not. Found by letting the `tokenizers` binding's own split classify every code point whose
// class differs between ICU 72 and Node's ICU 78; with this table, the ids of all code points of
// planes 0-3 in nine contexts each equal the binding's.
struct ClassRange {
  char32_t first, last;
  CharClass cls;
};
constexpr ClassRange kUnicode16Additions[] = {
    {0x1C89, 0x1C8A, kLetter},   {0xA7CB, 0xA7CD, kLetter},   {0xA7DA, 0xA7DC, kLetter},
    {0x105C0, 0x105F3, kLetter}, {0x10D40, 0x10D49, kNumber}, {0x10D4A, 0x10D65, kLetter},
    {0x10D6F, 0x10D85, kLetter}, {0x10EC2, 0x10EC4, kLetter}, {0x11380, 0x11389, kLetter},
    {0x1138B, 0x1138B, kLetter}, {0x1138E, 0x1138E, kLetter}, {0x11390, 0x113B5, kLetter},
    {0x113B7, 0x113B7, kLetter}, {0x113D1, 0x113D1, kLetter}, {0x113D3, 0x113D3, kLetter},
    {0x116D0, 0x116E3, kNumber}, {0x11BC0, 0x11BE0, kLetter}, {0x11BF0, 0x11BF9, kNumber},
    {0x13460, 0x143FA, kLetter}, {0x16100, 0x1611D, kLetter}, {0x16130, 0x16139, kNumber},
    {0x16D40, 0x16D6C, kLetter}, {0x16D70, 0x16D79, kNumber}, {0x18CFF, 0x18CFF, kLetter},
    {0x1CCF0, 0x1CCF9, kNumber}, {0x1E5D0, 0x1E5ED, kLetter}, {0x1E5F0, 0x1E5F0, kLetter},
    {0x1E5F1, 0x1E5FA, kNumber}, {0x2EBF0, 0x2EE5D, kLetter},
};

// One byte per code point (1.1 MB), built once: the scanner's hot loop is a table load.
const std::vector<uint8_t>& class_table() {
  static const std::vector<uint8_t> table = [] {
    std::vector<uint8_t> t(0x110000, kOther);
    const UVersionInfo unicode16 = {16, 0, 0, 0};
    for (UChar32 c = 0; c < 0x110000; ++c) {
      UVersionInfo age;
      u_charAge(c, age);
      if (std::memcmp(age, unicode16, sizeof(UVersionInfo)) > 0) continue;  // unknown to Oniguruma
      const uint32_t mask = U_MASK(u_charType(c));
      if (mask & U_GC_L_MASK) t[c] = kLetter;
      else if (mask & U_GC_N_MASK) t[c] = kNumber;
      else if (u_isUWhiteSpace(c)) t[c] = kSpace;
    }
    for (const auto& r : kUnicode16Additions)
      for (char32_t c = r.first; c <= r.last; ++c) t[c] = r.cls;
    return t;
  }();
  return table;
}

// \w and \s of Rust's regex crate, which HF uses for the added tokens' single_word / lstrip /
// rstrip checks (not Oniguruma).
bool is_rust_word_char(char32_t c) {
  return u_hasBinaryProperty(c, UCHAR_ALPHABETIC) || u_hasBinaryProperty(c, UCHAR_JOIN_CONTROL) ||
         (U_MASK(u_charType(c)) & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK));
}
bool is_rust_space(char32_t c) { return u_isUWhiteSpace(c); }

// ---------------------------------------------------------------------------------------------
// NFC with Unicode 9.0 data (see the file comment).

struct Nfc {
  icu::UnicodeSet unicode9;
  std::unique_ptr<icu::FilteredNormalizer2> normalizer;

  Nfc() {
    UErrorCode err = U_ZERO_ERROR;
    unicode9.applyPattern(icu::UnicodeString("[:age=9.0:]", -1, US_INV), err);  // assigned by 9.0
    unicode9.freeze();
    const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
    if (U_FAILURE(err)) throw std::runtime_error(std::string("ICU NFC normalizer: ") + u_errorName(err));
    normalizer = std::make_unique<icu::FilteredNormalizer2>(*nfc, unicode9);
  }
};

const Nfc& nfc() {
  static const Nfc instance;
  return instance;
}

// NFC of valid UTF-8. Everything below U+0300 is stable under NFC, so text without a byte >= 0xCC
// (the first lead byte of U+0300) is returned as is: ASCII and Latin-1 text never reaches ICU.
std::string_view nfc_view(std::string_view text, std::string& buffer) {
  bool simple = true;
  for (unsigned char b : text)
    if (b >= 0xCC) {
      simple = false;
      break;
    }
  if (simple) return text;
  buffer.clear();
  icu::StringByteSink<std::string> sink(&buffer, static_cast<int32_t>(text.size()));
  UErrorCode err = U_ZERO_ERROR;
  nfc().normalizer->normalizeUTF8(0, icu::StringPiece(text.data(), static_cast<int32_t>(text.size())), sink,
                                  nullptr, err);
  if (U_FAILURE(err)) throw std::runtime_error(std::string("NFC normalization failed: ") + u_errorName(err));
  return buffer;
}

// ---------------------------------------------------------------------------------------------
// The Qwen split: returns the end of the piece that starts at code point i. Alternatives in the
// regex's order; each comment shows the alternative and how backtracking resolves it.

struct CodePoints {
  std::vector<char32_t> cp;
  std::vector<uint8_t> cls;
  std::vector<uint32_t> offset;  // byte offset of each code point, plus the end

  void assign(std::string_view s) {
    const auto& table = class_table();
    cp.clear();
    cls.clear();
    offset.clear();
    size_t i = 0;
    while (i < s.size()) {
      offset.push_back(static_cast<uint32_t>(i));
      const char32_t c = next_code_point(s, i);
      cp.push_back(c);
      cls.push_back(table[c]);
    }
    offset.push_back(static_cast<uint32_t>(s.size()));
  }
};

bool is_cr_lf(char32_t c) { return c == '\r' || c == '\n'; }

// Case-insensitive match of the contraction letters: Oniguruma folds 'ſ' (U+017F) to 's' too.
char32_t fold_contraction_letter(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + ('a' - 'A');
  if (c == 0x17F) return 's';
  return c;
}

size_t next_piece(const CodePoints& t, size_t i) {
  const size_t n = t.cp.size();
  const auto& cp = t.cp;
  const auto& cls = t.cls;
  const char32_t c = cp[i];

  // (?i:'s|'t|'re|'ve|'m|'ll|'d)
  if (c == '\'' && i + 1 < n) {
    const char32_t a = fold_contraction_letter(cp[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      const char32_t b = fold_contraction_letter(cp[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+ : the optional character is taken only if a letter follows it.
  {
    size_t k = i;
    if (cls[i] != kLetter && cls[i] != kNumber && !is_cr_lf(c) && i + 1 < n && cls[i + 1] == kLetter) ++k;
    if (cls[k] == kLetter) {
      while (k < n && cls[k] == kLetter) ++k;
      return k;
    }
  }
  // \p{N} : one digit at a time.
  if (cls[i] == kNumber) return i + 1;
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*' : the space is taken only if a symbol follows it.
  {
    size_t k = (c == ' ' && i + 1 < n && cls[i + 1] == kOther) ? i + 1 : i;
    if (cls[k] == kOther) {
      while (k < n && cls[k] == kOther) ++k;
      while (k < n && is_cr_lf(cp[k])) ++k;
      return k;
    }
  }
  // Only whitespace is left. \s*[\r\n]+ : \s* backtracks from the end of the run to its last line
  // break, so the piece ends right after that line break.
  size_t end = i;
  size_t last_break = n;
  while (end < n && cls[end] == kSpace) {
    if (is_cr_lf(cp[end])) last_break = end;
    ++end;
  }
  if (last_break != n) return last_break + 1;
  // \s+(?!\S) : the whole run at the end of the text; otherwise the run minus its last character,
  // which then joins the next piece (" word"), if that leaves anything.
  if (end == n) return end;
  if (end - i >= 2) return end - 1;
  // \s+ : a single space before a non-space.
  return i + 1;
}

// ---------------------------------------------------------------------------------------------
// Added tokens: leftmost-longest matching like HF's Aho-Corasick (MatchKind::LeftmostLongest),
// then HF's single_word / lstrip / rstrip rules (AddedVocabulary::find_matches).

class AddedTokenMatcher {
 public:
  struct Split {
    size_t begin, end;
    int32_t id;  // -1: text between added tokens
  };

  void add(const AddedToken& token, std::string pattern) {
    if (pattern.empty()) return;  // HF never matches an empty token
    first_byte_[static_cast<unsigned char>(pattern[0])] = true;
    int node = 0;
    for (unsigned char b : pattern) {
      auto it = std::find_if(nodes_[node].children.begin(), nodes_[node].children.end(),
                             [&](const auto& e) { return e.first == b; });
      if (it != nodes_[node].children.end()) {
        node = it->second;
      } else {
        nodes_.emplace_back();
        nodes_[node].children.emplace_back(b, static_cast<int>(nodes_.size() - 1));
        node = static_cast<int>(nodes_.size() - 1);
      }
    }
    // A second token with the same pattern wins, as HF's add_tokens replaces the earlier one.
    nodes_[node].token = static_cast<int>(tokens_.size());
    tokens_.push_back(token);
  }

  bool empty() const { return tokens_.empty(); }

  // Cuts `text` into text segments and added-token matches covering it.
  void split(std::string_view text, std::vector<Split>& out) const {
    out.clear();
    size_t done = 0;  // HF's start_offset: end of the last emitted split
    size_t pos = 0;
    while (pos < text.size()) {
      if (!first_byte_[static_cast<unsigned char>(text[pos])]) {
        ++pos;
        continue;
      }
      int node = 0, token = -1;
      size_t length = 0;
      for (size_t k = pos; k < text.size(); ++k) {
        const auto b = static_cast<unsigned char>(text[k]);
        const auto& ch = nodes_[node].children;
        auto it = std::find_if(ch.begin(), ch.end(), [&](const auto& e) { return e.first == b; });
        if (it == ch.end()) break;
        node = it->second;
        if (nodes_[node].token >= 0) {
          token = nodes_[node].token;
          length = k + 1 - pos;
        }
      }
      if (token < 0) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + length;
      pos = stop;  // the next match starts after this one, even if this one is discarded
      const AddedToken& t = tokens_[token];
      if (t.single_word && !(is_word_boundary_before(text, start) && is_word_boundary_after(text, stop)))
        continue;
      if (t.lstrip) start = std::max(start_of_trailing_space(text.substr(0, start)), done);
      if (t.rstrip) stop += length_of_leading_space(text.substr(stop));
      if (done < start) out.push_back({done, start, -1});
      out.push_back({start, stop, t.id});
      done = stop;
    }
    if (done != text.size()) out.push_back({done, text.size(), -1});
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int>> children;
    int token = -1;
  };

  static bool is_word_boundary_before(std::string_view text, size_t at) {
    if (at == 0) return true;
    size_t i = at - 1;  // back to the start of the previous character
    while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
    return !is_rust_word_char(next_code_point(text, i));
  }
  static bool is_word_boundary_after(std::string_view text, size_t at) {
    if (at == text.size()) return true;
    return !is_rust_word_char(next_code_point(text, at));
  }
  static size_t start_of_trailing_space(std::string_view text) {
    size_t start = text.size();
    while (start > 0) {
      size_t i = start - 1;
      while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
      size_t j = i;
      if (!is_rust_space(next_code_point(text, j))) break;
      start = i;
    }
    return start;
  }
  static size_t length_of_leading_space(std::string_view text) {
    size_t i = 0;
    while (i < text.size()) {
      size_t j = i;
      if (!is_rust_space(next_code_point(text, j))) break;
      i = j;
    }
    return i;
  }

  std::vector<Node> nodes_{1};
  std::vector<AddedToken> tokens_;
  std::array<bool, 256> first_byte_{};
};

// ---------------------------------------------------------------------------------------------
// Merge table: (left id, right id) -> (rank, merged id), open addressing on one 64-bit key. It is
// probed for every adjacent pair of every word, which makes it the encoder's hottest structure.

class MergeTable {
 public:
  struct Merge {
    uint32_t rank;
    int32_t id;
  };

  explicit MergeTable(size_t count = 0) {
    size_t capacity = 16;
    while (capacity < count * 2) capacity *= 2;
    slots_.assign(capacity, Slot{kEmpty, {0, 0}});
    mask_ = capacity - 1;
  }

  // A pair listed twice keeps its last rank, as HF's HashMap collect does.
  void set(int32_t left, int32_t right, Merge merge) {
    const uint64_t key = make_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty || slots_[i].key == key) {
        slots_[i] = {key, merge};
        return;
      }
    }
  }

  const Merge* find(int32_t left, int32_t right) const {
    const uint64_t key = make_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].merge;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // ids are non-negative int32: never a key
  struct Slot {
    uint64_t key;
    Merge merge;
  };
  static uint64_t make_key(int32_t left, int32_t right) {
    return (uint64_t(uint32_t(left)) << 32) | uint32_t(right);
  }
  size_t hash(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> 29) & mask_; }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// Transparent hashing so string_view lookups need no temporary std::string.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  // Base vocabulary and added tokens by id, in HF's token form.
  struct IdEntry {
    std::string token;
    bool present = false;
    bool special = false;
  };
  std::vector<IdEntry> by_id;
  StringIdMap vocab;         // base vocabulary, HF token form
  StringIdMap added_by_content;
  std::vector<AddedToken> added;

  bool nfc = false;
  AddedTokenMatcher raw_tokens;         // added tokens with normalized=false
  AddedTokenMatcher normalized_tokens;  // normalized=true, matched against their NFC form

  MergeTable merges;
  // What each byte's byte-level character starts a word as: its vocab id or, when the vocabulary
  // lacks it, byte_fallback's <0xXX> ids or the unknown token (HF's BPE::merge_word).
  std::array<std::vector<int32_t>, 256> byte_symbols;
  std::array<bool, 256> byte_in_vocab{};
  int32_t unk_id = -1;  // none
  bool fuse_unk = false;
  bool ignore_merges = false;

  // Words seen before, as HF's BPE cache: a hit costs a quarter of merging the word again (merge
  // table probes miss the CPU caches). Sharded by hash so threads encoding in parallel rarely wait
  // on the same lock; each shard is bounded and cleared when full.
  struct CacheShard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> words;
  };
  static constexpr size_t kCacheShards = 16;
  static constexpr size_t kCacheShardCapacity = 4096;
  static constexpr size_t kCacheMaxWord = 256;
  mutable std::array<CacheShard, kCacheShards> cache;

  void encode_segment(std::string_view text, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::encode_segment(std::string_view text, std::vector<int32_t>& out) const {
  thread_local CodePoints points;
  points.assign(text);
  const size_t n = points.cp.size();
  for (size_t i = 0; i < n;) {
    const size_t j = next_piece(points, i);
    encode_word(text.substr(points.offset[i], points.offset[j] - points.offset[i]), out);
    i = j;
  }
}

void Tokenizer::Impl::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1 && byte_in_vocab[static_cast<unsigned char>(word[0])]) {
    out.push_back(byte_symbols[static_cast<unsigned char>(word[0])][0]);  // nothing to merge
    return;
  }
  if (ignore_merges) {
    auto it = vocab.find(byte_level().encode(word));
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() > kCacheMaxWord) {
    merge_word(word, out);
    return;
  }
  // The shard from a cheap mix of length and end bytes: the map hashes the whole word anyway.
  const auto mix = (word.size() * 0x9E3779B1u) ^ (static_cast<unsigned char>(word.front()) * 0x85EBCA77u) ^
                   (static_cast<unsigned char>(word.back()) * 0xC2B2AE3Du);
  CacheShard& shard = cache[(mix >> 7) % kCacheShards];
  {
    std::lock_guard lock(shard.mutex);
    auto it = shard.words.find(word);
    if (it != shard.words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = out.size();
  merge_word(word, out);
  std::lock_guard lock(shard.mutex);
  if (shard.words.size() >= kCacheShardCapacity) shard.words.clear();
  shard.words.emplace(std::string(word), std::vector<int32_t>(out.begin() + before, out.end()));
}

// HF's Word::merge_all: a min-heap of (rank, position) over adjacent pairs; popping the lowest
// rank (leftmost among equals) and merging it, then queueing the pairs the merged symbol forms with
// its neighbours. Stale entries are recognised because the pair at their position no longer merges
// into their id. O(n log n) in the word length.
void Tokenizer::Impl::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // linked list over the live symbols; -1 at the ends
    bool alive;
  };
  struct Candidate {
    uint32_t rank;
    uint32_t pos;
    int32_t id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Symbol> symbols;
  thread_local std::vector<Candidate> heap;
  symbols.clear();
  heap.clear();

  const auto add = [&](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, true});
  };
  // HF's BPE::merge_word: a character in the vocabulary flushes a pending unknown token; byte
  // fallback ids do not; unknown characters become the unknown token (runs of them fused with
  // fuse_unk) or, without one, vanish.
  int32_t pending_unk = -1;
  for (unsigned char b : word) {
    if (byte_in_vocab[b]) {
      if (pending_unk >= 0) add(pending_unk);
      pending_unk = -1;
      add(byte_symbols[b][0]);
      continue;
    }
    if (!byte_symbols[b].empty()) {
      for (int32_t id : byte_symbols[b]) add(id);
      continue;
    }
    if (unk_id < 0) continue;
    if (pending_unk >= 0 && fuse_unk) continue;
    if (pending_unk >= 0) add(pending_unk);
    pending_unk = unk_id;
  }
  if (pending_unk >= 0) add(pending_unk);

  const auto push = [&](int32_t pos) {
    const Symbol& left = symbols[pos];
    if (left.next < 0) return;
    if (const auto* m = merges.find(left.id, symbols[left.next].id)) {
      heap.push_back({m->rank, static_cast<uint32_t>(pos), m->id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const auto* m = merges.find(symbols[i].id, symbols[i + 1].id))
      heap.push_back({m->rank, static_cast<uint32_t>(i), m->id});
  }
  std::make_heap(heap.begin(), heap.end(), std::greater<>{});

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    const auto* m = merges.find(left.id, right.id);
    if (!m || m->id != top.id) continue;  // stale: the pair here changed since it was queued
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = static_cast<int32_t>(top.pos);
    if (left.prev >= 0) push(left.prev);
    push(static_cast<int32_t>(top.pos));
  }
  for (const Symbol& s : symbols)
    if (s.alive) out.push_back(s.id);
}

// ---------------------------------------------------------------------------------------------

std::string sanitize_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const int step = utf8_step(bytes, i);
    if (step > 0) {
      out.append(bytes.substr(i, step));
      i += step;
    } else {
      out += "\xEF\xBF\xBD";
      i += -step;
    }
  }
  return out;
}

std::string normalize_nfc(std::string_view text) {
  const std::string valid = is_valid_utf8(text) ? std::string(text) : sanitize_utf8(text);
  std::string buffer;
  return std::string(nfc_view(valid, buffer));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  const Impl& m = *impl_;
  std::string sanitized;
  if (!is_valid_utf8(text)) {
    sanitized = sanitize_utf8(text);
    text = sanitized;
  }
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  // Reused between calls on the same thread: encode is called once per line in bulk tokenization.
  thread_local std::vector<AddedTokenMatcher::Split> raw_splits, normalized_splits;
  thread_local std::string normalized_buffer;
  m.raw_tokens.split(text, raw_splits);
  for (const auto& split : raw_splits) {
    if (split.id >= 0) {
      out.push_back(split.id);
      continue;
    }
    std::string_view segment = text.substr(split.begin, split.end - split.begin);
    if (m.nfc) segment = nfc_view(segment, normalized_buffer);
    if (m.normalized_tokens.empty()) {
      m.encode_segment(segment, out);
      continue;
    }
    m.normalized_tokens.split(segment, normalized_splits);
    for (const auto& sub : normalized_splits) {
      if (sub.id >= 0) out.push_back(sub.id);
      else m.encode_segment(segment.substr(sub.begin, sub.end - sub.begin), out);
    }
  }
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  const ByteLevel& bl = byte_level();
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= m.by_id.size() || !m.by_id[id].present) continue;
    const Impl::IdEntry& entry = m.by_id[id];
    if (skip_special_tokens && entry.special) continue;
    // HF's ByteLevel decoder: a token made only of byte-level characters stands for those bytes;
    // any other token (an added token with a space, say) for its own UTF-8.
    const size_t start = bytes.size();
    const std::string_view token = entry.token;
    for (size_t i = 0; i < token.size();) {
      const int b = bl.byte_of(next_code_point(token, i));
      if (b < 0) {
        bytes.resize(start);
        bytes.append(token);
        break;
      }
      bytes += static_cast<char>(b);
    }
  }
  return is_valid_utf8(bytes) ? bytes : sanitize_utf8(bytes);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->by_id.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->by_id.size() || !impl_->by_id[id].present) return std::nullopt;
  return impl_->by_id[id].token;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

// ---------------------------------------------------------------------------------------------
// Loading tokenizer.json

namespace {

// Typed access to the JSON that names the offending field in every error. HF treats an absent
// member and null alike, and so does this.
struct ConfigReader {
  std::string origin;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw std::runtime_error("tokenizer " + origin + ": " + field + ": " + what);
  }
  const json* member(const json& object, const char* key) const {
    auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }
  const json& require(const json& object, const char* key, const std::string& field, json::value_t type) const {
    const json* value = member(object, key);
    if (!value) fail(field, "missing");
    if (value->type() != type && !(type == json::value_t::number_integer && value->is_number_integer()))
      fail(field, std::string("expected ") + json(type).type_name() + ", found " + value->type_name());
    return *value;
  }
  std::string string_of(const json& object, const char* key, const std::string& field) const {
    return require(object, key, field, json::value_t::string).get<std::string>();
  }
  bool bool_or(const json& object, const char* key, const std::string& field, bool fallback) const {
    const json* value = member(object, key);
    if (!value) return fallback;
    if (!value->is_boolean()) fail(field, std::string("expected boolean, found ") + value->type_name());
    return value->get<bool>();
  }
  int32_t id_of(const json& value, const std::string& field) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > INT32_MAX)
      fail(field, "expected a token id (integer in [0, 2^31)), found " + value.dump());
    return static_cast<int32_t>(value.get<int64_t>());
  }
  void expect_string(const json& object, const char* key, const std::string& field, std::string_view wanted) const {
    const std::string value = string_of(object, key, field);
    if (value != wanted) fail(field, "\"" + value + "\" is not supported (only \"" + std::string(wanted) + "\")");
  }
  void expect_bool(const json& object, const char* key, const std::string& field, bool fallback, bool wanted) const {
    if (bool_or(object, key, field, fallback) != wanted)
      fail(field, std::string("only ") + (wanted ? "true" : "false") + " is supported");
  }
};

// Normalizer: NFC or none.
bool read_normalizer(const ConfigReader& r, const json& root) {
  const json* normalizer = r.member(root, "normalizer");
  if (!normalizer) return false;
  r.expect_string(*normalizer, "type", "normalizer.type", "NFC");
  return true;
}

// Pre-tokenizer: exactly Qwen's Sequence[Split(regex, Isolated), ByteLevel without its own regex].
void read_pre_tokenizer(const ConfigReader& r, const json& root) {
  const json& pre = r.require(root, "pre_tokenizer", "pre_tokenizer", json::value_t::object);
  r.expect_string(pre, "type", "pre_tokenizer.type", "Sequence");
  const json& steps = r.require(pre, "pretokenizers", "pre_tokenizer.pretokenizers", json::value_t::array);
  if (steps.size() != 2 || !steps[0].is_object() || !steps[1].is_object())
    r.fail("pre_tokenizer.pretokenizers", "only [Split, ByteLevel] is supported");
  const std::string split = "pre_tokenizer.pretokenizers[0].";
  r.expect_string(steps[0], "type", split + "type", "Split");
  const json& pattern = r.require(steps[0], "pattern", split + "pattern", json::value_t::object);
  const json* regex = r.member(pattern, "Regex");
  if (!regex || !regex->is_string() || regex->get<std::string>() != kQwenPattern)
    r.fail(split + "pattern.Regex", "only the Qwen2 pattern " + std::string(kQwenPattern) + " is supported");
  r.expect_string(steps[0], "behavior", split + "behavior", "Isolated");
  r.expect_bool(steps[0], "invert", split + "invert", false, false);
  const std::string bl = "pre_tokenizer.pretokenizers[1].";
  r.expect_string(steps[1], "type", bl + "type", "ByteLevel");
  // HF's defaults for these two are true; trim_offsets only changes offsets, which encode() lacks.
  r.expect_bool(steps[1], "add_prefix_space", bl + "add_prefix_space", true, false);
  r.expect_bool(steps[1], "use_regex", bl + "use_regex", true, false);
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("tokenizer " + path + ": cannot open file");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw std::runtime_error("tokenizer " + path + ": read error");
  return from_json(text.str(), path);
}

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& origin) {
  const ConfigReader r{origin};
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw std::runtime_error("tokenizer " + origin + ": invalid JSON: " + e.what());
  }
  if (!root.is_object()) r.fail("(top level)", "expected an object");

  // encode() is HF's encode(add_special_tokens=false) on one sequence: the post-processor adds
  // nothing then, so it is not read. Truncation and padding would change the ids: refused.
  for (const char* key : {"truncation", "padding"})
    if (r.member(root, key)) r.fail(key, "only null is supported");

  auto impl = std::make_shared<Impl>();
  impl->nfc = read_normalizer(r, root);
  read_pre_tokenizer(r, root);
  const json& decoder = r.require(root, "decoder", "decoder", json::value_t::object);
  r.expect_string(decoder, "type", "decoder.type", "ByteLevel");

  // --- model
  const json& model = r.require(root, "model", "model", json::value_t::object);
  r.expect_string(model, "type", "model.type", "BPE");
  if (const json* dropout = r.member(model, "dropout"); dropout && !(dropout->is_number() && dropout->get<double>() == 0))
    r.fail("model.dropout", "BPE dropout is random; only null or 0 is supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* affix = r.member(model, key); affix && !(affix->is_string() && affix->get<std::string>().empty()))
      r.fail(std::string("model.") + key, "only null or \"\" is supported");
  impl->fuse_unk = r.bool_or(model, "fuse_unk", "model.fuse_unk", false);
  impl->ignore_merges = r.bool_or(model, "ignore_merges", "model.ignore_merges", false);
  const bool byte_fallback = r.bool_or(model, "byte_fallback", "model.byte_fallback", false);

  const json& vocab = r.require(model, "vocab", "model.vocab", json::value_t::object);
  impl->vocab.reserve(vocab.size());
  int32_t max_id = -1;
  for (const auto& [token, value] : vocab.items()) {
    const int32_t id = r.id_of(value, "model.vocab[\"" + token + "\"]");
    impl->vocab.emplace(token, id);
    max_id = std::max(max_id, id);
  }
  std::vector<AddedToken> added;
  int32_t max_added = -1;
  if (const json* list = r.member(root, "added_tokens")) {
    if (!list->is_array()) r.fail("added_tokens", "expected array");
    for (size_t i = 0; i < list->size(); ++i) {
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      const json& entry = (*list)[i];
      if (!entry.is_object()) r.fail(field, "expected object");
      AddedToken t;
      t.id = r.id_of(r.require(entry, "id", field + ".id", json::value_t::number_integer), field + ".id");
      t.content = r.string_of(entry, "content", field + ".content");
      if (t.content.empty()) r.fail(field + ".content", "empty");
      t.special = r.bool_or(entry, "special", field + ".special", false);
      t.lstrip = r.bool_or(entry, "lstrip", field + ".lstrip", false);
      t.rstrip = r.bool_or(entry, "rstrip", field + ".rstrip", false);
      t.normalized = r.bool_or(entry, "normalized", field + ".normalized", !t.special);  // HF's default
      t.single_word = r.bool_or(entry, "single_word", field + ".single_word", false);
      // HF ignores the id in the file: a token in the vocabulary keeps its vocabulary id, a
      // repeated one its first id, and a new one the next id after the vocabulary (or after the
      // largest added id). It only warns when the file disagrees; such a file is refused here.
      int32_t expected;
      if (auto in_vocab = impl->vocab.find(t.content); in_vocab != impl->vocab.end()) {
        expected = in_vocab->second;
      } else if (auto seen = impl->added_by_content.find(t.content); seen != impl->added_by_content.end()) {
        expected = seen->second;
      } else {
        const auto model_size = static_cast<int32_t>(impl->vocab.size());
        expected = max_added < 0 ? model_size : (max_added >= model_size ? max_added + 1 : model_size);
      }
      if (t.id != expected)
        r.fail(field + ".id", std::to_string(t.id) + ", but Hugging Face gives \"" + t.content + "\" the id " +
                                  std::to_string(expected));
      max_added = std::max(max_added, t.id);
      impl->added_by_content[t.content] = t.id;
      max_id = std::max(max_id, t.id);
      added.push_back(std::move(t));
    }
  }

  impl->by_id.resize(static_cast<size_t>(max_id) + 1);
  for (const auto& [token, id] : impl->vocab) {
    auto& entry = impl->by_id[id];
    if (entry.present)
      r.fail("model.vocab", "id " + std::to_string(id) + " is given to both \"" + entry.token + "\" and \"" + token + "\"");
    entry = {token, true, false};
  }
  for (const AddedToken& t : added) {
    impl->by_id[t.id] = {t.content, true, t.special};  // HF looks added tokens up first
    if (t.normalized) impl->normalized_tokens.add(t, impl->nfc ? normalize_nfc(t.content) : t.content);
    else impl->raw_tokens.add(t, t.content);
  }
  impl->added = std::move(added);

  if (const json* unk = r.member(model, "unk_token")) {
    if (!unk->is_string()) r.fail("model.unk_token", "expected string");
    auto it = impl->vocab.find(unk->get<std::string>());
    if (it == impl->vocab.end()) r.fail("model.unk_token", "\"" + unk->get<std::string>() + "\" is not in model.vocab");
    impl->unk_id = it->second;
  }

  const ByteLevel& bl = byte_level();
  for (int b = 0; b < 256; ++b) {
    std::string character;
    append_utf8(character, bl.byte_to_char[b]);
    if (auto it = impl->vocab.find(character); it != impl->vocab.end()) {
      impl->byte_in_vocab[b] = true;
      impl->byte_symbols[b] = {it->second};
    } else if (byte_fallback) {
      // HF falls back on the bytes of the (byte-level) character's UTF-8, as <0xXX> tokens.
      std::vector<int32_t> ids;
      for (unsigned char u : character) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", u);
        if (auto f = impl->vocab.find(std::string_view(name)); f != impl->vocab.end()) ids.push_back(f->second);
      }
      if (ids.size() == character.size()) impl->byte_symbols[b] = std::move(ids);
    }
  }

  const json& merges = r.require(model, "merges", "model.merges", json::value_t::array);
  impl->merges = MergeTable(merges.size());
  uint32_t rank = 0;
  const auto lookup = [&](const std::string& token, const std::string& field) {
    auto it = impl->vocab.find(token);
    if (it == impl->vocab.end()) r.fail(field, "\"" + token + "\" is not in model.vocab");
    return it->second;
  };
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    const json& merge = merges[i];
    std::string left, right;
    if (merge.is_string()) {
      // The legacy "a b" form; HF skips "#version" header lines without giving them a rank.
      const std::string& line = merge.get_ref<const std::string&>();
      if (line.rfind("#version", 0) == 0) continue;
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
        r.fail(field, "expected \"left right\", found \"" + line + "\"");
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      r.fail(field, "expected \"left right\" or [left, right], found " + merge.dump());
    }
    impl->merges.set(lookup(left, field), lookup(right, field), {rank++, lookup(left + right, field)});
  }

  class_table();  // built here rather than in the first encode() call
  nfc();
  return Tokenizer(std::move(impl));
}

}  // namespace fedmoe::model
