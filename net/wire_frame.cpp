#include "net/wire_frame.hpp"

#include <caf/sec.hpp>

namespace fedmoe::net {

caf::error save_frame(caf::serializer& f, WireFrame& x) {
  if (x.kind == WireFrame::Kind::fetch_failed)
    return caf::make_error(caf::sec::invalid_argument, "fedmoe: a fetch_failed frame is local-only");
  auto kind = static_cast<uint8_t>(x.kind);
  uint64_t size = x.bytes ? x.bytes->size() : 0;
  if (auto err = f(kind, x.sender_accepts_bulk, size)) return err;
  // apply_raw takes a mutable pointer for both directions; a serializer only reads it.
  if (size > 0)
    if (auto err = f.apply_raw(size, const_cast<std::byte*>(x.bytes->data()))) return err;
  return f(x.ticket.host, x.ticket.port, x.ticket.token_hi, x.ticket.token_lo, x.ticket.size);
}

caf::error load_frame(caf::deserializer& f, WireFrame& x) {
  uint8_t kind = 0;
  uint64_t size = 0;
  if (auto err = f(kind, x.sender_accepts_bulk, size)) return err;
  if (kind > static_cast<uint8_t>(WireFrame::Kind::bulk_ticket))
    return caf::make_error(caf::sec::invalid_argument, "fedmoe: wire frame of unknown kind " + std::to_string(kind));
  if (size > kMaxInlineFrameBytes)
    return caf::make_error(caf::sec::invalid_argument, "fedmoe: inline wire frame of " + std::to_string(size) +
                                                           " bytes exceeds the limit of " +
                                                           std::to_string(kMaxInlineFrameBytes));
  x.kind = static_cast<WireFrame::Kind>(kind);
  x.bytes.reset();
  if (size > 0) {
    auto buffer = Buffer::allocate(size);
    if (auto err = f.apply_raw(size, buffer->data())) return err;
    x.bytes = std::move(buffer);
  }
  return f(x.ticket.host, x.ticket.port, x.ticket.token_hi, x.ticket.token_lo, x.ticket.size);
}

std::string describe(const WireFrame& x) {
  switch (x.kind) {
    case WireFrame::Kind::message:
      return "wire_frame(message, " + std::to_string(x.bytes ? x.bytes->size() : 0) + " bytes)";
    case WireFrame::Kind::bulk_ticket:
      return "wire_frame(bulk, " + std::to_string(x.ticket.size) + " bytes at " + x.ticket.host + ":" +
             std::to_string(x.ticket.port) + ")";
    case WireFrame::Kind::fetch_failed:
      return "wire_frame(fetch failed: " + x.error + ")";
  }
  return "wire_frame(?)";
}

void register_wire_types(caf::actor_system_config& cfg) { cfg.add_message_type<WireFrame>("fedmoe.wire_frame"); }

}  // namespace fedmoe::net
