// Tests of actors/expert_store and the expert-shard actor's update path: updates folded through the
// policy, pulls of immutable versions, every rejection reason counted in status, nothing applied
// twice, and durability (a new store on the same directory reaches exactly the acknowledged state,
// buffered updates and closed rounds included; a torn log tail is dropped).
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include <cmath>
#include <filesystem>
#include <thread>
#include <fstream>

#include <nlohmann/json.hpp>

#include "actors/expert_shard.hpp"
#include "actors/expert_store.hpp"
#include "actors/tensor_bridge.hpp"
#include "net/checksum.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"
#include "model_test_util.hpp"

using namespace fedmoe;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

using fedmoe::test::SmallDisk;
using fedmoe::test::TempDir;

// A rank-2 LoRA pair on one 4x3 projection, PEFT names.
net::ExpertSnapshot initial(const std::string& id = "sql", uint64_t version = 0) {
  net::ExpertSnapshot s;
  s.spec.expert_id = id;
  s.spec.domain = id;
  s.spec.lora_rank = 2;
  s.spec.target_modules = {"q_proj"};
  s.version = version;
  s.tensors.push_back(actors::to_wire("a", torch::arange(6, torch::kFloat32).reshape({2, 3})));  // [2, 3]
  s.tensors.push_back(actors::to_wire("b", torch::zeros({4, 2})));                               // [4, 2]
  return s;
}

net::UpdatePush update(const std::string& id, uint64_t base, float value, const std::string& expert = "sql",
                       const std::string& worker = "w1", uint64_t samples = 10) {
  net::UpdatePush u;
  u.expert_id = expert;
  u.worker_id = worker;
  u.update_id = id;
  u.base_version = base;
  u.sample_count = samples;
  u.train_loss = 1.5f;
  u.deltas.push_back(actors::to_wire("a", torch::full({2, 3}, value)));
  u.deltas.push_back(actors::to_wire("b", torch::full({4, 2}, -value)));
  return u;
}

torch::Tensor weight(const actors::ExpertStore& store, const std::string& name, const std::string& expert = "sql") {
  return store.find(expert)->weights.weights.at(name);
}

actors::ExpertStoreOptions options(const std::string& policy, const std::string& dir = "") {
  actors::ExpertStoreOptions o;
  o.policy.name = policy;
  o.policy.alpha = 0.5;
  o.policy.staleness_function = model::StalenessFunction::Kind::constant;
  o.policy.buffer_size = 3;
  o.policy.clients_per_round = 3;
  o.policy.max_staleness = 4;
  o.state_dir = dir;
  o.snapshot_every = 100;
  return o;
}

}  // namespace

TEST_CASE("store: updates fold through the policy - pulled versions never change", "[store]") {
  actors::ExpertStore store(options("fedasync"));
  auto receipt = store.install(initial());
  CHECK(receipt.version == 0);
  CHECK(receipt.tensor_count == 2);
  auto v0 = store.find("sql")->published;  // what a pull of version 0 got

  auto r = store.push(update("u1", 0, 2.0f));
  REQUIRE(r.accepted);
  CHECK(r.applied);
  CHECK(r.ack.new_version == 1);
  CHECK(r.ack.staleness == 0);
  CHECK(r.ack.weight == Approx(0.5));
  // FedAsync, alpha 0.5, constant s: x + 0.5 * d
  CHECK(torch::allclose(weight(store, "a"), torch::arange(6, torch::kFloat32).reshape({2, 3}) + 1.0));
  CHECK(torch::allclose(weight(store, "b"), torch::full({4, 2}, -1.0)));
  CHECK(store.find("sql")->published.version == 1);
  CHECK(actors::from_wire(v0.tensors[0]).equal(torch::arange(6, torch::kFloat32).reshape({2, 3})));  // untouched

  // A stale update (base 0, expert at 1) mixes with version 0's weights: x_new = x0 + d.
  auto stale = store.push(update("u2", 0, 4.0f));
  REQUIRE(stale.accepted);
  CHECK(stale.ack.staleness == 1);
  // x = 0.5 * x1 + 0.5 * (x0 + 4) = 0.5 * (x0 + 1) + 0.5 * (x0 + 4) = x0 + 2.5
  CHECK(torch::allclose(weight(store, "a"), torch::arange(6, torch::kFloat32).reshape({2, 3}) + 2.5));
  CHECK(store.find("sql")->staleness_histogram.at(1) == 1);
}

