// The router actor: receives prompts, chooses experts, and answers with a generation.
//
//   GenerateRequest -> GenerateReply   route (unless the request names its experts), fetch each chosen
//                                      expert's current version from its best replica, generate,
//                                      combine; the reply names every expert version it used.
//   RouteRequest    -> RouteReply      the routing decision alone.
//
// Routing (model/routing.hpp): "rules" (regex/keyword rules), "learned" (a classifier on the base
// model's hidden states), or "auto": rules first, the learned router when no rule matches, then the
// default expert. Replica choice: the highest reliability / (1 + latency / latency_unit) / (1 + load)
// among the expert's live replicas, where reliability = (answers + 1) / (requests + 2), latency is the
// moving average of this router's pulls from that shard and load its pulls in flight there. A replica
// that errs or stays silent past the timeout is charged and the next best one is asked (failover).
//
// Combining: "stitch" (one replica per expert; several experts answer in turn, one section each) or
// "consensus" (TR-FMoE: up to consensus_replicas replicas of each expert, their next-token
// distributions averaged). A generation reads one fixed version of each expert from start to end
// (model/expert_server.hpp); pulls subscribe to new versions, so an expert whose newest version the
// router already holds is not fetched again.
//
// The router learns where experts live from the coordinator (PlacementMap + peer_atom handles), or,
// embedded without one, from RouterOptions::shards and ::placement. Spawn it detached: generation
// blocks its thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/stateful_actor.hpp>
#include <nlohmann/json.hpp>

#include "actors/membership.hpp"
#include "model/expert_server.hpp"
#include "model/routing.hpp"
#include "net/messages.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

struct RouterOptions {
  std::string node_id = "router";
  std::shared_ptr<model::ExpertServer> server;                 // the base, its tokenizer, attached experts
  std::shared_ptr<const model::RuleRouter> rules;              // may be null or empty
  std::shared_ptr<const model::HiddenStateRouter> learned;     // may be null
  std::string routing = "auto";                                // rules | learned | auto
  std::string combine = "stitch";                              // stitch | consensus
  uint32_t max_experts = 2;                                    // experts per prompt
  double min_share = 0.5;                                      // a further expert needs this share of the best score
  uint32_t consensus_replicas = 3;
  std::string default_expert;                                  // when nothing matches ("" = answer with an error)
  uint32_t max_new_tokens = 64;                                // when a request says 0
  uint64_t reply_timeout_ms = 10'000;
  double latency_unit_ms = 100;
  Membership membership;
  std::map<std::string, caf::actor> shards;                    // without a coordinator: shard id -> handle
  std::map<std::string, std::vector<std::string>> placement;   //   and expert -> shard ids
};

struct ReplicaHealth {
  uint64_t requests = 0, answers = 0, failures = 0;
  double latency_ms = 0;  // exponential moving average of answered pulls
  uint32_t in_flight = 0;
  double reliability() const { return double(answers + 1) / double(requests + 2); }
};

struct GenerationRecord {
  uint64_t request_id = 0;
  std::string prompt_head;               // the prompt's first 80 bytes
  std::vector<net::RouteChoice> choices;
  std::string combine, error;
  double fetch_seconds = 0, generate_seconds = 0;
};

struct RouterState {
  RouterOptions options;
  std::shared_ptr<net::Transport> transport;
  std::map<std::string, caf::actor> shards;                  // shard id -> handle
  std::map<std::string, std::string> peer_endpoint;          // shard id -> endpoint connected to directly
  std::map<std::string, std::vector<std::string>> placement; // expert -> live shard ids
  uint64_t placement_epoch = 0;
  caf::actor link;                                           // to the coordinator (actors/membership.hpp)
  std::map<std::string, ReplicaHealth> health;               // by shard id
  std::map<std::string, std::map<std::string, uint64_t>> versions;  // expert -> shard -> newest version known

  // One generation waiting for its experts' snapshots.
  struct Fetch {
    std::string expert, shard, adapter;  // adapter: set when attached
    uint64_t version = 0, min_version = 0, correlation = 0;
    int64_t sent_ms = 0;
    std::vector<std::string> tried;      // "shard: why" for each replica that failed
    bool done = false, dropped = false;
  };
  struct Pending {
    caf::actor client;
    uint64_t client_correlation = 0;
    net::GenerateRequest request;
    std::vector<net::RouteChoice> choices;
    std::string combine;
    std::vector<Fetch> fetches;
    int64_t started_ms = 0;
  };
  std::map<uint64_t, Pending> pending;                       // by generation id
  std::map<uint64_t, std::pair<uint64_t, size_t>> fetch_of;  // our correlation -> (generation, fetch index)
  uint64_t next_id = 1;
  uint64_t generations = 0, failed_generations = 0, fetches = 0, cache_hits = 0, failovers = 0, notices = 0;
  std::map<std::string, uint64_t> routed;                    // expert -> prompts sent to it
  std::map<std::string, uint64_t> errors;
  std::deque<GenerationRecord> recent;

  static inline const char* name = "fedmoe.router";
};

// The routing decision as a JSON list (expert, version, score, shard, reason): status and `ask --json`.
nlohmann::json choices_json(const std::vector<net::RouteChoice>& choices);

caf::behavior router(caf::stateful_actor<RouterState>* self, std::shared_ptr<net::Transport> transport,
                     RouterOptions options);

}  // namespace fedmoe::actors
