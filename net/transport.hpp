// Transport: how an actor sends and receives fedmoe messages, with the same code whether the peer
// lives in this process or on another host.
//
//   send():    encodes the message; a peer in this process gets the encoded buffer itself (shared,
//              not copied); a remote peer gets it inline through CAF when small, and otherwise a
//              bulk ticket while the bytes wait on this node's BulkServer.
//   receive(): decodes an inline frame at once (bounded decoding, see net/codec.hpp). For a ticket it
//              starts the fetch and returns "pending": when the bytes are in, the transport delivers
//              the frame again to the same actor, under the original sender, as an inline frame. A
//              failed fetch comes back the same way and then reads as an error.
//
// One Transport per actor system (a node); actors get it by shared_ptr when they are spawned.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <caf/node_id.hpp>
#include <caf/local_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "net/bulk_channel.hpp"
#include "net/codec.hpp"
#include "net/messages.hpp"
#include "net/wire_frame.hpp"

namespace fedmoe::net {

class Transport {
 public:
  struct Options {
    BulkServer::Options bulk_server;
    BulkClient::Options bulk_client;
    // Encoded messages at least this large go to remote peers through the bulk channel.
    size_t bulk_threshold = 256 * 1024;
    bool enable_bulk = true;
    DecodeLimits limits;
  };
  struct Stats {
    uint64_t sent_local = 0, sent_inline = 0, sent_bulk = 0;
    uint64_t bytes_sent = 0;
    uint64_t received = 0, fetches = 0, fetch_failures = 0, decode_errors = 0;
  };
  // Received: a message, an error naming what was wrong, or nullopt while a bulk fetch is under way.
  using Received = std::optional<Result<Message>>;

  Transport(caf::actor_system& system, Options options);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Sends `m` to `dest` with `from` as the sender (replies go there; may be an invalid handle).
  void send(const caf::actor& from, const caf::actor& dest, const Message& m);
  // Same, from inside an actor.
  void send(caf::local_actor* self, const caf::actor& dest, const Message& m);
  // Same, for a body: from node `sender_id`, under `correlation_id` (a request's own, or the one a
  // reply echoes), stamped with the current time. No-op for an invalid `dest`.
  void send(caf::local_actor* self, const caf::actor& dest, const std::string& sender_id, uint64_t correlation_id,
            Body body);
  // Same, for a message already encoded (for example one snapshot sent to several replicas).
  void send_encoded(const caf::actor& from, const caf::actor& dest, std::shared_ptr<const Encoded> encoded);

  // Call from the actor's WireFrame handler.
  Received receive(caf::local_actor* self, WireFrame& frame);

  // For blocking code (CLI clients, tests): waits on `self` for the next fedmoe message, resolving
  // bulk tickets along the way. Returns nullopt on timeout.
  std::optional<Result<Message>> await(caf::scoped_actor& self, std::chrono::milliseconds timeout);

  uint16_t bulk_port() const;
  Stats stats() const;
  const Options& options() const { return options_; }

 private:
  void deliver_later(const caf::actor& self, const caf::strong_actor_ptr& sender, const BulkTicket& ticket);

  bool peer_accepts_bulk(const caf::node_id& peer) const;

  caf::actor_system& system_;
  Options options_;
  mutable std::mutex peers_mu_;
  std::set<caf::node_id> no_bulk_peers_;  // nodes that said their bulk channel is off
  std::unique_ptr<BulkServer> bulk_server_;
  std::unique_ptr<BulkClient> bulk_client_;
  struct Counters;
  std::unique_ptr<Counters> counters_;
};

// Current wall-clock time in Unix milliseconds, for Message::sent_at_unix_ms.
int64_t unix_ms_now();
// Monotonic milliseconds (steady clock), for leases, timeouts and measured latencies.
int64_t steady_ms_now();

}  // namespace fedmoe::net