TEST_CASE("store: every bad update is rejected with its reason and counted", "[store]") {
  actors::ExpertStore store(options("fedasync"));
  store.install(initial());
  REQUIRE(store.push(update("ok", 0, 1.0f)).accepted);
  auto before = weight(store, "a").clone();

  auto expect = [&](net::UpdatePush u, net::RejectReason reason, const std::string& words) {
    auto r = store.push(u);
    CHECK_FALSE(r.accepted);
    CHECK(r.reject.reason == reason);
    CHECK_THAT(r.reject.detail, Contains(words));
    CHECK(weight(store, "a").equal(before));
  };
  expect(update("ok", 1, 1.0f), net::RejectReason::duplicate_update, "already accepted");
  expect(update("x1", 1, 1.0f, "docs"), net::RejectReason::unknown_expert, "no expert 'docs'");
  expect(update("x2", 1, NAN), net::RejectReason::non_finite, "NaN or Inf");
  auto shape = update("x3", 1, 1.0f);
  shape.deltas[1] = actors::to_wire("b", torch::zeros({2, 4}));
  expect(shape, net::RejectReason::shape_mismatch, "has shape [2, 4]");
  auto twice = update("x4", 1, 1.0f);
  twice.deltas.push_back(twice.deltas[0]);
  expect(twice, net::RejectReason::shape_mismatch, "appears twice");
  for (int i = 0; i < 5; ++i) REQUIRE(store.push(update("v" + std::to_string(i), 1 + i, 0.0f)).accepted);
  expect(update("x5", 1, 1.0f), net::RejectReason::too_stale, "exceeds max_staleness 4");
  before = weight(store, "a").clone();
  expect(update("x6", 99, 1.0f), net::RejectReason::malformed, "expert is at version 6");

  auto status = store.status();
  REQUIRE(status.size() == 1);
  auto rejected = status[0]["rejected"];
  CHECK(rejected["duplicate_update"] == 1);
  CHECK(rejected["non_finite"] == 1);
  CHECK(rejected["shape_mismatch"] == 2);
  CHECK(rejected["too_stale"] == 1);
  CHECK(rejected["malformed"] == 1);
  CHECK(status[0]["accepted"] == 6);
  CHECK(status[0]["workers"]["w1"]["accepted"] == 6);
  CHECK(status[0]["version"] == 6);
}

