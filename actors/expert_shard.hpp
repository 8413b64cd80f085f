// The expert-shard actor: the data plane for expert weights. It keeps the newest snapshot of each
// expert it was given, serves pulls of them, and answers status requests.
// (Update application, replication and persistence arrive with the federation.)
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "net/messages.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

struct StoredExpert {
  net::ExpertSnapshot snapshot;  // tensors point into the received message buffer
  uint64_t checksum = 0;
  uint64_t byte_count = 0;
};

struct ExpertShardState {
  std::string node_id;
  std::shared_ptr<net::Transport> transport;
  std::map<std::string, StoredExpert> experts;
  uint64_t snapshots_received = 0;
  uint64_t pulls_served = 0;
  std::map<std::string, uint64_t> errors;  // by error code: what peers sent that could not be handled

  static inline const char* name = "fedmoe.expert_shard";
};

caf::behavior expert_shard(caf::stateful_actor<ExpertShardState>* self, std::string node_id,
                           std::shared_ptr<net::Transport> transport);

}  // namespace fedmoe::actors
