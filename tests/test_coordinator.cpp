// The coordinator: the Registry's placement, assignment, expiry and persistence as plain code, and
// the coordinator actor with real shard actors that join, heartbeat, receive placement maps and die.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <thread>

#include <caf/send.hpp>
#include <nlohmann/json.hpp>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "actors/registry.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"
#include "federation_test_util.hpp"

using namespace fedmoe;
namespace fs = std::filesystem;

namespace {

net::Hello hello(const std::string& id, net::Role role, const std::string& wish = "") {
  net::Hello h;
  h.node_id = id;
  h.role = role;
  h.endpoint = "127.0.0.1:1";
  h.expert = wish;
  return h;
}

net::ExpertSpec spec(const std::string& id) {
  net::ExpertSpec s;
  s.expert_id = id;
  s.domain = id;
  s.target_modules = {"q_proj"};
  return s;
}

// Expert "sql"'s one f32 tensor "w" [8], every element `value`.
net::Tensor w_of(float value) {
  std::vector<float> d(8, value);
  std::vector<std::byte> bytes(reinterpret_cast<std::byte*>(d.data()), reinterpret_cast<std::byte*>(d.data()) + 32);
  return net::Tensor::owning("w", net::DType::f32, {8}, bytes);
}

net::ExpertSnapshot snapshot_of(uint64_t version, float value) {
  net::ExpertSnapshot snap;
  snap.spec = spec("sql");
  snap.version = version;
  snap.tensors.push_back(w_of(value));
  return snap;
}

net::UpdatePush update_of(const std::string& update_id, const std::string& worker, uint64_t base_version,
                          uint64_t samples, float value) {
  net::UpdatePush u;
  u.expert_id = "sql";
  u.worker_id = worker;
  u.update_id = update_id;
  u.base_version = base_version;
  u.sample_count = samples;
  u.deltas.push_back(w_of(value));
  return u;
}

// The version of the expert a shard hosts (-1 while it hosts none).
int64_t version_on(runtime::NodeSystem& node, const caf::actor& shard) {
  auto j = fedmoe::test::status_of(node, shard);
  return j["experts"].empty() ? -1 : j["experts"][0]["version"].get<int64_t>();
}

std::map<std::string, size_t> replicas_per_shard(const actors::Registry& r) {
  std::map<std::string, size_t> held;
  for (const auto& [id, s] : r.experts())
    for (const auto& shard : r.replicas_of(id)) ++held[shard];
  return held;
}

}  // namespace

TEST_CASE("registry: R replicas on distinct live shards, balanced, re-placed when a shard dies", "[coordinator]") {
  actors::Registry r({3, 1000});
  for (int i = 0; i < 4; ++i) r.join(hello("shard-" + std::to_string(i), net::Role::shard), 0);
  CHECK(r.add_expert(spec("python")));
  r.add_expert(spec("sql"));
  r.add_expert(spec("docs"));
  r.add_expert(spec("go"));
  for (const auto& e : {"python", "sql", "docs", "go"}) {
    auto rs = r.replicas_of(e);
    CHECK(rs.size() == 3);
    CHECK(std::set<std::string>(rs.begin(), rs.end()).size() == 3);
  }
  for (const auto& [shard, n] : replicas_per_shard(r)) CHECK(n == 3);  // 12 replicas over 4 shards
  const auto before = r.replicas_of("python");
  const auto epoch = r.epoch();

  // shard-0 stops heartbeating; everyone else does.
  for (int i = 1; i < 4; ++i) r.heartbeat({"shard-" + std::to_string(i), 1, 0, 0}, 900);
  std::vector<std::string> died;
  CHECK(r.expire(1500, &died));
  CHECK(died == std::vector<std::string>{"shard-0"});
  CHECK(r.epoch() > epoch);
  for (const auto& e : {"python", "sql", "docs", "go"}) {
    auto rs = r.replicas_of(e);
    CHECK(rs.size() == 3);
    CHECK(std::find(rs.begin(), rs.end(), "shard-0") == rs.end());
  }
  // Live replicas stayed where they were.
  for (const auto& s : before)
    if (s != "shard-0") CHECK(std::find(r.replicas_of("python").begin(), r.replicas_of("python").end(), s) !=
                                r.replicas_of("python").end());
  // Fewer live shards than R: every live shard holds every expert.
  r.leave("shard-1");
  CHECK(r.replicas_of("sql").size() == 2);
}