TEST_CASE("store: a restarted store reaches exactly the acknowledged state", "[store]") {
  for (const char* policy : {"fedasync", "fedbuff", "fedavg"}) {
    INFO(policy);
    TempDir dir;
    actors::ExpertStore memory(options(policy));  // the same sequence without a directory
    memory.install(initial());
    std::vector<net::UpdatePush> sequence;
    {
      actors::ExpertStore store(options(policy, dir.path.string()));
      store.install(initial());
      for (int i = 0; i < 5; ++i) {
        // Trained from the version the expert is at (FedAvg refuses earlier rounds' updates).
        sequence.push_back(update("u" + std::to_string(i), memory.find("sql")->weights.version, 0.5f * float(i + 1),
                                  "sql", "w" + std::to_string(i % 2), 10 + i));
        REQUIRE(memory.push(sequence.back()).accepted);
        REQUIRE(store.push(sequence.back()).accepted);
      }
      // FedAvg: 3 updates closed round 1, 2 wait in round 2 until its deadline closes it (logged too).
      if (std::string(policy) == "fedavg") CHECK(store.close_round("sql"));
    }  // the store is gone; only the directory remains
    if (std::string(policy) == "fedavg") memory.close_round("sql");
    actors::ExpertStore again(options(policy, dir.path.string()));
    REQUIRE(again.contains("sql"));
    const auto* e = again.find("sql");
    const auto* m = memory.find("sql");
    CHECK(e->weights.version == m->weights.version);
    CHECK(e->policy->pending() == m->policy->pending());
    for (const auto& [name, w] : m->weights.weights) CHECK(e->weights.weights.at(name).equal(w));
    CHECK(e->seen.size() == 5);
    // Acknowledged ids stay known: a retried update is not applied twice.
    CHECK(again.push(sequence[2]).reject.reason == net::RejectReason::duplicate_update);
    // And the federation goes on from there identically.
    auto next = update("u9", e->weights.version, 1.0f);
    auto a = again.push(next), b = memory.push(next);
    CHECK(a.accepted == b.accepted);
    for (const auto& [name, w] : memory.find("sql")->weights.weights) CHECK(again.find("sql")->weights.weights.at(name).equal(w));
  }
}

TEST_CASE("store: a torn log tail is dropped, snapshots restart the log", "[store]") {
  TempDir dir;
  auto o = options("fedasync", dir.path.string());
  o.snapshot_every = 2;
  {
    actors::ExpertStore store(o);
    store.install(initial());
    for (int i = 0; i < 3; ++i) REQUIRE(store.push(update("u" + std::to_string(i), uint64_t(i), 1.0f)).accepted);
    CHECK(store.find("sql")->snapshot_version == 2);  // versions 1, 2 in the snapshot; 3 in the log
  }
  auto log = dir.path / "sql" / "updates.log";
  const auto good_size = fs::file_size(log);
  CHECK(good_size > 0);
  {
    std::ofstream(log, std::ios::app | std::ios::binary) << "FMLG and then the machine lost power";
  }
  actors::ExpertStore again(o);
  CHECK(again.find("sql")->weights.version == 3);
  CHECK(fs::file_size(log) == good_size);  // the torn tail was cut off
  CHECK(again.push(update("u3", 3, 1.0f)).accepted);

  SECTION("a corrupt snapshot is an error naming the file") {
    { std::ofstream(dir.path / "sql" / "snapshot.safetensors", std::ios::trunc) << "not a snapshot"; }
    CHECK_THROWS_WITH(actors::ExpertStore(o), Contains("snapshot.safetensors"));
  }
}

TEST_CASE("store: a damaged record with acknowledged records after it is an error, never a silent drop", "[store]") {
  TempDir dir;
  auto o = options("fedasync", dir.path.string());
  {
    actors::ExpertStore store(o);
    store.install(initial());
    for (int i = 0; i < 3; ++i) REQUIRE(store.push(update("u" + std::to_string(i), uint64_t(i), 1.0f)).accepted);
  }
  auto log = dir.path / "sql" / "updates.log";
  {
    std::fstream f(log, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);  // inside the first record's payload
    f.put('\x5a');
  }
  CHECK_THROWS_WITH(actors::ExpertStore(o), Contains("refusing to drop acknowledged updates") && Contains("updates.log"));
}

