// The coordinator actor: the federation's control plane. Nodes join with Hello (answered by HelloAck
// with their lease), stay with Heartbeat and go with Leave or by missing their lease. Clients add and
// remove experts with ExpertSpec (removed = true). The Registry (actors/registry.hpp) places every
// expert on R live shards and assigns workers to experts; each change is sent to every live member as
// a PlacementMap with a new epoch, and written to STATE_DIR/coordinator.json so a restarted
// coordinator resumes with the same experts, placement and assignments.
//
// Status: a StatusRequest is answered with the registry (members, experts, placement, assignments,
// epoch) plus the status of every live shard and worker, asked in parallel (versions, accepted and
// rejected updates with reasons, staleness statistics); members that do not answer within
// status_timeout_ms are listed as unanswered.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/stateful_actor.hpp>
#include <nlohmann/json.hpp>

#include "actors/registry.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

struct CoordinatorOptions {
  std::string node_id = "coordinator";
  Registry::Options registry;
  std::string state_dir;            // "" = nothing persisted
  uint64_t status_timeout_ms = 2000;
};

struct StatusGathering {
  caf::actor client;
  uint64_t correlation_id = 0, request_id = 0;
  std::map<uint64_t, std::string> waiting;  // our correlation id -> member asked
  nlohmann::json shards = nlohmann::json::object(), workers = nlohmann::json::object(),
                 routers = nlohmann::json::object();
};

struct CoordinatorState {
  CoordinatorOptions options;
  std::shared_ptr<net::Transport> transport;
  std::unique_ptr<Registry> registry;
  std::map<std::string, caf::actor> handles;  // member id -> actor (learned from its messages)
  uint64_t next_correlation = 1;
  std::map<uint64_t, StatusGathering> gatherings;  // by gathering id
  std::map<uint64_t, uint64_t> gathering_of;       // our correlation id -> gathering id
  std::map<std::string, uint64_t> errors;

  static inline const char* name = "fedmoe.coordinator";
};

caf::behavior coordinator(caf::stateful_actor<CoordinatorState>* self, std::shared_ptr<net::Transport> transport,
                          CoordinatorOptions options);

}  // namespace fedmoe::actors
