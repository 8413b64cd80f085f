// WireFrame: the one CAF message type that carries fedmoe messages between actors.
//
// A frame holds either a whole encoded Cap'n Proto message (shared, never copied inside a process,
// serialized as one raw byte run across processes) or a ticket for a large message waiting on its
// sender's bulk channel. Registered on every node by register_wire_types().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include <caf/actor_system_config.hpp>
#include <caf/deserializer.hpp>
#include <caf/error.hpp>
#include <caf/serializer.hpp>

#include "net/buffer.hpp"
#include "net/bulk_channel.hpp"

namespace fedmoe::net {

struct WireFrame {
  enum class Kind : uint8_t {
    message = 0,       // `bytes` holds the encoded message
    bulk_ticket = 1,   // fetch the encoded message with `ticket`
    fetch_failed = 2,  // a local note from the transport: fetching `ticket` failed with `error`
  };
  Kind kind = Kind::message;
  // Whether the sending node fetches bulk tickets. A node with its bulk channel off says so in every
  // frame, and its peers then answer it inline.
  bool sender_accepts_bulk = true;
  std::shared_ptr<const Buffer> bytes;
  BulkTicket ticket;
  std::string error;
};

// Frames that travel through CAF's own connection are small by design (large messages take the bulk
// channel); this bound keeps a hostile peer from making a node allocate without limit.
inline constexpr uint64_t kMaxInlineFrameBytes = uint64_t{1} << 30;

caf::error save_frame(caf::serializer& f, WireFrame& x);
caf::error load_frame(caf::deserializer& f, WireFrame& x);
std::string describe(const WireFrame& x);

// CAF 0.17 inspection: binary (de)serialization through the functions above, and a short text for
// CAF's to_string (logging), which never dumps the payload.
inline caf::error inspect(caf::serializer& f, WireFrame& x) { return save_frame(f, x); }
inline caf::error inspect(caf::deserializer& f, WireFrame& x) { return load_frame(f, x); }
template <class Inspector>
typename std::enable_if<std::is_void<typename Inspector::result_type>::value>::type inspect(Inspector& f,
                                                                                           WireFrame& x) {
  auto text = describe(x);
  f(text);
}

// Adds every CAF message type fedmoe sends: call on each node's actor_system_config.
void register_wire_types(caf::actor_system_config& cfg);

}  // namespace fedmoe::net
