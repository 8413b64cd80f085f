#include "net/text.hpp"

namespace fedmoe::net {

int32_t next_code_point(std::string_view s, size_t& i) {
  const auto lead = static_cast<uint8_t>(s[i]);
  if (lead < 0x80) {
    ++i;
    return lead;
  }
  size_t length;
  uint32_t cp;
  uint32_t min;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2, cp = lead & 0x1Fu, min = 0x80;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3, cp = lead & 0x0Fu, min = 0x800;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4, cp = lead & 0x07u, min = 0x10000;
  } else {
    return -1;
  }
  if (s.size() - i < length) return -1;
  for (size_t k = 1; k < length; ++k) {
    const auto b = static_cast<uint8_t>(s[i + k]);
    if ((b & 0xC0) != 0x80) return -1;
    cp = (cp << 6) | (b & 0x3Fu);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return -1;
  i += length;
  return static_cast<int32_t>(cp);
}

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();)
    if (next_code_point(s, i) < 0) return false;
  return true;
}

std::string valid_utf8(std::string_view s) {
  if (is_valid_utf8(s)) return std::string(s);
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const size_t at = i;
    if (next_code_point(s, i) >= 0) {
      out.append(s.substr(at, i - at));
      continue;
    }
    // One replacement for the maximal subpart: a lead byte and the continuation bytes that follow it
    // as far as they could still belong to its sequence (Unicode 15, 3.9 "U+FFFD substitution").
    const auto lead = static_cast<uint8_t>(s[i]);
    const size_t want = lead >= 0xF0 && lead <= 0xF4   ? 4
                        : lead >= 0xE0 && lead <= 0xEF ? 3
                        : lead >= 0xC2 && lead <= 0xDF ? 2
                                                       : 1;
    size_t n = 1;
    while (n < want && i + n < s.size() && (static_cast<uint8_t>(s[i + n]) & 0xC0) == 0x80) ++n;
    out += "\xEF\xBF\xBD";
    i += n;
  }
  return out;
}

std::string utf8_head(std::string_view s, size_t max_bytes) {
  if (!is_valid_utf8(s)) return utf8_head(valid_utf8(s), max_bytes);
  if (s.size() <= max_bytes) return std::string(s);
  size_t end = max_bytes;
  while (end > 0 && (static_cast<uint8_t>(s[end]) & 0xC0) == 0x80) --end;  // s[end] starts a code point
  return std::string(s.substr(0, end));
}

}  // namespace fedmoe::net
