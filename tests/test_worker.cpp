// The worker actor against real expert shards in one actor system: real local LoRA training on a
// tiny generated Qwen2 base with the real tokenizer, pushes folded by the shard, versions advancing,
// validation loss falling, staleness and heterogeneous speeds visible in status, and failover from a
// dead replica to a live one.
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <caf/send.hpp>
#include <nlohmann/json.hpp>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "actors/tensor_bridge.hpp"
#include "actors/worker.hpp"
#include "model/checkpoint.hpp"
#include "model/dataset.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"
#include "model_test_util.hpp"
#include "federation_test_util.hpp"

using namespace fedmoe;
namespace fs = std::filesystem;

namespace {

using fedmoe::test::status_of;
const std::string kTokenizer = fedmoe::test::kTokenizerPath;
const auto kTimeout = fedmoe::test::kFederationTimeout;

struct Fixture {
  fedmoe::test::TempDir tmp;
  const fs::path dir = tmp.path;
  model::Qwen2Config config;
  model::Tokenizer tok = model::Tokenizer::from_file(kTokenizer);
  Fixture() {
    config = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json");
    std::ofstream data(dir / "sql.jsonl");
    const char* tables[] = {"users", "orders", "items", "events"};
    for (int i = 0; i < 48; ++i)
      data << nlohmann::json{{"text", "SELECT id, name FROM " + std::string(tables[i % 4]) + " WHERE id = " +
                                          std::to_string(i) + " ORDER BY name;"}}.dump()
           << "\n";
  }

  // Each worker its own copy of the frozen base (in one process they could share one; separate
  // copies keep the workers' threads independent).
  std::shared_ptr<model::LocalTrainer> trainer(uint64_t seed, std::shared_ptr<model::ComputeSlots> slots = nullptr) {
    torch::manual_seed(7);  // the same base for everyone
    model::Qwen2ForCausalLM base(config);
    auto data = model::prepare(model::load_examples({(dir / "sql.jsonl").string()}), tok, 24, 0.2, seed);
    model::LocalTrainingConfig c;
    c.steps = 4;
    c.batch = 4;
    c.lr = 5e-3;
    c.seed = seed;
    c.compute_slots = std::move(slots);
    if (c.compute_slots) c.eval_batches = -1;  // its rounds' wall time is then its steps and slot waits
    return std::make_shared<model::LocalTrainer>(base, std::move(data), c);
  }

  net::ExpertSnapshot initial() {
    model::LoraSpec spec;
    spec.rank = 4, spec.alpha = 8, spec.target_modules = {"q_proj", "v_proj"};
    net::ExpertSnapshot s;
    s.spec = {"sql", "sql", 4, 8.0f, 0.0f, spec.target_modules, "fedmoe-tiny", false};
    s.tensors = actors::to_wire(model::make_lora_tensors(config, spec, model::LoraInit::peft, 3));
    return s;
  }
};


void wait_finished(runtime::NodeSystem& node, const std::vector<caf::actor>& workers) {
  for (int i = 0; i < 1200; ++i) {
    bool all = true;
    for (const auto& w : workers) all = all && status_of(node, w)["finished"].get<bool>();
    if (all) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  FAIL("the workers did not finish");
}

// A shard seeded with the fixture's expert, and two workers w0, w1 of it making 3 rounds each;
// `tune(options, i)` sets what differs between the tests (speeds, latencies, sync rounds).
struct ShardAndWorkers {
  caf::actor shard;
  std::vector<caf::actor> workers;
};
ShardAndWorkers shard_and_two_workers(Fixture& fx, runtime::NodeSystem& node, const model::PolicyConfig& policy,
                                      uint64_t seed, const std::function<void(actors::WorkerOptions&, int)>& tune) {
  actors::ExpertStoreOptions so;
  so.policy = policy;
  ShardAndWorkers out;
  out.shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("shard-1"), node.transport(), so));
  REQUIRE(runtime::push_snapshot(node, out.shard, fx.initial(), kTimeout).ok);
  for (int i = 0; i < 2; ++i) {
    actors::WorkerOptions o;
    o.worker_id = "w" + std::to_string(i);
    o.expert_id = "sql";
    o.replicas = {out.shard};
    o.trainer = fx.trainer(seed + i);
    o.rounds = 3;
    tune(o, i);
    out.workers.push_back(node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o)));
  }
  return out;
}

}  // namespace

