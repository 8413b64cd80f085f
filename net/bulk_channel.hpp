// The bulk channel: a plain TCP side path for large encoded messages.
//
// CAF 0.17's middleman moves byte vectors at ~160-460 MB/s on loopback against ~2,200 MB/s for a
// raw socket, and expert snapshots are tens to hundreds of MiB. So a large message is *staged* on
// the sender's BulkServer under a random 128-bit token, only a small ticket travels through CAF, and
// the receiver fetches the bytes straight from the socket into one aligned buffer (no intermediate
// copies: the server gather-writes the Cap'n Proto segments, which still reference the tensors).
//
// Protocol, repeated on a connection that the client keeps for its next fetch from the same sender
// (a fresh connection starts with small TCP windows and costs ~20% at 16 MiB):
//   client -> "FMBULKRQ" token_hi token_lo                 (24 bytes, integers little-endian)
//   server -> "FMBULKOK" size  then size bytes             or "FMBULKNO" 0 for an unknown ticket
//   client -> "FMBULKAK"                                   after the last byte: the server forgets it
// Tickets the receiver never fetches expire after Options::ticket_ttl; idle connections close after
// Options::idle_timeout on the server.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "net/buffer.hpp"
#include "net/codec.hpp"

namespace fedmoe::net {

struct BulkTicket {
  std::string host;
  uint16_t port = 0;
  uint64_t token_hi = 0;
  uint64_t token_lo = 0;
  uint64_t size = 0;
};

class BulkServer {
 public:
  struct Options {
    std::string bind_host = "127.0.0.1";
    uint16_t port = 0;                    // 0 = any free port
    std::string advertise_host;           // what tickets say; "" = bind_host
    std::chrono::seconds ticket_ttl{300};
    std::chrono::seconds idle_timeout{60};
    int threads = 1;
  };
  explicit BulkServer(Options options);  // throws std::runtime_error if it cannot listen
  ~BulkServer();
  BulkServer(const BulkServer&) = delete;
  BulkServer& operator=(const BulkServer&) = delete;

  uint16_t port() const;
  // Keeps `message` until a receiver fetched it completely (or the ticket expired).
  BulkTicket stage(std::shared_ptr<const Encoded> message);
  size_t staged_count() const;
  uint64_t fetched_count() const;
  uint64_t connections_accepted() const;

  struct Impl;  // opaque; named here so that the connection code in the .cpp can refer to it

 private:
  std::unique_ptr<Impl> impl_;
};

// Fetches staged messages, asynchronously, on one I/O thread of its own (the kernel's copies dominate;
// one thread also keeps every fetch's handlers serialized).
class BulkClient {
 public:
  struct Options {
    size_t max_idle_per_sender = 4;       // kept-alive connections per sender endpoint
    std::chrono::milliseconds connect_timeout{5000};
    // A fetch fails when it makes no progress for this long (a dead or wedged sender).
    std::chrono::milliseconds idle_timeout{30000};
    uint64_t max_size = uint64_t{4} << 30;
  };
  using Callback = std::function<void(std::shared_ptr<Buffer> bytes, std::string error)>;

  explicit BulkClient(Options options);
  ~BulkClient();
  BulkClient(const BulkClient&) = delete;
  BulkClient& operator=(const BulkClient&) = delete;

  // Calls `done` exactly once, on a client thread: with the bytes, or with null and an error text.
  void fetch(const BulkTicket& ticket, Callback done);
  size_t idle_connections() const;

  struct Impl;  // opaque; named here so that the fetch code in the .cpp can refer to it

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace fedmoe::net
