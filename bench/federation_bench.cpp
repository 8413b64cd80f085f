// How many worker updates per second an expert shard applies, for a rank-16 LoRA expert (q, k, v, o)
// of the demo base (examples/models/fedmoe-small.json) and of Qwen2-0.5B's shape, against the bare
// arithmetic in the same run (one torch add_ of the delta into the weights: the least any shard
// must do). Measured through:
//   store      actors::ExpertStore::push in memory (validation, policy, publishing the new version)
//   durable    the same with a state directory: every update logged and fdatasync'ed before the ack
//   actor      the expert-shard actor in this process: UpdatePush encoded, sent, decoded, applied,
//              UpdateAck back (runtime::push_update, one update in flight)
//   acks=all   a coordinator and three shards in this process, each with its own state directory
//              (R = 3, min-insync 2): a push is acknowledged once the primary and both replicas hold
//              it on disk; 16 workers push at once (one update in flight each), and the updates
//              waiting at one moment share one fdatasync on each shard (group commit)
// Policy FedAsync (each update makes a version). Ratios are updates/s over the bare arithmetic's.
//
//   federation_bench [--seconds S]      (default 2 per measurement)
// Last lines: "federation_bench shard updates/s (fedmoe-small r16, durable): X" and
// "federation_bench acks=all updates/s (fedmoe-small r16, R=3): Y (Z x durable)".
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "actors/expert_store.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

using namespace fedmoe;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds = 2.0;

