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

// Whether `host` is a wildcard a node can listen on but no peer can connect to (0.0.0.0, ::, [::]).
bool is_wildcard_host(const std::string& host);

// The local address this host uses to reach host:port (a connected UDP socket's own address: nothing
// is sent), e.g. the address of the interface toward the coordinator. "" when there is no route.
std::string local_address_toward(const std::string& host, uint16_t port);

}  // namespace fedmoe::net