TEST_CASE("store: a full disk refuses the update with a StorageError, changes nothing, loses nothing acknowledged",
          "[store][disk]") {
  for (const char* policy : {"fedasync", "fedbuff"}) {
    INFO(policy);
    SmallDisk disk("64k");
    if (!disk.mounted) return;
    auto o = options(policy, (disk.dir.path / "state").string());
    o.snapshot_every = 1000;  // the log grows until the disk is full
    actors::ExpertStore memory(options(policy));  // receives exactly what the store acknowledged
    memory.install(initial());
    std::vector<net::UpdatePush> acknowledged;
    std::optional<net::UpdatePush> refused;
    {
      actors::ExpertStore store(o);
      store.install(initial());
      disk.fill(6 * 4096);  // leave a few KiB
      for (int i = 0; i < 400 && !refused; ++i) {
        auto u = update("u" + std::to_string(i), store.find("sql")->weights.version, 0.01f * float(i + 1));
        const auto before_version = store.find("sql")->weights.version;
        const auto before_checksum = net::checksum(store.find("sql")->published.tensors);
        const auto before_pending = store.find("sql")->policy->pending();
        std::string failure;
        actors::PushResult result;
        try {
          result = store.push(u);
        } catch (const actors::StorageError& e) {
          failure = e.what();
        }
        if (failure.empty()) {
          REQUIRE(result.accepted);
          REQUIRE(memory.push(u).accepted);
          acknowledged.push_back(u);
        } else {
          CHECK_THAT(failure, Contains("No space left on device"));
          refused = u;
          // Nothing changed: same version, same published bytes, same buffered updates, id not taken.
          const auto* after = store.find("sql");
          CHECK(after->weights.version == before_version);
          CHECK(net::checksum(after->published.tensors) == before_checksum);
          CHECK(after->policy->pending() == before_pending);
          CHECK(after->seen.count(u.update_id) == 0);
          CHECK(after->failed.empty());
          CHECK(after->storage_errors == 1);
          CHECK_THROWS_AS(store.push(u), actors::StorageError);  // still full: refused again, still no crash
        }
      }
      REQUIRE(refused);
      REQUIRE(acknowledged.size() >= 2);
      disk.free();  // space again: the same update goes through now
      REQUIRE(store.push(*refused).accepted);
      REQUIRE(memory.push(*refused).accepted);
      acknowledged.push_back(*refused);
    }
    actors::ExpertStore again(o);  // a restart finds every acknowledged update, nothing else
    const auto* e = again.find("sql");
    const auto* m = memory.find("sql");
    CHECK(e->weights.version == m->weights.version);
    CHECK(e->policy->pending() == m->policy->pending());
    for (const auto& [name, w] : m->weights.weights) CHECK(e->weights.weights.at(name).equal(w));
    for (const auto& u : acknowledged) CHECK(again.push(u).reject.reason == net::RejectReason::duplicate_update);
  }
}

TEST_CASE("shard actor: UpdatePush gets UpdateAck or UpdateReject, status counts them", "[store][shard]") {
  runtime::NodeSystem node;
  auto o = options("fedasync");
  auto shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("shard-u"), node.transport(), o));
  const auto timeout = std::chrono::milliseconds(30'000);
  REQUIRE(runtime::push_snapshot(node, shard, initial(), timeout).ok);
  auto ok = runtime::push_update(node, shard, update("u1", 0, 2.0f), timeout);
  REQUIRE(ok.ok);
  CHECK(ok.accepted);
  CHECK(ok.ack.new_version == 1);
  auto dup = runtime::push_update(node, shard, update("u1", 0, 2.0f), timeout);
  REQUIRE(dup.ok);
  CHECK_FALSE(dup.accepted);
  CHECK(dup.reject.reason == net::RejectReason::duplicate_update);
  auto pulled = runtime::pull_snapshot(node, shard, "sql", 1, timeout);
  REQUIRE(pulled.ok);
  CHECK(pulled.snapshot.version == 1);
  std::string error;
  auto status = runtime::node_status(node, shard, timeout, &error);
  REQUIRE(status);
  auto j = nlohmann::json::parse(*status);
  CHECK(j["updates_received"] == 2);
  CHECK(j["experts"][0]["rejected"]["duplicate_update"] == 1);
  CHECK(j["experts"][0]["version"] == 1);
}