// Calls f(i) for i = 0, 1, ... for `seconds`; returns calls per second.
double rate(const std::function<void(uint64_t)>& f) {
  uint64_t n = 0;
  auto t0 = Clock::now();
  double elapsed = 0;
  do {
    f(n++);
    elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (elapsed < seconds);
  return double(n) / elapsed;
}

struct Case {
  std::string label;
  model::Qwen2Config config;
};

net::ExpertSnapshot initial(const Case& c, const model::LoraSpec& spec) {
  net::ExpertSnapshot s;
  s.spec.expert_id = "expert";
  s.spec.lora_rank = static_cast<uint32_t>(spec.rank);
  s.spec.target_modules = spec.target_modules;
  s.tensors = actors::to_wire(model::make_lora_tensors(c.config, spec, model::LoraInit::random, 1));
  return s;
}

net::UpdatePush update_for(const net::ExpertSnapshot& snap, uint64_t base, uint64_t i) {
  net::UpdatePush u;
  u.expert_id = "expert";
  u.worker_id = "w" + std::to_string(i % 4);
  u.update_id = "u" + std::to_string(i);
  u.base_version = base;
  u.sample_count = 8;
  for (const auto& t : snap.tensors)
    u.deltas.push_back(actors::to_wire(t.name, torch::full(actors::from_wire(t).sizes(), 1e-4f)));
  return u;
}

actors::ExpertStoreOptions store_options(const std::string& dir) {
  actors::ExpertStoreOptions o;
  o.policy.name = "fedasync";
  o.state_dir = dir;
  o.snapshot_every = 64;
  o.policy.max_staleness = 64;  // many workers at once: updates trained a few dozen versions back still count
  return o;
}

// Acknowledged updates/s through a replicated expert: coordinator, 3 shards (own directories),
// `pushers` workers pushing concurrently to the primary.
double replicated_rate(const net::ExpertSnapshot& snap, const std::vector<net::UpdatePush>& pool, int pushers) {
  const auto timeout = std::chrono::milliseconds(60'000);
  auto dir = fs::temp_directory_path() / ("fedmoe_federation_bench_r3_" + std::to_string(::getpid()));
  double out = 0;
  {
    runtime::NodeSystem node;
    actors::CoordinatorOptions co;
    co.registry = {3, 60'000, 2};
    auto coord = node.own(node.system().spawn(actors::coordinator, node.transport(), co));
    std::vector<caf::actor> shards;
    for (int i = 0; i < 3; ++i) {
      actors::ShardOptions so;
      so.store = store_options((dir / ("shard-" + std::to_string(i))).string());
      so.membership.coordinator = coord;
      so.membership.heartbeat_ms = 100;
      shards.push_back(node.own(
          node.system().spawn(actors::expert_shard_node, "shard-" + std::to_string(i), node.transport(), so)));
    }
    std::string error;
    for (int tries = 0; tries < 200; ++tries) {  // until all three have joined: the first placement is the in-sync set
      auto status = runtime::node_status(node, coord, timeout, &error);
      if (status && status->find("shard-0") != std::string::npos && status->find("shard-1") != std::string::npos &&
          status->find("shard-2") != std::string::npos)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    auto map = runtime::register_expert(node, coord, snap.spec, timeout, &error);
    if (!map || map->placements.empty() || map->placements[0].in_sync.size() != 3)
      throw std::runtime_error("three shards did not join: " + error);
    const auto primary_id = map->placements[0].in_sync[0];
    caf::actor primary = shards[size_t(primary_id.back() - '0')];
    if (!runtime::push_snapshot(node, primary, snap, timeout).ok) throw std::runtime_error("snapshot push failed");
    std::atomic<uint64_t> version{0}, next{0}, acknowledged{0};
    std::atomic<bool> stop{false};
    // Until the replicas are seeded, pushes are refused (not_enough_replicas) or wait: warm up first.
    for (int tries = 0; tries < 500; ++tries) {
      auto u = pool[0];
      u.update_id = "warm-" + std::to_string(tries);
      auto r = runtime::push_update(node, primary, u, timeout);
      if (r.accepted) {
        version = r.ack.new_version;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::vector<std::thread> threads;
    auto t0 = Clock::now();
    for (int p = 0; p < pushers; ++p)
      threads.emplace_back([&, p] {
        while (!stop) {
          const uint64_t i = next++;
          auto u = pool[i % pool.size()];
          u.update_id = "r" + std::to_string(p) + "-" + std::to_string(i);
          u.worker_id = "w" + std::to_string(p);
          u.base_version = version.load();
          auto r = runtime::push_update(node, primary, u, timeout);
          if (!r.accepted) throw std::runtime_error("update refused: " + r.error + r.reject.detail);
          ++acknowledged;
          uint64_t seen = version.load();
          while (r.ack.new_version > seen && !version.compare_exchange_weak(seen, r.ack.new_version)) {
          }
        }
      });
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop = true;
    for (auto& t : threads) t.join();
    out = double(acknowledged.load()) / std::chrono::duration<double>(Clock::now() - t0).count();
    if (auto st = runtime::node_status(node, primary, timeout, &error)) {
      auto j = nlohmann::json::parse(*st)["replication"];
      std::fprintf(stderr, "acks=all: %llu acknowledged, primary flushes %llu, appends sent %llu\n",
                   (unsigned long long)acknowledged.load(), (unsigned long long)j["flushes"].get<uint64_t>(),
                   (unsigned long long)j["appends_sent"].get<uint64_t>());
    }
  }
  fs::remove_all(dir);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--seconds") seconds = std::stod(argv[i + 1]);
  torch::set_num_threads(2);
  model::LoraSpec spec;
  spec.rank = 16;
  spec.alpha = 32;
  spec.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  std::vector<Case> cases{{"fedmoe-small", model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-small.json")},
                          {"qwen2-0.5b", model::qwen2_preset("qwen2-0.5b")}};
  double headline = 0, headline_replicated = 0;
  std::printf("%-14s %10s %12s %12s %12s %12s %12s\n", "expert", "MB/update", "bare add/s", "store/s", "durable/s",
              "actor/s", "acks=all/s");
  for (const auto& c : cases) {
    auto snap = initial(c, spec);
    double mb = 0;
    for (const auto& t : snap.tensors) mb += double(t.size_bytes) / 1e6;

    // Bare arithmetic: w += 0.6 * d for every tensor.
    std::vector<torch::Tensor> w, d;
    for (const auto& t : snap.tensors) {
      w.push_back(actors::from_wire(t).clone());
      d.push_back(torch::full_like(w.back(), 1e-4f));
    }
    double bare = rate([&](uint64_t) {
      for (size_t k = 0; k < w.size(); ++k) w[k].add_(d[k], 0.6);
    });

    // Updates are prepared beforehand (a worker's encoding is not the shard's cost).
    std::vector<net::UpdatePush> pool;
    for (uint64_t i = 0; i < 16; ++i) pool.push_back(update_for(snap, 0, i));
    auto run_store = [&](actors::ExpertStore& store) {
      return rate([&](uint64_t i) {
        auto u = pool[i % pool.size()];
        u.update_id = "u" + std::to_string(i);
        u.base_version = store.find("expert")->weights.version;
        if (!store.push(u).accepted) throw std::runtime_error("update refused");
      });
    };
    actors::ExpertStore memory(store_options(""));
    memory.install(snap);
    double in_memory = run_store(memory);

    auto dir = fs::temp_directory_path() / ("fedmoe_federation_bench_" + std::to_string(::getpid()));
    double durable = 0;
    {
      actors::ExpertStore store(store_options(dir.string()));
      store.install(snap);
      durable = run_store(store);
    }
    fs::remove_all(dir);

    runtime::NodeSystem node;
    auto shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("bench-shard"), node.transport(),
                                              store_options("")));
    const auto timeout = std::chrono::milliseconds(60'000);
    if (!runtime::push_snapshot(node, shard, snap, timeout).ok) throw std::runtime_error("snapshot push failed");
    uint64_t version = 0;
    double actor = rate([&](uint64_t i) {
      auto u = pool[i % pool.size()];
      u.update_id = "u" + std::to_string(i);
      u.base_version = version;
      auto r = runtime::push_update(node, shard, u, timeout);
      if (!r.accepted) throw std::runtime_error("update refused: " + r.error + r.reject.detail);
      version = r.ack.new_version;
    });
    const double replicated = replicated_rate(snap, pool, 16);
    std::printf("%-14s %10.2f %12.0f %12.0f %12.0f %12.0f %12.0f\n", c.label.c_str(), mb, bare, in_memory, durable, actor,
                replicated);
    std::printf("%-14s %10s %12s %12.3f %12.3f %12.3f %12.3f   (ratio to bare add)\n", "", "", "", in_memory / bare,
                durable / bare, actor / bare, replicated / bare);
    if (c.label == "fedmoe-small") {
      headline = durable;
      headline_replicated = replicated;
    }
  }
  std::printf("federation_bench shard updates/s (fedmoe-small r16, durable): %.0f\n", headline);
  std::printf("federation_bench acks=all updates/s (fedmoe-small r16, R=3): %.0f (%.2f x durable)\n", headline_replicated,
              headline_replicated / headline);
  return 0;
}
