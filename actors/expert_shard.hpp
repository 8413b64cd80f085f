// The expert-shard actor: the data plane for expert weights. It hosts the experts it is given
// (ExpertSnapshot), serves pulls of the current version, folds workers' updates in through the
// configured aggregation policy (UpdatePush -> UpdateAck with new version, staleness and weight, or
// UpdateReject with the reason), and answers status requests. What it holds, and its durability,
// is actors/expert_store.hpp.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/expert_store.hpp"
#include "actors/membership.hpp"
#include "net/messages.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

struct ExpertShardState {
  std::string node_id;
  std::shared_ptr<net::Transport> transport;
  std::unique_ptr<ExpertStore> store;
  Membership membership;
  uint64_t placement_epoch = 0;
  std::vector<std::string> placed_experts;  // what the coordinator's latest map puts on this shard
  uint64_t snapshots_received = 0;
  uint64_t pulls_served = 0;
  uint64_t updates_received = 0;
  std::map<std::string, uint64_t> errors;  // by error code: what peers sent that could not be handled

  static inline const char* name = "fedmoe.expert_shard";
};

caf::behavior expert_shard(caf::stateful_actor<ExpertShardState>* self, std::string node_id,
                           std::shared_ptr<net::Transport> transport);
// With a policy and a state directory (the store recovers what the directory holds).
caf::behavior expert_shard_with(caf::stateful_actor<ExpertShardState>* self, std::string node_id,
                                std::shared_ptr<net::Transport> transport, ExpertStoreOptions options);

struct ShardOptions {
  ExpertStoreOptions store;
  Membership membership;  // with a coordinator: joins, heartbeats, follows the placement map
};
caf::behavior expert_shard_node(caf::stateful_actor<ExpertShardState>* self, std::string node_id,
                                std::shared_ptr<net::Transport> transport, ShardOptions options);

}  // namespace fedmoe::actors
