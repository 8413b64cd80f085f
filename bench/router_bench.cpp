// What serving through the router costs, for a rank-16 LoRA expert (q, k, v, o) of the demo base
// (examples/models/fedmoe-small.json, random weights), greedy, 16 new tokens. In the same run:
//   direct     model::ExpertServer::generate on an attached adapter: the generation alone (baseline)
//   held       fedmoe-node ask's path in one process: GenerateRequest to the router actor, rule
//              routing, the expert's newest version already held (a VersionNotice said so), reply
//   fetched    the same when a new version was published before every request: the router pulls
//              the snapshot from the shard and attaches it first
//   consensus  two replicas' copies averaged token by token (two forward passes per token)
// Ratios are requests/s over the direct generation's (the mean of a run first and one last). The
// executable settles OMP_WAIT_POLICY=PASSIVE as fedmoe's own do.
//
//   router_bench [--seconds S]      (default 3 per measurement)
// Last line: "router_bench held/direct: X".
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/expert_shard.hpp"
#include "actors/router.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/dataset.hpp"
#include "model/expert_server.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

using namespace fedmoe;
using Clock = std::chrono::steady_clock;

namespace {

double seconds = 3.0;
const auto kTimeout = std::chrono::milliseconds(120'000);

double rate(const std::function<void(uint64_t)>& f) {
  f(0);  // warm-up, not timed
  uint64_t n = 0;
  auto t0 = Clock::now();
  double elapsed = 0;
  do {
    f(++n);
    elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (elapsed < seconds);
  return double(n) / elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--seconds") seconds = std::stod(argv[i + 1]);
  spdlog::set_level(spdlog::level::warn);
  torch::set_num_threads(2);
  auto cfg = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-small.json");
  auto tok = model::Tokenizer::from_file(FEDMOE_SOURCE_DIR "/" + std::string(model::kDefaultTokenizerPath));
  model::LoraSpec spec;
  spec.rank = 16, spec.alpha = 32, spec.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  auto base = [&] {
    torch::manual_seed(1);
    model::Qwen2ForCausalLM m(cfg);
    return m;
  };
  const std::string prompt = "SELECT name, total FROM orders WHERE total > 100";
  model::GenerationOptions g;
  g.max_new_tokens = 16;

  // direct
  model::ExpertServer direct(base(), tok);
  std::map<std::string, torch::Tensor> adapter;
  for (auto& nt : model::make_lora_tensors(cfg, spec, model::LoraInit::random, 3)) adapter.emplace(nt.name, nt.tensor);
  auto name = direct.attach("sql", 1, spec, adapter);
  double direct_rate = rate([&](uint64_t) { direct.generate({name}, prompt, g); });

  // The router actor with two shard replicas in this process.
  runtime::NodeSystem node;
  actors::ExpertStoreOptions so;
  so.policy.name = "fedasync";
  std::vector<caf::actor> shards;
  net::ExpertSnapshot snap;
  snap.spec = {"sql", "sql", 16, 32.0f, 0.0f, spec.target_modules, "fedmoe-small", false};
  snap.version = 1;
  snap.tensors = actors::to_wire(model::make_lora_tensors(cfg, spec, model::LoraInit::random, 3));
  actors::RouterOptions ro;
  ro.server = std::make_shared<model::ExpertServer>(base(), tok);
  ro.rules = std::make_shared<model::RuleRouter>(std::vector<std::string>{"sql=select,from,where"});
  for (int i = 0; i < 2; ++i) {
    const auto id = "shard-" + std::to_string(i);
    shards.push_back(node.own(node.system().spawn(actors::expert_shard_with, id, node.transport(), so)));
    if (!runtime::push_snapshot(node, shards.back(), snap, kTimeout).ok) return 1;
    ro.shards[id] = shards.back();
    ro.placement["sql"].push_back(id);
  }
  auto router = node.own(node.system().spawn<caf::detached>(actors::router, node.transport(), ro));
  auto ask = [&](const std::string& combine) {
    net::GenerateRequest req;
    req.prompt = prompt;
    req.max_new_tokens = 16;
    req.combine = combine;
    std::string error;
    auto r = runtime::ask_router(node, router, req, kTimeout, &error);
    if (!r || !r->error.empty()) throw std::runtime_error("ask: " + (r ? r->error : error));
    return r->experts.front().version;
  };
  const double held_rate = rate([&](uint64_t) { ask("stitch"); });
  // A new version before every request: an update to both replicas (each standalone, each applies it).
  uint64_t next_update = 0;
  auto publish = [&] {
    net::UpdatePush u;
    u.expert_id = "sql";
    u.worker_id = "bench";
    u.update_id = "u" + std::to_string(next_update++);
    u.sample_count = 1;
    u.base_version = 0;  // FedAsync takes any base within the staleness bound
    for (const auto& t : snap.tensors) u.deltas.push_back(actors::to_wire(t.name, torch::zeros({int64_t(t.shape[0]), int64_t(t.shape[1])})));
    for (auto& s : shards) runtime::push_update(node, s, u, kTimeout);
  };
  // Only the requests are timed, not the publishing.
  uint64_t fetched = 0, versions_seen = 0;
  double asking = 0;
  for (auto t0 = Clock::now(); std::chrono::duration<double>(Clock::now() - t0).count() < seconds;) {
    publish();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // the notice's way to the router
    auto a0 = Clock::now();
    const uint64_t v = ask("stitch");
    asking += std::chrono::duration<double>(Clock::now() - a0).count();
    versions_seen += v > 1;
    ++fetched;
  }
  const double fetched_rate = double(fetched) / asking;
  const double consensus_rate = rate([&](uint64_t) { ask("consensus"); });
  // The baseline again, last: the machine's drift over the run shows as the difference of the two.
  const double direct_rate_after = rate([&](uint64_t) { direct.generate({name}, prompt, g); });
  const double direct_rate_first = direct_rate;
  direct_rate = 0.5 * (direct_rate_first + direct_rate_after);

  nlohmann::json out = {{"base", "fedmoe-small (random weights)"},
                        {"expert", "LoRA r16 q,k,v,o"},
                        {"new_tokens", 16},
                        {"direct_per_s", direct_rate},
                        {"direct_per_s_first_and_last", {direct_rate_first, direct_rate_after}},
                        {"held_per_s", held_rate},
                        {"fetched_per_s", fetched_rate},
                        {"fetched_requests", fetched},
                        {"fetched_requests_on_a_new_version", versions_seen},
                        {"consensus_per_s", consensus_rate},
                        {"held_over_direct", held_rate / direct_rate},
                        {"fetched_over_direct", fetched_rate / direct_rate},
                        {"consensus_over_direct", consensus_rate / direct_rate}};
  std::printf("%s\n", out.dump(2).c_str());
  std::printf("router_bench held/direct: %.3f\n", held_rate / direct_rate);
  return 0;
}