TEST_CASE("workers train an expert through a shard: versions advance, validation loss falls", "[worker]") {
  Fixture fx;
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  policy.alpha = 0.8;
  auto [shard, workers] = shard_and_two_workers(fx, node, policy, 10, [](actors::WorkerOptions& o, int i) {
    o.speed_factor = i == 0 ? 1.0 : 1.5;  // w1 behaves like a slower device
    o.latency_ms = i == 0 ? 0 : 20;
  });
  wait_finished(node, workers);

  auto s = status_of(node, shard);
  auto expert = s["experts"][0];
  CHECK(expert["accepted"] == 6);
  CHECK(expert["version"] == 6);  // FedAsync: every accepted update is a version
  CHECK(expert["workers"].size() == 2);
  for (size_t i = 0; i < workers.size(); ++i) {
    auto w = status_of(node, workers[i]);
    INFO(w.dump());
    CHECK(w["rounds_done"] == 3);
    CHECK(w["accepted"] == 3);
    auto rounds = w["rounds"];
    // Local training helps on the worker's own validation split in every round...
    for (const auto& r : rounds) CHECK(r["val_loss_after"].get<double>() < r["val_loss_before"].get<double>());
    // ...and each round starts from a better shared expert than the first did.
    CHECK(rounds.back()["val_loss_before"].get<double>() < rounds.front()["val_loss_before"].get<double>());
  }
  auto slow = status_of(node, workers[1]);
  CHECK(slow["speed_factor"] == 1.5);
  CHECK(slow["rounds"][0]["delay_seconds"].get<double>() > 0);
}

TEST_CASE("a worker fails over from a dead replica to a live one", "[worker]") {
  Fixture fx;
  runtime::NodeSystem node;
  auto dead = node.system().spawn(actors::expert_shard, std::string("shard-dead"), node.transport());
  auto live = node.own(node.system().spawn(actors::expert_shard, std::string("shard-live"), node.transport()));
  REQUIRE(runtime::push_snapshot(node, live, fx.initial(), kTimeout).ok);
  caf::anon_send_exit(dead, caf::exit_reason::kill);

  actors::WorkerOptions o;
  o.worker_id = "w-failover";
  o.expert_id = "sql";
  o.replicas = {dead, live};
  o.trainer = fx.trainer(5);
  o.rounds = 1;
  o.reply_timeout_ms = 300;
  auto w = node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o));
  wait_finished(node, {w});
  auto s = status_of(node, w);
  CHECK(s["failovers"].get<int>() >= 1);
  CHECK(s["accepted"] == 1);
  CHECK(s["rounds"][0]["replica"] == "shard-live");
}

TEST_CASE("a worker whose push meets a full disk pushes the same update again once there is space", "[worker][disk]") {
  Fixture fx;
  fedmoe::test::SmallDisk disk("4m");
  if (!disk.mounted) return;
  runtime::NodeSystem node;
  actors::ExpertStoreOptions so;
  so.policy.name = "fedasync";
  so.state_dir = (disk.dir.path / "state").string();
  auto shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("shard-1"), node.transport(), so));
  REQUIRE(runtime::push_snapshot(node, shard, fx.initial(), kTimeout).ok);
  disk.fill();  // no room for the update's log record
  actors::WorkerOptions o;
  o.worker_id = "w-disk";
  o.expert_id = "sql";
  o.replicas = {shard};
  o.trainer = fx.trainer(9);
  o.rounds = 1;
  o.retry_ms = 20;
  auto w = node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o));
  for (int i = 0; i < 600 && status_of(node, w)["pushes_retried"].value("storage_error", 0) < 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  REQUIRE(status_of(node, w)["pushes_retried"].value("storage_error", 0) >= 2);  // refused while full...
  auto held = status_of(node, shard)["experts"][0];
  CHECK(held["version"] == 0);  // ...and nothing applied
  CHECK(held["storage_errors"].get<int>() >= 2);
  disk.free();
  wait_finished(node, {w});
  auto s = status_of(node, w);
  CHECK(s["accepted"] == 1);  // the same update, not a retrained one: one round, accepted
  CHECK(s["rounds_done"] == 1);
  CHECK(s["rounds"][0]["verdict"] == "accepted");
  auto after = status_of(node, shard)["experts"][0];
  CHECK(after["version"] == 1);
  CHECK(after["accepted"] == 1);
}

