// The worker actor: trains one expert on private data that never leaves it. A round: pull the current
// version of its expert from a replica (SnapshotRequest -> ExpertSnapshot), train K local steps
// (model/local_update.hpp), push the delta with the version it was trained from, its sample count
// and loss (UpdatePush), and read the verdict (UpdateAck: staleness and weight; UpdateReject: reason).
// Then the next round starts from the newest version. A replica that does not answer within the
// reply timeout, or answers with an error, is left for the next one in the list (failover).
//
// Heterogeneity is explicit: each push carries the measured compute seconds; `speed_factor` F > 1
// makes the worker behave like a device F times slower (it pushes F x its compute time after the
// round's training started; time spent waiting for a shared compute slot counts toward that), and
// `latency_ms` +- `jitter_ms` delays every message it sends. Spawn it detached: local training
// blocks its thread.
//
// With a coordinator the worker follows the placement: each PlacementMap names its expert's live
// replicas, and from then on it pulls from and pushes to those (the primary first), so a federation
// whose shards come and go keeps its workers; `replicas` is only where it starts.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/membership.hpp"
#include "model/local_update.hpp"
#include "net/messages.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

struct WorkerOptions {
  std::string worker_id;
  std::string expert_id;
  std::vector<caf::actor> replicas;          // the expert's shards, in failover order
  std::shared_ptr<model::LocalTrainer> trainer;
  uint64_t rounds = 0;                       // pushes to make; 0 = until stopped
  double speed_factor = 1.0;
  uint64_t latency_ms = 0, jitter_ms = 0;
  uint64_t reply_timeout_ms = 30'000;
  uint64_t retry_ms = 200;                   // wait before pulling again after an error reply
  // Synchronous rounds (FedAvg): each round starts from a version newer than the one the previous
  // round trained from, asked for as SnapshotRequest.min_version and polled every sync_poll_ms while
  // the shard's round is still open. Without it a fast worker would train again from the same
  // version and count twice in one FedAvg round.
  bool sync_rounds = false;
  uint64_t sync_poll_ms = 50;
  // Set by whoever runs the fleet (the real-clock simulation's duration): no new round starts, and
  // the trainer (give it the same flag) stops within a step.
  std::shared_ptr<const std::atomic<bool>> stop;
  uint64_t seed = 0;
  Membership membership;                     // with a coordinator: joins and heartbeats
};

struct WorkerRoundRecord {
  uint64_t round = 0;
  uint64_t base_version = 0;
  std::string verdict;        // "accepted" or the reject reason
  uint64_t new_version = 0;
  uint64_t staleness = 0;
  double weight = 0;
  double train_loss = 0, val_loss_before = 0, val_loss_after = 0;
  double compute_seconds = 0, delay_seconds = 0;
  double slot_wait_seconds = 0;  // training's wall time beyond compute_seconds (waiting for a compute slot)
  double wait_seconds = 0;    // from the previous verdict to this round's snapshot (sync rounds: the barrier)
  std::string replica;        // shard id that answered
  int64_t finished_unix_ms = 0;  // when the verdict arrived
};

struct WorkerState {
  WorkerOptions options;
  std::shared_ptr<net::Transport> transport;
  size_t replica = 0;              // index into options.replicas
  uint64_t awaiting = 0;           // correlation id of the request in flight (0 = none)
  uint64_t next_correlation = 1;
  uint64_t rounds_done = 0;        // verdicts received
  uint64_t accepted = 0;
  std::map<std::string, uint64_t> rejected;
  uint64_t failovers = 0;
  std::map<std::string, uint64_t> errors;  // by code: messages that could not be handled
  std::vector<WorkerRoundRecord> history;
  WorkerRoundRecord current;       // the round in flight
  net::UpdatePush push;            // its update, until the verdict (pushed again on storage_error, not_enough_replicas)
  uint64_t push_retries = 0;       // of that update
  std::map<std::string, uint64_t> retried;  // pushes sent again, by the reason the shard gave
  std::chrono::steady_clock::time_point idle_since = std::chrono::steady_clock::now();  // last verdict
  std::mt19937_64 rng;
  bool finished = false;
  uint64_t placement_epoch = 0;
  std::string assigned_expert;     // what the coordinator's latest map assigns to this worker
  // Following the placement: with a coordinator, the worker's replicas are the expert's live replicas
  // in the latest map (primary first), reached through the shard handles the coordinator sends.
  std::map<std::string, caf::actor> peers;  // shard id -> handle
  std::map<std::string, std::string> peer_endpoint;  // shard id -> endpoint connected to directly
  std::vector<std::string> placed;          // our expert's live replicas in the latest map
  std::vector<std::string> replica_ids;     // ids of options.replicas when they came from the map
  bool stalled = false;                     // a pull found no replica: the next map restarts it
  caf::actor awaiting_from;                 // the replica the request in flight went to
  caf::actor link;                          // to the coordinator: Hello, heartbeats while training blocks this actor

  static inline const char* name = "fedmoe.worker";
};

caf::behavior worker(caf::stateful_actor<WorkerState>* self, std::shared_ptr<net::Transport> transport,
                     WorkerOptions options);

// LoRA hyper-parameters of an expert as the model layer wants them.
model::LoraSpec lora_spec_of(const net::ExpertSpec& spec);

}  // namespace fedmoe::actors
