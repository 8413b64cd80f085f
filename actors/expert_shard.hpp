// The expert-shard actor: the data plane for expert weights. It hosts the experts it is given
// (ExpertSnapshot), serves pulls of the current version, folds workers' updates in through the
// configured aggregation policy (UpdatePush -> UpdateAck with new version, staleness and weight, or
// UpdateReject with the reason), and answers status requests. What it holds, and its durability,
// is actors/expert_store.hpp.
#pragma once

#include <cstdint>
#include <deque>
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
  net::PlacementMap map;  // the latest (an expert added after it may make this shard its primary)
  std::vector<std::string> placed_experts;  // what the coordinator's latest map puts on this shard
  std::map<std::string, std::vector<std::string>> replicas;  // expert -> live replicas in the latest map
  // Replication (Kafka's acks=all with an in-sync set, Raft's terms). The coordinator's map names
  // each expert's in-sync set (primary first), its term and min-in-sync. The primary writes the
  // expert's log (store entries) and streams every entry, in order, to each other placed replica;
  // it acknowledges a worker once every in-sync replica holds the entry durably (the commit point),
  // and only while at least min-in-sync replicas are in sync and its lease from the coordinator
  // holds. A replica that does not acknowledge within replication_timeout_ms is reported to the
  // coordinator, which takes it out of the set; one that catches up is proposed back in. A replica
  // takes entries only under the term of the snapshot its primary seeded it with (one seed per
  // replica per term), refuses anything from an older term, and applies entries strictly in log
  // order: whichever path (inline, bulk) a message takes, a gap is refused and resent.
  struct Follower {  // another replica, as its primary sees it
    uint64_t acked_lsn = 0;  // the last entry it holds durably
    uint64_t sent_lsn = 0;   // the last entry sent to it
    bool synced = false;     // holds our seed of this term: entries may follow
    uint64_t seed_correlation = 0;
    int64_t seed_sent_ms = 0;
    int64_t progress_ms = 0;  // when acked_lsn last moved (or the seed was answered)
  };
  struct Waiter {  // a worker waiting for its entry to commit
    caf::actor worker;
    uint64_t correlation = 0;
    net::UpdateAck ack;
    uint64_t lsn = 0;
    int64_t since_ms = 0;
  };
  struct Leadership {  // an expert this shard is the primary of
    uint64_t term = 0;
    std::vector<std::string> in_sync;  // from the coordinator, this shard first
    uint32_t min_in_sync = 1;
    std::map<std::string, Follower> followers;
    std::deque<net::LogEntry> recent;  // the latest entries, for replicas a little behind
    std::map<std::string, uint64_t> lsn_of_update;  // update id -> lsn, for the entries in `recent`
    uint64_t committed = 0;
    std::deque<Waiter> waiting;  // in log order
    int64_t isr_change_sent_ms = 0;  // an IsrChange awaiting the coordinator's map (0: none)
  };
  std::map<std::string, Leadership> leading;            // expert -> leadership
  // Group commit: pushes written but not yet flushed (their waiters and entries), and replicas'
  // answers due once what the primary sent is flushed.
  struct Unflushed {
    std::vector<Waiter> waiters;
    std::vector<net::LogEntry> entries;
  };
  std::map<std::string, Unflushed> unflushed;
  struct AckDue {
    caf::actor primary;
    uint64_t committed = 0;
  };
  std::map<std::string, AckDue> acks_due;
  bool flush_scheduled = false;
  std::map<std::string, uint64_t> known_term;           // expert -> highest term heard of
  std::map<std::string, uint64_t> synced_term;          // expert -> term of the seed this replica holds
  std::map<std::string, std::map<uint64_t, net::LogEntry>> early;  // expert -> entries ahead of a gap, by lsn
  std::map<std::string, std::string> primary;           // expert -> primary named by the latest map
  std::map<std::string, caf::actor> peers;              // shard id -> handle
  std::map<std::string, std::string> peer_endpoint;     // shard id -> endpoint connected to directly
  int64_t lease_ms = 0;                  // the coordinator's lease (HelloAck); 0 = not in a federation yet
  int64_t last_coordinator_ms = 0;       // when the coordinator last answered
  uint64_t next_correlation = 1;
  uint64_t replication_timeout_ms = 5000;
  size_t recent_entries = 256;           // entries kept for catch-up (older ones: a seed instead)
  struct Counters {
    uint64_t appends_sent = 0, entries_sent = 0, seeds_sent = 0, seeds_retried = 0, flushes = 0, resent = 0;
    uint64_t committed_acks = 0, isr_shrinks_asked = 0, isr_expands_asked = 0, stepped_down = 0;
    uint64_t not_enough_replicas = 0, lease_expired = 0, duplicates_acked = 0, diverged = 0;
    std::map<std::string, uint64_t> refusals_received;  // replicas' refusals by code
    std::map<std::string, uint64_t> refusals_sent;      // this replica's refusals by code
  } counters;
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
  uint64_t replication_timeout_ms = 5000;  // an in-sync replica silent this long is reported behind
};
caf::behavior expert_shard_node(caf::stateful_actor<ExpertShardState>* self, std::string node_id,
                                std::shared_ptr<net::Transport> transport, ShardOptions options);

}  // namespace fedmoe::actors