TEST_CASE("registry: workers get their wish, else the expert with the fewest workers", "[coordinator]") {
  actors::Registry r({3, 1000});
  r.add_expert(spec("python"));
  r.add_expert(spec("sql"));
  r.join(hello("w-a", net::Role::worker, "sql"), 0);
  r.join(hello("w-b", net::Role::worker), 0);
  r.join(hello("w-c", net::Role::worker), 0);
  r.join(hello("w-d", net::Role::worker, "nonexistent"), 0);
  CHECK(r.assignment_of("w-a") == "sql");
  std::map<std::string, int> per;
  for (const auto& w : {"w-a", "w-b", "w-c", "w-d"}) ++per[*r.assignment_of(w)];
  CHECK(per["python"] == 2);
  CHECK(per["sql"] == 2);
  // Removing an expert moves its workers.
  r.remove_expert("sql");
  CHECK(r.assignment_of("w-a") == "python");
  CHECK(r.placement().assignments.size() == 4);
}

TEST_CASE("registry: to_json -> from_json restores experts, placement, assignments, epoch", "[coordinator]") {
  actors::Registry r({2, 1000});
  for (int i = 0; i < 3; ++i) r.join(hello("shard-" + std::to_string(i), net::Role::shard), 0);
  r.add_expert(spec("python"));
  r.join(hello("w-1", net::Role::worker), 0);
  auto back = actors::Registry::from_json(r.to_json(), {2, 1000}, 5000);
  CHECK(back.epoch() == r.epoch());
  CHECK(back.replicas_of("python") == r.replicas_of("python"));
  CHECK(back.assignment_of("w-1") == "python");
  CHECK(back.experts().at("python").target_modules == std::vector<std::string>{"q_proj"});
  CHECK_THROWS_WITH(actors::Registry::from_json(nlohmann::json{{"epoch", 1}}, {2, 1000}, 0),
                    Catch::Matchers::Contains("coordinator state"));
}

