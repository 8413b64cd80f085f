#include "net/endpoint.hpp"

#include <charconv>

namespace fedmoe::net {

std::optional<Endpoint> parse_endpoint(const std::string& text, std::string* error) {
  auto fail = [&](std::string why) -> std::optional<Endpoint> {
    if (error) *error = "bad endpoint '" + text + "': " + why + " (expected HOST:PORT)";
    return std::nullopt;
  };
  auto colon = text.rfind(':');
  if (colon == std::string::npos) return fail("no ':'");
  std::string host = text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) return fail("empty host");
  std::string port_text = text.substr(colon + 1);
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() || port > 65535)
    return fail("port must be a number from 0 to 65535");
  return Endpoint{host, static_cast<uint16_t>(port)};
}

}  // namespace fedmoe::net
