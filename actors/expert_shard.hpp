// The expert-shard actor: the data plane for expert weights. It hosts the experts it is given
// (ExpertSnapshot), serves pulls of the current version, folds workers' updates in through the
// configured aggregation policy (UpdatePush -> UpdateAck with new version, staleness and weight, or
// UpdateReject with the reason), and answers status requests. What it holds, and its durability,
// is actors/expert_store.hpp.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
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
  caf::actor link;  // to the coordinator: Hello, heartbeats, reconnection (actors/membership.hpp)
  uint64_t placement_epoch = 0;
  std::vector<std::string> placed_experts;  // what the coordinator's latest map puts on this shard
  // Replication: this shard is the primary of an expert when it is first among the expert's live
  // replicas. The primary forwards every accepted update to the other replicas (in acceptance order:
  // CAF keeps the order between two actors) and acknowledges the worker once they have answered, so
  // losing one replica loses no acknowledged update. A replica new to an expert gets the primary's
  // current snapshot first.
  std::map<std::string, std::vector<std::string>> replicas;  // expert -> live shard ids, primary first
  std::map<std::string, caf::actor> peers;                   // shard id -> handle (from the coordinator)
  std::map<std::string, std::set<std::string>> seeded;      // expert -> replicas given our snapshot
  // Seeds awaiting their receipt: correlation id -> (expert, replica). A seed refused or unanswered
  // within replication_timeout_ms is sent again; so is one to a replica that restarted (a new
  // handle), left the placement, or refused a forwarded update as out of order.
  std::map<uint64_t, std::pair<std::string, std::string>> seed_of;
  uint64_t seeds_sent = 0, seeds_retried = 0;
  struct Replication {  // one accepted update waiting for the replicas
    caf::actor worker;
    uint64_t worker_correlation = 0;
    net::UpdateAck ack;
    std::set<uint64_t> waiting;  // correlation ids of the forwarded copies
  };
  std::map<uint64_t, Replication> replications;  // by id
  std::map<uint64_t, uint64_t> replication_of;   // forwarded copy's correlation id -> replication id
  uint64_t next_correlation = 1;
  uint64_t replicated = 0, replication_timeouts = 0, replica_rejects = 0;
  uint64_t replication_timeout_ms = 5000;
  // Pullers that asked to hear of new versions (SnapshotRequest.subscribe): routers, workers. Each
  // gets a VersionNotice when the expert's version passes the one last announced; a subscriber that
  // goes down is forgotten (monitored).
  std::map<std::string, std::set<caf::actor>> subscribers;  // expert -> subscribers
  std::map<std::string, uint64_t> announced;                // expert -> version last announced
  uint64_t notices_sent = 0;
  uint64_t snapshots_received = 0;
  uint64_t pulls_served = 0;
  uint64_t updates_received = 0;
  uint64_t redirected = 0;  // workers' pushes answered with not_replica (this shard is not the primary)
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
