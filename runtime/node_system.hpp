// A node's actor system: CAF configured for fedmoe (message types, middleman, a non-spinning
// scheduler), plus the node's Transport. Every fedmoe process builds exactly one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "net/transport.hpp"

namespace fedmoe::runtime {

struct NodeSystemOptions {
  std::string bulk_bind_host = "127.0.0.1";  // the bulk channel listens here (port chosen freely)
  std::string bulk_advertise_host;           // what bulk tickets tell peers; "" = bind host
  uint16_t bulk_port = 0;
  size_t bulk_threshold = 256 * 1024;
  bool enable_bulk = true;
  size_t scheduler_threads = 2;
};

class NodeSystem {
 public:
  explicit NodeSystem(const NodeSystemOptions& options = {});
  ~NodeSystem();

  caf::actor_system& system() { return *system_; }
  const std::shared_ptr<net::Transport>& transport() const { return transport_; }

  // Records an actor this node stops (exit reason user_shutdown) when it is destroyed, so that the
  // actor system can shut down; returns it.
  caf::actor own(caf::actor actor);

  // Publishes `actor` on host:port (port 0 = any free port) and returns the port. Throws
  // std::runtime_error with CAF's reason when that fails.
  uint16_t publish(const caf::actor& actor, const std::string& host, uint16_t port);
  // A handle to the actor published at host:port. Throws std::runtime_error naming the endpoint.
  caf::actor connect(const std::string& host, uint16_t port);

 private:
  caf::actor_system_config config_;
  std::vector<caf::actor> owned_;
  std::unique_ptr<caf::actor_system> system_;
  std::shared_ptr<net::Transport> transport_;
};

}  // namespace fedmoe::runtime