TEST_CASE("coordinator actor: shards join, get placed, die and are replaced - state survives a restart",
          "[coordinator]") {
  std::string tmpl = (fs::temp_directory_path() / "fedmoe_coord_XXXXXX").string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  fs::path dir = tmpl;
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  actors::CoordinatorOptions co;
  co.registry = {2, 400};
  co.state_dir = dir.string();
  auto coord = node.system().spawn(actors::coordinator, node.transport(), co);
  std::vector<caf::actor> shards;
  for (int i = 0; i < 3; ++i) {
    actors::ShardOptions so;
    so.membership.coordinator = coord;
    so.membership.heartbeat_ms = 100;
    shards.push_back(
        node.system().spawn(actors::expert_shard_node, "shard-" + std::to_string(i), node.transport(), so));
  }
  auto joined = [&] {
    std::string error;
    auto s = runtime::node_status(node, coord, timeout, &error);
    return s ? nlohmann::json::parse(*s)["shards"].size() : size_t{0};
  };
  // All three shards are members before the experts come: each expert's first placement is its
  // in-sync set (a replica placed later is in sync only once its primary has caught it up).
  for (int tries = 0; tries < 100 && joined() < 3; ++tries) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // A client registers two experts (the reply is the placement map).
  for (const auto& e : {"python", "sql"}) {
    caf::scoped_actor client{node.system()};
    net::Message m;
    m.sender_id = "client";
    m.correlation_id = 1;
    m.body = spec(e);
    node.transport()->send(caf::actor{client}, coord, m);
    auto r = node.transport()->await(client, timeout);
    REQUIRE(r);
    REQUIRE(*r);
    REQUIRE(std::holds_alternative<net::PlacementMap>(r->value().body));
  }
  auto status = [&](const caf::actor& a) {
    std::string error;
    auto s = runtime::node_status(node, a, timeout, &error);
    INFO(error);
    REQUIRE(s);
    return nlohmann::json::parse(*s);
  };
  // Each shard learns its experts from the map: 2 experts x 2 replicas over 3 shards.
  size_t placed = 0;
  for (int tries = 0; tries < 50; ++tries) {
    placed = 0;
    for (const auto& s : shards) placed += status(s)["placed_experts"].size();
    if (placed == 4) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(placed == 4);
  auto st = status(coord);
  CHECK(st["shards"].size() == 3);  // every live shard answered the fan-out
  CHECK(st["experts"].size() == 2);
  const auto epoch = st["epoch"].get<uint64_t>();

  // shard-0 dies: after its lease it is replaced wherever it held a replica.
  caf::anon_send_exit(shards[0], caf::exit_reason::kill);
  nlohmann::json after;
  for (int tries = 0; tries < 100; ++tries) {
    after = status(coord);
    if (after["epoch"].get<uint64_t>() > epoch) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(after["epoch"].get<uint64_t>() > epoch);
  for (const auto& p : after["placement"].items()) {
    CHECK(p.value().size() == 2);
    for (const auto& s : p.value()) CHECK(s != "shard-0");
  }
  // A restarted coordinator resumes from its directory.
  caf::anon_send_exit(coord, caf::exit_reason::kill);
  auto coord2 = node.system().spawn(actors::coordinator, node.transport(), co);
  auto resumed = status(coord2);
  CHECK(resumed["experts"].size() == 2);
  CHECK(resumed["placement"] == after["placement"]);
  // A new incarnation starts a new epoch (never one it may already have sent), saved before it serves.
  CHECK(resumed["epoch"].get<uint64_t>() == after["epoch"].get<uint64_t>() + 1);
  std::ifstream saved(dir / "coordinator.json");
  CHECK(nlohmann::json::parse(saved)["epoch"] == resumed["epoch"]);
  for (auto& s : shards) caf::anon_send_exit(s, caf::exit_reason::kill);
  caf::anon_send_exit(coord2, caf::exit_reason::kill);
  fs::remove_all(dir);
}

TEST_CASE("replication: the primary forwards accepted updates - losing it loses no acknowledged update",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  auto fed = fedmoe::test::start_federation(node, 3, 2, 500, policy);
  auto& coord = fed.coordinator;
  auto& shards = fed.shards;
  std::string error;
  auto map = runtime::register_expert(node, coord, spec("sql"), timeout, &error);
  INFO(error);
  REQUIRE(map);
  REQUIRE(map->placements.size() == 1);
  REQUIRE(map->placements[0].replicas.size() == 2);
  const std::string primary = map->placements[0].replicas[0].shard_id, backup = map->placements[0].replicas[1].shard_id;
  std::string third;
  for (const auto& [id, a] : shards)
    if (id != primary && id != backup) third = id;

  // Seed the primary only: it hands its snapshot to the backup itself.
  REQUIRE(runtime::push_snapshot(node, shards[primary], snapshot_of(0, 0.0f), timeout).ok);
  for (int i = 0; i < 50 && version_on(node, shards[backup]) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(version_on(node, shards[backup]) == 0);

  // Acknowledged by the primary = applied on the backup too.
  for (int i = 0; i < 3; ++i) {
    auto u = update_of("u" + std::to_string(i), "w", uint64_t(i), 1, 1.0f + float(i));
    auto r = runtime::push_update(node, shards[primary], u, timeout);
    REQUIRE(r.accepted);
    CHECK(r.ack.new_version == uint64_t(i + 1));
    CHECK(version_on(node, shards[backup]) == i + 1);  // already there when the worker hears back
  }
  auto p1 = runtime::pull_snapshot(node, shards[primary], "sql", 3, timeout);
  auto b1 = runtime::pull_snapshot(node, shards[backup], "sql", 3, timeout);
  REQUIRE(p1.ok);
  REQUIRE(b1.ok);
  CHECK(p1.checksum == b1.checksum);  // bit-identical weights
  auto replication = fedmoe::test::status_of(node, shards[primary])["replication"];
  CHECK(replication["committed_acks"] == 3);
  CHECK(replication["leading"]["sql"]["in_sync"].size() == 2);
  CHECK(replication["leading"]["sql"]["committed_lsn"] == 3);

  // The primary dies: the backup becomes primary, the third shard is placed and seeded with v3.
  caf::anon_send_exit(shards[primary], caf::exit_reason::kill);
  for (int i = 0; i < 100 && version_on(node, shards[third]) != 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(version_on(node, shards[third]) == 3);
  auto t1 = runtime::pull_snapshot(node, shards[third], "sql", 3, timeout);
  REQUIRE(t1.ok);
  CHECK(t1.checksum == b1.checksum);
  CHECK(fedmoe::test::status_of(node, coord)["divergent"].empty());
}

TEST_CASE("replication: a backup restarted with nothing is seeded again by its primary, then follows it",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  auto fed = fedmoe::test::start_federation(node, 2, 2, 2000, policy);
  std::string error;
  auto map = runtime::register_expert(node, fed.coordinator, spec("sql"), timeout, &error);
  INFO(error);
  REQUIRE(map);
  const std::string primary = map->placements[0].replicas[0].shard_id, backup = map->placements[0].replicas[1].shard_id;
  REQUIRE(runtime::push_snapshot(node, fed.shards[primary], snapshot_of(0, 0.0f), timeout).ok);
  auto push = [&](int i) {
    auto u = update_of("u" + std::to_string(i), "w", uint64_t(i), 1, 0.5f + float(i));
    auto r = runtime::push_update(node, fed.shards[primary], u, timeout);
    REQUIRE(r.accepted);
  };
  for (int i = 0; i < 50 && version_on(node, fed.shards[backup]) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  push(0);
  push(1);
  REQUIRE(version_on(node, fed.shards[backup]) == 2);

  // The backup restarts within its lease holding nothing (a new disk): the same id, a new actor.
  caf::anon_send_exit(fed.shards[backup], caf::exit_reason::kill);
  actors::ShardOptions so;
  so.store.policy = policy;
  so.membership.coordinator = fed.coordinator;
  so.membership.heartbeat_ms = 100;
  auto restarted = node.own(node.system().spawn(actors::expert_shard_node, backup, node.transport(), so));
  // Its Hello gives the primary its new handle: the primary seeds it again with what it holds.
  for (int i = 0; i < 100 && version_on(node, restarted) != 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(version_on(node, restarted) == 2);
  push(2);  // and forwarded updates apply on top of it again
  CHECK(version_on(node, restarted) == 3);
  auto p = runtime::pull_snapshot(node, fed.shards[primary], "sql", 3, timeout);
  auto b = runtime::pull_snapshot(node, restarted, "sql", 3, timeout);
  REQUIRE(p.ok);
  REQUIRE(b.ok);
  CHECK(p.checksum == b.checksum);
  auto replication = fedmoe::test::status_of(node, fed.shards[primary])["replication"];
  CHECK(replication["seeds_sent"].get<int>() >= 2);  // one at the start of its term, one after the restart
  CHECK(replication["leading"]["sql"]["followers"][backup]["synced"] == true);
  CHECK(replication["leading"]["sql"]["followers"][backup]["acked_lsn"] == 3);
}

TEST_CASE("coordinator status: replicas' checksums per version, and replicas that diverged",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  auto fed = fedmoe::test::start_federation(node, 3, 2, 2000, policy);
  // The same expert and version with different bytes on shard-0 and shard-1 (pushed straight to them,
  // as no primary would), the same bytes on shard-2.
  for (const auto& [id, shard] : fed.shards)
    REQUIRE(runtime::push_snapshot(node, shard, snapshot_of(1, id == "shard-1" ? 1.0f : 0.0f), timeout).ok);
  auto st = fedmoe::test::status_of(node, fed.coordinator);
  CHECK(st["expert_checksums"]["sql"].size() == 3);
  CHECK(st["expert_checksums"]["sql"]["shard-0"] == st["expert_checksums"]["sql"]["shard-2"]);
  REQUIRE(st["divergent"].size() == 1);
  CHECK(st["divergent"][0]["expert_id"] == "sql");
  CHECK(st["divergent"][0]["version"] == 1);
  CHECK(st["divergent"][0]["shard"] == "shard-1");
}

TEST_CASE("replication under FedAvg with a round deadline: backups close the round with their primary",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedavg";
  policy.clients_per_round = 5;  // never reached: the deadline closes each round
  policy.min_updates = 1;
  policy.round_deadline_ms = 300;
  auto fed = fedmoe::test::start_federation(node, 2, 2, 2000, policy);
  auto& coord = fed.coordinator;
  auto& shards = fed.shards;
  std::string error;
  auto map = runtime::register_expert(node, coord, spec("sql"), timeout, &error);
  INFO(error);
  REQUIRE(map);
  const std::string primary = map->placements[0].replicas[0].shard_id, backup = map->placements[0].replicas[1].shard_id;
  REQUIRE(runtime::push_snapshot(node, shards[primary], snapshot_of(0, 0.0f), timeout).ok);
  auto expert_status = [&](const std::string& id) {
    auto s = runtime::node_status(node, shards[id], timeout, &error);
    REQUIRE(s);
    auto j = nlohmann::json::parse(*s);
    return j["experts"].empty() ? nlohmann::json() : j["experts"][0];
  };
  for (int i = 0; i < 50 && expert_status(backup).is_null(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE_FALSE(expert_status(backup).is_null());

  auto update = [&](int i, float value) {
    return update_of("u" + std::to_string(i), "w" + std::to_string(i), 0, uint64_t(i + 1), value);
  };
  // A worker pushing to the backup is sent to the primary.
  auto redirected = runtime::push_update(node, shards[backup], update(9, 1.0f), timeout);
  REQUIRE(redirected.ok);
  CHECK_FALSE(redirected.accepted);
  CHECK(redirected.reject.reason == net::RejectReason::not_replica);
  CHECK_THAT(redirected.reject.detail, Catch::Contains("the primary of 'sql' is " + primary));

  REQUIRE(runtime::push_update(node, shards[primary], update(0, 1.0f), timeout).accepted);
  REQUIRE(runtime::push_update(node, shards[primary], update(1, 4.0f), timeout).accepted);
  CHECK(expert_status(backup)["pending"] == 2);  // buffered on both, no deadline of its own
  nlohmann::json p, b;
  for (int i = 0; i < 100; ++i) {
    p = expert_status(primary);
    b = expert_status(backup);
    if (p["version"] == 1 && b["version"] == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(p["version"] == 1);
  CHECK(b["version"] == 1);
  CHECK(b["pending"] == 0);
  CHECK(b["checksum"] == p["checksum"]);  // the same round, closed the same way: bit-identical
}

TEST_CASE("acks=all: a silent replica leaves the in-sync set, fewer than min-insync acknowledge nothing, a restarted one catches up",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(30'000);
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  actors::CoordinatorOptions co;
  co.registry = {3, 60'000, 2};  // a lease far longer than the test: silent replicas stay "alive"
  auto coord = node.own(node.system().spawn(actors::coordinator, node.transport(), co));
  auto shard_options = [&] {
    actors::ShardOptions so;
    so.store.policy = policy;
    so.membership.coordinator = coord;
    so.membership.heartbeat_ms = 100;
    so.replication_timeout_ms = 300;
    return so;
  };
  std::map<std::string, caf::actor> shards;
  for (int i = 0; i < 3; ++i) {
    const auto id = "shard-" + std::to_string(i);
    shards[id] = node.own(node.system().spawn(actors::expert_shard_node, id, node.transport(), shard_options()));
  }
  for (int i = 0; i < 100 && fedmoe::test::status_of(node, coord)["members"].size() < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::string error;
  auto map = runtime::register_expert(node, coord, spec("sql"), timeout, &error);
  INFO(error);
  REQUIRE(map);
  REQUIRE(map->placements[0].in_sync.size() == 3);
  CHECK(map->placements[0].min_in_sync == 2);
  const auto primary = map->placements[0].in_sync[0], b1 = map->placements[0].in_sync[1],
             b2 = map->placements[0].in_sync[2];
  REQUIRE(runtime::push_snapshot(node, shards[primary], snapshot_of(0, 0.0f), timeout).ok);
  for (int i = 0; i < 100 && (version_on(node, shards[b1]) != 0 || version_on(node, shards[b2]) != 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto push = [&](const std::string& id, uint64_t base) {
    return runtime::push_update(node, shards[primary], update_of(id, "w", base, 1, 1.0f), timeout);
  };
  auto in_sync = [&] {
    const auto status = fedmoe::test::status_of(node, coord);
    for (const auto& p : status["placement_map"])
      if (p["expert_id"] == "sql") return p["in_sync"].get<std::vector<std::string>>();
    return std::vector<std::string>{};
  };
  auto r = push("u0", 0);
  REQUIRE(r.accepted);
  CHECK(version_on(node, shards[b1]) == 1);  // acknowledged = held by every in-sync replica
  CHECK(version_on(node, shards[b2]) == 1);

  // b1 stops answering (its actor is gone; the coordinator still counts it alive): the next push is
  // acknowledged once the primary has had it taken out of the in-sync set, not around it.
  caf::anon_send_exit(shards[b1], caf::exit_reason::kill);
  r = push("u1", 1);
  REQUIRE(r.accepted);
  CHECK(in_sync() == std::vector<std::string>{primary, b2});
  CHECK(version_on(node, shards[b2]) == 2);
  auto replication = fedmoe::test::status_of(node, shards[primary])["replication"];
  CHECK(replication["isr_shrinks_asked"].get<int>() >= 1);
  CHECK(replication["leading"]["sql"]["in_sync"].size() == 2);

  // b2 too: one in-sync replica is fewer than min-insync 2. The push in flight is refused, not
  // acknowledged, and so is the next one, at once.
  caf::anon_send_exit(shards[b2], caf::exit_reason::kill);
  r = push("u2", 2);
  REQUIRE(r.ok);
  CHECK_FALSE(r.accepted);
  CHECK(r.reject.reason == net::RejectReason::not_enough_replicas);
  r = push("u3", 2);
  CHECK(r.reject.reason == net::RejectReason::not_enough_replicas);
  CHECK_THAT(r.reject.detail, Catch::Contains("1 of 'sql' replicas are in sync, 2 are needed"));
  CHECK(in_sync() == std::vector<std::string>{primary});

  // b1 comes back with nothing (a new disk): seeded, caught up, back in the set; u2, held by the
  // primary but never acknowledged, commits with it, and its retry is answered as held.
  shards[b1] = node.own(node.system().spawn(actors::expert_shard_node, b1, node.transport(), shard_options()));
  for (int i = 0; i < 200 && in_sync().size() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(in_sync() == std::vector<std::string>{primary, b1});
  CHECK(version_on(node, shards[b1]) == 3);
  r = push("u2", 2);
  REQUIRE(r.ok);
  CHECK(r.reject.reason == net::RejectReason::duplicate_update);  // applied once; the worker counts it acknowledged
  r = push("u4", 3);
  REQUIRE(r.accepted);
  auto p = runtime::pull_snapshot(node, shards[primary], "sql", 4, timeout);
  auto b = runtime::pull_snapshot(node, shards[b1], "sql", 4, timeout);
  REQUIRE(p.ok);
  REQUIRE(b.ok);
  CHECK(p.checksum == b.checksum);
  CHECK(fedmoe::test::status_of(node, shards[primary])["replication"]["isr_expands_asked"].get<int>() >= 1);
}

TEST_CASE("fencing: a replica refuses an older term and entries without its term's seed, holds back entries that overtook others - a primary without its lease acknowledges nothing",
          "[coordinator][replication]") {
  const auto timeout = std::chrono::milliseconds(10'000);
  runtime::NodeSystem node;
  caf::scoped_actor client{node.system()};
  auto ask = [&](const caf::actor& to, net::Body body, uint64_t correlation = 7) {
    net::Message m;
    m.sender_id = "shard-p";
    m.correlation_id = correlation;
    m.body = std::move(body);
    node.transport()->send(caf::actor{client}, to, m);
    auto r = node.transport()->await(client, timeout);
    REQUIRE(r);
    REQUIRE(*r);
    return r->value();
  };
  auto refused = [&](const net::Message& m) {
    REQUIRE(std::holds_alternative<net::ReplicaAck>(m.body));
    return std::get<net::ReplicaAck>(m.body).refused;
  };
  // A replica seeded under term 3, then appended to.
  auto replica = node.own(node.system().spawn(actors::expert_shard, "shard-r", node.transport()));
  actors::ExpertStore primary_store({});
  primary_store.install(snapshot_of(0, 0.0f));
  auto seed = primary_store.seed("sql");
  seed.term = 3;
  CHECK(refused(ask(replica, seed)) == "");
  std::vector<net::LogEntry> entries;
  std::vector<uint64_t> checksums;  // the primary's after each entry
  for (int i = 0; i < 3; ++i) {
    entries.push_back(primary_store.push(update_of("u" + std::to_string(i), "w", uint64_t(i), 1, 1.0f), 3).entry);
    checksums.push_back(primary_store.receipt("sql").checksum);
  }
  CHECK(refused(ask(replica, net::ReplicaAppend{"sql", 2, 0, {entries[0]}})) == "stale_term");
  // Entry 2 overtakes entry 1 (a bulk transfer and an inline message): held back, not applied, not
  // refused; entry 1 then brings both in, in order. (The primary says both are committed: readers of
  // the replica may see v2.)
  auto early = ask(replica, net::ReplicaAppend{"sql", 3, 2, {entries[1]}});
  CHECK(refused(early) == "");
  CHECK(std::get<net::ReplicaAck>(early.body).lsn == 0);
  auto ack = ask(replica, net::ReplicaAppend{"sql", 3, 2, {entries[0]}});
  CHECK(refused(ack) == "");
  CHECK(std::get<net::ReplicaAck>(ack.body).lsn == 2);
  CHECK(std::get<net::ReplicaAck>(ack.body).checksum == checksums[1]);
  // A newer term's primary must seed it before it takes that term's entries; after that the old
  // term is refused.
  CHECK(refused(ask(replica, net::ReplicaAppend{"sql", 4, 0, {entries[2]}})) == "need_snapshot");
  CHECK(refused(ask(replica, net::ReplicaAppend{"sql", 3, 0, {entries[2]}})) == "stale_term");
  CHECK(version_on(node, replica) == 2);

  // A primary whose coordinator stops answering: within half the lease it acknowledges; past it,
  // nothing (another primary may lead on the other side of a partition); the lease renewed, again.
  caf::scoped_actor coordinator{node.system()};
  actors::ShardOptions so;
  so.membership.coordinator = caf::actor{coordinator};
  so.membership.heartbeat_ms = 60'000;  // the test answers for the coordinator
  auto shard = node.own(node.system().spawn(actors::expert_shard_node, "shard-p", node.transport(), so));
  auto from_coordinator = [&](net::Body body) {
    net::Message m;
    m.sender_id = "coordinator";
    m.body = std::move(body);
    node.transport()->send(caf::actor{coordinator}, shard, m);
  };
  net::PlacementMap map;
  map.epoch = 1;
  map.placements.push_back({"sql", {{"shard-p", "", 0, true}}, 1, {"shard-p"}, 1});
  REQUIRE(runtime::push_snapshot(node, shard, snapshot_of(0, 0.0f), timeout).ok);
  from_coordinator(net::HelloAck{true, 400, "", "coordinator"});
  from_coordinator(map);
  auto r = runtime::push_update(node, shard, update_of("p0", "w", 0, 1, 1.0f), timeout);
  CHECK(r.accepted);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // > lease / 2
  r = runtime::push_update(node, shard, update_of("p1", "w", 1, 1, 1.0f), timeout);
  REQUIRE(r.ok);
  CHECK(r.reject.reason == net::RejectReason::not_enough_replicas);
  CHECK_THAT(r.reject.detail, Catch::Contains("no word from the coordinator"));
  from_coordinator(net::HelloAck{true, 400, "", "coordinator"});
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(runtime::push_update(node, shard, update_of("p1", "w", 1, 1, 1.0f), timeout).accepted);
  auto status = fedmoe::test::status_of(node, shard)["replication"];
  CHECK(status["lease_expired"] == 1);
  CHECK(status["leading"]["sql"]["term"] == 1);
}
