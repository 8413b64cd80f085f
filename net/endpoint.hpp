// HOST:PORT endpoints as users type them on command lines and in configuration files.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace fedmoe::net {

struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::string str() const { return host + ":" + std::to_string(port); }
};

// "127.0.0.1:7100", "localhost:0", "[::1]:7100". Returns nullopt, with `error` set, for anything else.
std::optional<Endpoint> parse_endpoint(const std::string& text, std::string* error = nullptr);

}  // namespace fedmoe::net