TEST_CASE("shard actor: a FedAvg round closes at its deadline with the updates that arrived", "[store][shard]") {
  runtime::NodeSystem node;
  auto o = options("fedavg");
  o.policy.clients_per_round = 3;
  o.policy.round_deadline_ms = 150;
  auto shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("shard-r"), node.transport(), o));
  const auto timeout = std::chrono::milliseconds(30'000);
  REQUIRE(runtime::push_snapshot(node, shard, initial(), timeout).ok);
  auto first = runtime::push_update(node, shard, update("u1", 0, 2.0f, "sql", "w1", 10), timeout);
  REQUIRE(first.accepted);
  CHECK(first.ack.new_version == 0);  // buffered in round 1
  REQUIRE(runtime::push_update(node, shard, update("u2", 0, 4.0f, "sql", "w2", 30), timeout).accepted);
  // The deadline passes with 2 of 3 updates: the round closes with them, weighted 10:30.
  auto pulled = runtime::pull_snapshot(node, shard, "sql", 1, timeout);
  for (int i = 0; i < 100 && !pulled.ok; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pulled = runtime::pull_snapshot(node, shard, "sql", 1, timeout);
  }
  REQUIRE(pulled.ok);
  CHECK(pulled.snapshot.version == 1);
  auto a = actors::from_wire(pulled.snapshot.tensors[0]);
  CHECK(torch::allclose(a, torch::arange(6, torch::kFloat32).reshape({2, 3}) + 3.5));  // (10*2 + 30*4) / 40
  // A straggler of the closed round is too stale.
  auto late = runtime::push_update(node, shard, update("u3", 0, 1.0f), timeout);
  REQUIRE(late.ok);
  CHECK(late.reject.reason == net::RejectReason::too_stale);
}

TEST_CASE("store: a seeding snapshot hands over the update ids already folded in, durably", "[store]") {
  TempDir dir;
  auto seed = initial("sql", 4);
  seed.seen_update_ids = {"u0", "u1", "u2"};
  {
    actors::ExpertStore store(options("fedasync", dir.path.string()));
    store.install(seed);
    CHECK(store.find("sql")->seen.size() == 3);
    CHECK(store.find("sql")->published.seen_update_ids.empty());  // pulls carry the weights only
    CHECK(store.push(update("u1", 4, 1.0f)).reject.reason == net::RejectReason::duplicate_update);
    CHECK(store.push(update("u3", 4, 1.0f)).accepted);
  }
  actors::ExpertStore again(options("fedasync", dir.path.string()));  // restarted from the directory
  CHECK(again.find("sql")->seen.size() == 4);
  CHECK(again.push(update("u0", 5, 1.0f)).reject.reason == net::RejectReason::duplicate_update);
  CHECK(again.push(update("u3", 5, 1.0f)).reject.reason == net::RejectReason::duplicate_update);
}

TEST_CASE("store: the id window is bounded on disk too - appended at snapshots, compacted at twice the retention",
          "[store]") {
  TempDir dir;
  auto o = options("fedasync", dir.path.string());
  o.snapshot_every = 1;
  o.id_retention = 4;
  const auto ids_file = dir.path / "sql" / "update_ids";
  auto lines = [&] {
    std::ifstream in(ids_file);
    size_t n = 0;
    for (std::string line; std::getline(in, line);) ++n;
    return n;
  };
  {
    actors::ExpertStore store(o);
    store.install(initial());
    for (int i = 0; i < 20; ++i) {
      REQUIRE(store.push(update("u" + std::to_string(i), uint64_t(i), 0.1f)).accepted);
      CHECK(lines() <= 8);                         // never more than twice the retention
      CHECK(store.find("sql")->seen.size() <= 5);  // the window, plus the id not yet snapshotted
    }
  }
  { std::ofstream(ids_file, std::ios::app) << "u-torn-by-a-cra"; }  // a crash mid-append
  actors::ExpertStore again(o);
  CHECK(lines() <= 8);  // the torn line was cut off
  for (int i = 16; i < 20; ++i)  // the retained window survives the restart
    CHECK(again.push(update("u" + std::to_string(i), 20, 0.1f)).reject.reason == net::RejectReason::duplicate_update);
  CHECK(again.find("sql")->seen.count("u-torn-by-a-cra") == 0);
}