TEST_CASE("a worker follows the placement: its replicas come from the coordinator and change when one dies",
          "[worker][placement]") {
  Fixture fx;
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedasync";
  auto fed = fedmoe::test::start_federation(node, 3, 2, 400, policy);  // R = 2, dead after 400 ms of silence
  auto& coord = fed.coordinator;
  auto& shards = fed.shards;
  auto snap = fx.initial();
  std::string error;
  auto map = runtime::register_expert(node, coord, snap.spec, kTimeout, &error);
  INFO(error);
  REQUIRE(map);
  const std::string primary = map->placements[0].replicas[0].shard_id, backup = map->placements[0].replicas[1].shard_id;
  REQUIRE(runtime::push_snapshot(node, shards[primary], snap, kTimeout).ok);  // it seeds the backup

  actors::WorkerOptions o;
  o.worker_id = "w-follow";
  o.expert_id = "sql";  // no replicas given: the coordinator's map says where the expert lives
  o.trainer = fx.trainer(9);
  o.rounds = 6;
  o.reply_timeout_ms = 1000;
  o.membership.coordinator = coord;
  o.membership.heartbeat_ms = 100;
  auto w = node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o));
  for (int i = 0; i < 600 && status_of(node, w)["accepted"].get<int>() < 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(status_of(node, w)["replicas"] == nlohmann::json({primary, backup}));

  caf::anon_send_exit(shards[primary], caf::exit_reason::kill);  // after its lease: re-placed
  wait_finished(node, {w});
  auto s = status_of(node, w);
  INFO(s.dump());
  CHECK(s["accepted"] == 6);
  auto replicas = s["replicas"];
  REQUIRE(replicas.size() == 2);
  CHECK(replicas[0] == backup);  // the surviving replica is the primary now
  CHECK(replicas[1] != primary);
  // Every acknowledged update is on both live replicas, which agree: the new one was seeded, then
  // kept up to date. (One more is possible: a push the dying primary had forwarded but not yet
  // acknowledged; the worker then trained that round again.)
  auto version = [&](const std::string& id) { return status_of(node, shards[id])["experts"][0]["version"].get<int>(); };
  CHECK(version(backup) >= 6);
  CHECK(version(backup) <= 7);
  CHECK(version(replicas[1].get<std::string>()) == version(backup));
  CHECK(status_of(node, shards[backup])["experts"][0]["checksum"] ==
        status_of(node, shards[replicas[1].get<std::string>()])["experts"][0]["checksum"]);
}

TEST_CASE("sync-round workers under FedAvg: each round takes one update of each worker, the fast one waits",
          "[worker]") {
  Fixture fx;
  runtime::NodeSystem node;
  model::PolicyConfig policy;
  policy.name = "fedavg";
  policy.clients_per_round = 2;
  auto [shard, workers] = shard_and_two_workers(fx, node, policy, 20, [](actors::WorkerOptions& o, int i) {
    o.sync_rounds = true;
    o.speed_factor = i == 0 ? 1.0 : 3.0;  // w1 takes three times as long per round
  });
  wait_finished(node, workers);

  auto expert = status_of(node, shard)["experts"][0];
  INFO(expert.dump());
  CHECK(expert["accepted"] == 6);
  CHECK(expert["version"] == 3);  // three closed rounds of two updates each
  for (size_t i = 0; i < workers.size(); ++i) {
    auto w = status_of(node, workers[i]);
    INFO(w.dump());
    CHECK(w["accepted"] == 3);
    const auto& rounds = w["rounds"];
    REQUIRE(rounds.size() == 3);
    for (size_t r = 0; r < rounds.size(); ++r) {
      CHECK(rounds[r]["base_version"] == r);  // one round per version: never twice from the same one
      CHECK(rounds[r]["staleness"] == 0);
    }
  }
  // The fast worker waited at the barrier for the slow one, in the second and third rounds.
  const auto fast = status_of(node, workers[0])["rounds"];
  const auto slow = status_of(node, workers[1])["rounds"];
  CHECK(fast[1]["wait_seconds"].get<double>() > 0.5 * slow[0]["delay_seconds"].get<double>());
  CHECK(fast[2]["wait_seconds"].get<double>() > 0.5 * slow[1]["delay_seconds"].get<double>());
}

TEST_CASE("a slow device's emulated round time absorbs the time it waited for a shared compute slot",
          "[worker]") {
  Fixture fx;
  runtime::NodeSystem node;
  model::PolicyConfig policy;  // fedasync
  auto slots = std::make_shared<model::ComputeSlots>(1);  // two workers, one core between them
  auto [shard, workers] = shard_and_two_workers(fx, node, policy, 30, [&](actors::WorkerOptions& o, int i) {
    o.speed_factor = i == 0 ? 1.0 : 3.0;
    o.trainer = fx.trainer(30 + i, slots);
  });
  wait_finished(node, workers);
  double waited = 0, computed = 0;
  for (size_t i = 0; i < workers.size(); ++i) {
    const auto rounds = status_of(node, workers[i])["rounds"];
    REQUIRE(rounds.size() == 3);
    for (const auto& r : rounds) {
      INFO(r.dump());
      const double c = r["compute_seconds"].get<double>(), w = r["slot_wait_seconds"].get<double>(),
                   d = r["delay_seconds"].get<double>();
      CHECK(c > 0);
      CHECK(w >= 0);
      waited += w, computed += c;
      if (i == 0) {
        CHECK(d == 0);  // factor 1: no emulated slowness, whatever it waited
      } else if (w < 2 * c) {
        CHECK(c + w + d == Approx(3 * c).epsilon(1e-6));  // the wait is part of the 3x, not added to it
      } else {
        CHECK(d == 0);  // waited longer than its slack: it is late, not later still
      }
    }
  }
  CHECK(waited > 0.2 * computed);  // the two did contend for the one slot
}
