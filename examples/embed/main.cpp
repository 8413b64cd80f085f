// A host program that embeds fedmoe in its own actor system: an expert shard holding a "sql" expert,
// a worker that trains it for a few rounds on data this program owns (it never leaves the process),
// and a router that answers a prompt with the trained expert. Build it against an installed fedmoe
// (see CMakeLists.txt); run it with the path of a Qwen tokenizer.json.
//
//   fedmoe-embed TOKENIZER_JSON [ROUNDS]
#include <torch/torch.h>

#include <chrono>
#include <iostream>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/expert_shard.hpp"
#include "actors/router.hpp"
#include "actors/tensor_bridge.hpp"
#include "actors/worker.hpp"
#include "model/dataset.hpp"
#include "model/expert_server.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "model/routing.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

using namespace fedmoe;

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: fedmoe-embed TOKENIZER_JSON [ROUNDS]\n";
    return 2;
  }
  const uint64_t rounds = argc > 2 ? std::stoull(argv[2]) : 2;
  const auto timeout = std::chrono::milliseconds(60'000);
  try {
    auto tok = model::Tokenizer::from_file(argv[1]);
    auto cfg = model::qwen2_preset("tiny");
    cfg.vocab_size = 151936;  // the Qwen tokenizer's ids
    torch::manual_seed(0);
    model::Qwen2ForCausalLM base(cfg);  // a host would load its base with model::load_pretrained(DIR)

    runtime::NodeSystem node;  // this program's actor system and fedmoe transport

    // The shard, seeded with version 0 of the expert (PEFT init: it starts as the bare base).
    actors::ExpertStoreOptions store;
    store.policy.name = "fedasync";
    auto shard = node.own(node.system().spawn(actors::expert_shard_with, std::string("embedded-shard"),
                                              node.transport(), store));
    model::LoraSpec spec;
    spec.rank = 4, spec.alpha = 8, spec.target_modules = {"q_proj", "v_proj"};
    net::ExpertSnapshot initial;
    initial.spec = {"sql", "sql", 4, 8.0f, 0.0f, spec.target_modules, "tiny", false};
    initial.tensors = actors::to_wire(model::make_lora_tensors(cfg, spec, model::LoraInit::peft, 1));
    if (!runtime::push_snapshot(node, shard, initial, timeout).ok) throw std::runtime_error("seeding the shard failed");

    // The worker: private examples that stay in this process.
    std::vector<model::Example> examples;
    for (int i = 0; i < 32; ++i)
      examples.push_back({model::Example::Kind::text,
                          "SELECT id, name FROM users WHERE id = " + std::to_string(i) + " ORDER BY name;", {}, {}, {}});
    model::LocalTrainingConfig lc;
    lc.steps = 4;
    lc.lr = 5e-3;
    actors::WorkerOptions w;
    w.worker_id = "embedded-worker";
    w.expert_id = "sql";
    w.replicas = {shard};
    w.trainer = std::make_shared<model::LocalTrainer>(base, model::prepare(examples, tok, 24, 0.2, 1), lc);
    w.rounds = rounds;
    auto worker = node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), w));
    for (;;) {
      std::string error;
      auto s = runtime::node_status(node, worker, timeout, &error);
      if (!s) throw std::runtime_error("worker status: " + error);
      auto j = nlohmann::json::parse(*s);
      if (j["finished"].get<bool>()) {
        std::cout << "worker: " << j["accepted"] << " of " << j["rounds_done"] << " updates accepted" << std::endl;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }

    // The router: a keyword rule for sql, the shard as the only replica.
    actors::RouterOptions r;
    r.node_id = "embedded-router";
    r.server = std::make_shared<model::ExpertServer>(base, tok);
    r.rules = std::make_shared<model::RuleRouter>(std::vector<std::string>{"sql=select,from,where"});
    r.shards = {{"embedded-shard", shard}};
    r.placement = {{"sql", {"embedded-shard"}}};
    auto router = node.own(node.system().spawn<caf::detached>(actors::router, node.transport(), r));
    net::GenerateRequest ask;
    ask.prompt = "SELECT name FROM users WHERE id = 3";
    ask.max_new_tokens = 8;
    std::string error;
    auto reply = runtime::ask_router(node, router, ask, timeout, &error);
    if (!reply) throw std::runtime_error("ask: " + error);
    if (!reply->error.empty()) throw std::runtime_error("ask: " + reply->error);
    for (const auto& e : reply->experts) std::cout << "router: expert " << e.expert_id << " v" << e.version << std::endl;
    std::cout << "router: " << reply->text.size() << " bytes generated" << std::endl;
    const bool ok = reply->experts.size() == 1 && reply->experts[0].expert_id == "sql" && reply->experts[0].version == rounds;
    std::cout << (ok ? "embed: ok" : "embed: unexpected expert version") << std::endl;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "fedmoe-embed: " << e.what() << std::endl;
    return 1;
  }
}