namespace {
// The checksum of the weights `store` publishes for "sql" now.
uint64_t checksum_now(const actors::ExpertStore& store) { return store.receipt("sql").checksum; }
}  // namespace

TEST_CASE("replicated log: a replica fed the primary's entries holds the same bytes under every version",
          "[store][replication]") {
  for (const char* policy : {"fedasync", "fedbuff", "fedavg"}) {
    INFO(policy);
    TempDir dir;
    actors::ExpertStore primary(options(policy));
    primary.install(initial());
    // FedAsync mixes with the weights of the update's base version: updates trained from v1 and v2
    // arrive while the expert is at v3, v4 ...
    std::vector<uint64_t> bases;
    auto next_update = [&](int i) {
      const uint64_t v = primary.find("sql")->weights.version;
      const uint64_t base = std::string(policy) == "fedasync" && v >= 2 && i % 2 == 1 ? v - 1 : v;
      return update("u" + std::to_string(i), base, 0.25f * float(i + 1), "sql", "w" + std::to_string(i % 3), 10 + i);
    };
    for (int i = 0; i < 3; ++i) REQUIRE(primary.push(next_update(i), 1).accepted);
    // A replica placed now (FedAsync's history of v1, v2 lives only on the primary) with a state
    // directory, seeded from the primary mid-stream: its pending updates come with the seed.
    actors::ExpertStore replica(options(policy, dir.path.string()));
    auto seeded = replica.install(primary.seed("sql"));
    CHECK(seeded.lsn == primary.find("sql")->lsn);
    CHECK(seeded.checksum == checksum_now(primary));
    // The same seed, folding the raw updates itself as replicas did before the log held entries.
    actors::ExpertStore folding(options(policy));
    folding.install(primary.seed("sql"));
    bool folding_diverged = false;
    std::map<uint64_t, uint64_t> checksum_at;  // version -> the primary's checksum
    for (int i = 3; i < 12; ++i) {
      auto u = next_update(i);
      auto r = primary.push(u, 1);
      REQUIRE(r.accepted);
      CHECK(r.entry.lsn == primary.find("sql")->lsn);
      CHECK(r.entry.kind == (r.applied ? net::EntryKind::applied : net::EntryKind::buffered));
      replica.append("sql", r.entry);
      replica.append("sql", r.entry);  // a retransmission changes nothing
      folding.push(u);
      checksum_at[primary.find("sql")->weights.version] = checksum_now(primary);
      CHECK(replica.find("sql")->weights.version == primary.find("sql")->weights.version);
      CHECK(checksum_now(replica) == checksum_now(primary));
      CHECK(replica.find("sql")->policy->pending() == primary.find("sql")->policy->pending());
      if (folding.find("sql")->weights.version == primary.find("sql")->weights.version &&
          checksum_now(folding) != checksum_now(primary))
        folding_diverged = true;
    }
    // Why entries carry weights: FedAsync folded on a replica without the base's weights differs.
    if (std::string(policy) == "fedasync") CHECK(folding_diverged);
    // FedAvg's deadline: the round closed on the primary is an entry too.
    net::LogEntry closed;
    if (primary.close_round("sql", 1, &closed)) {
      CHECK(closed.kind == net::EntryKind::round_closed);
      replica.append("sql", closed);
      CHECK(checksum_now(replica) == checksum_now(primary));
    }
    // Restarted from its directory, the replica holds exactly the same, pending updates included.
    const auto held = replica.receipt("sql");
    actors::ExpertStore again(options(policy, dir.path.string()));
    CHECK(again.receipt("sql").lsn == held.lsn);
    CHECK(again.receipt("sql").version == held.version);
    CHECK(again.receipt("sql").checksum == held.checksum);
    CHECK(again.find("sql")->policy->pending() == primary.find("sql")->policy->pending());
    CHECK(again.find("sql")->pending_entries.size() == primary.find("sql")->pending_entries.size());
    CHECK(again.find("sql")->seen.size() == primary.find("sql")->seen.size());
  }
}

