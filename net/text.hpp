// Text that peers and users send (prompts, reasons, ids) is cut and serialized without ever
// producing broken UTF-8: a prompt cut at byte 80 inside a Chinese character used to make
// nlohmann::json::dump throw inside a router's status handler. Every cut goes through utf8_head,
// every text the encoder writes through valid_utf8.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace fedmoe::net {

// Reads the code point at s[i] and advances i past it; returns -1, leaving i, where the bytes are not
// well-formed UTF-8 (overlong forms, surrogates and values above U+10FFFF included).
int32_t next_code_point(std::string_view s, size_t& i);

// Whether every byte of `s` belongs to a well-formed UTF-8 sequence.
bool is_valid_utf8(std::string_view s);

// `s` with every maximal ill-formed subpart replaced by U+FFFD (so valid input comes back unchanged).
std::string valid_utf8(std::string_view s);

// The longest prefix of `s` of at most `max_bytes` bytes that ends on a code-point boundary
// (`s` itself when it is short enough). Ill-formed input is made valid first.
std::string utf8_head(std::string_view s, size_t max_bytes);

}  // namespace fedmoe::net