TEST_CASE("replicated log: a restarted primary replays to the bytes it acknowledged, whatever its history held",
          "[store][replication]") {
  TempDir dir;
  auto o = options("fedasync", dir.path.string());
  o.snapshot_every = 2;       // snapshots drop the history FedAsync mixes with
  o.history_versions = 2;
  std::map<uint64_t, uint64_t> acknowledged;  // version -> checksum when acknowledged
  {
    actors::ExpertStore store(o);
    store.install(initial());
    for (int i = 0; i < 9; ++i) {
      const uint64_t v = store.find("sql")->weights.version;
      auto r = store.push(update("u" + std::to_string(i), v >= 1 && i % 2 == 0 ? v - 1 : v, 0.5f + float(i)));
      REQUIRE(r.accepted);
      acknowledged[store.find("sql")->weights.version] = checksum_now(store);
    }
  }
  actors::ExpertStore again(o);
  const auto* e = again.find("sql");
  REQUIRE(e->weights.version == 9);
  CHECK(checksum_now(again) == acknowledged[9]);
  // Every version the log still holds replays to the acknowledged bytes.
  for (const auto& [version, weights] : e->history) {
    std::vector<net::Tensor> wire;
    for (const auto& [name, t] : weights) wire.push_back(actors::to_wire(name, t));
    CHECK(net::checksum(wire) == acknowledged[version]);
  }
}

TEST_CASE("replicated log: older terms, gaps and stale seeds are refused, a newer term's seed replaces a tail",
          "[store][replication]") {
  actors::ExpertStore primary(options("fedasync")), replica(options("fedasync"));
  primary.install(initial());
  auto seed = primary.seed("sql");
  seed.term = 2;
  replica.install(seed);
  std::vector<net::LogEntry> entries;
  for (int i = 0; i < 3; ++i) entries.push_back(primary.push(update("u" + std::to_string(i), uint64_t(i), 1.0f), 2).entry);
  auto refused = [&](const net::LogEntry& e) {
    try {
      replica.append("sql", e);
    } catch (const actors::ReplicaRefusal& r) {
      return r.code;
    }
    return std::string("applied");
  };
  CHECK(refused(entries[1]) == "gap");
  CHECK(replica.find("sql")->lsn == 0);
  CHECK(refused(entries[0]) == "applied");
  auto old_term = entries[1];
  old_term.term = 1;
  CHECK(refused(old_term) == "stale_term");
  CHECK(refused(entries[1]) == "applied");
  CHECK(refused(entries[2]) == "applied");
  CHECK(replica.receipt("sql").checksum == checksum_now(primary));
  auto unknown = entries[2];
  CHECK_THROWS_AS(actors::ExpertStore(options("fedasync")).append("sql", unknown), actors::ReplicaRefusal);

  // A seed of the same term that is not newer changes nothing...
  auto stale = seed;
  CHECK(replica.install(stale).lsn == 3);
  // ... but a new primary's seed (term 3) replaces even a longer tail (entries the old primary wrote
  // that never committed): the replica then holds the new primary's state exactly.
  actors::ExpertStore other(options("fedasync"));
  other.install(initial());
  other.push(update("x0", 0, -2.0f), 3);
  auto newer = other.seed("sql");
  newer.term = 3;
  auto r = replica.install(newer);
  CHECK(r.lsn == 1);
  CHECK(r.term == 3);
  CHECK(r.checksum == checksum_now(other));
  CHECK(refused(entries[2]) == "stale_term");
}
