#include "runtime/real_sim.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "actors/router.hpp"
#include "actors/tensor_bridge.hpp"
#include "actors/worker.hpp"
#include "model/checkpoint.hpp"
#include "model/dataset.hpp"
#include "model/evaluation.hpp"
#include "model/expert_server.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "model/routing.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

namespace fedmoe::runtime {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
const auto kTimeout = std::chrono::milliseconds(60'000);

struct ExpertData {
  std::string id;
  std::vector<model::Example> train;  // split among the expert's workers
  std::vector<model::Example> held_out;  // prompts the router is asked at the end
  std::vector<model::Example> validation;  // the validation curve's data (at most eval_examples)
};

std::vector<ExpertData> load_expert_data(const RealSimConfig& c) {
  if (c.expert_data.empty()) throw std::runtime_error("a real-clock simulation needs --expert-data EXPERT=FILE");
  std::vector<std::pair<std::string, std::vector<model::Example>>> domains;
  try {
    domains = model::load_domain_examples(c.expert_data);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("--expert-data ") + e.what());
  }
  std::vector<ExpertData> out;
  for (auto& [id, examples] : domains) {
    ExpertData e;
    e.id = id;
    std::vector<size_t> order(examples.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    model::shuffle_deterministic(order, c.seed);
    const size_t held = std::max<size_t>(1, examples.size() / 10);
    for (size_t i = 0; i < order.size(); ++i) (i < held ? e.held_out : e.train).push_back(examples[order[i]]);
    if (e.train.empty()) throw std::runtime_error("expert '" + e.id + "': too few examples to train on");
    e.validation = e.held_out;
    out.push_back(std::move(e));
  }
  // Read at the start, so that a bad file is reported before the federation trains for minutes.
  if (!c.validation_data.empty()) {
    std::vector<std::pair<std::string, std::vector<model::Example>>> validation;
    try {
      validation = model::load_domain_examples(c.validation_data);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("--validation-data ") + e.what());
    }
    for (auto& [id, examples] : validation) {
      auto it = std::find_if(out.begin(), out.end(), [&](const ExpertData& e) { return e.id == id; });
      if (it == out.end()) throw std::runtime_error("--validation-data: expert '" + id + "' has no --expert-data");
      it->validation = std::move(examples);
    }
  }
  for (auto& e : out)
    if (e.validation.size() > c.eval_examples) e.validation.resize(c.eval_examples);
  return out;
}

// Every worker and the router get their own copy of the same base (LoRA adapters attach to a model
// instance, and each actor trains or generates on its own thread).
model::Qwen2ForCausalLM make_base(const RealSimConfig& c) {
  if (!c.base_model.empty()) return model::load_pretrained(c.base_model);
  torch::manual_seed(c.seed);
  model::Qwen2ForCausalLM base(model::load_qwen2_config(c.model_config));
  return base;
}

json status(NodeSystem& node, const caf::actor& a, std::chrono::milliseconds timeout = kTimeout) {
  std::string error;
  auto s = node_status(node, a, timeout, &error);
  if (!s) throw std::runtime_error("status: " + error);
  return json::parse(*s);
}

}  // namespace

std::vector<double> worker_speeds(size_t experts, uint64_t workers, double speed_min, double speed_max) {
  if (experts == 0) throw std::invalid_argument("worker_speeds: no experts");
  std::vector<uint64_t> per_expert(experts, 0);
  for (uint64_t w = 0; w < workers; ++w) ++per_expert[w % experts];
  std::vector<double> speeds;
  for (uint64_t w = 0; w < workers; ++w) {
    const uint64_t n = per_expert[w % experts], k = w / experts;
    const double unit = n > 1 ? double(k) / double(n - 1) : workers > 1 ? double(w) / double(workers - 1) : 0.0;
    speeds.push_back(speed_min + (speed_max - speed_min) * unit);
  }
  return speeds;
}

double device_time_scale(const std::vector<double>& speeds, double speed_min, size_t slots) {
  if (slots == 0) return 1.0;
  double busy = 0;  // cores the fleet keeps busy when no device waits for another
  for (double s : speeds) busy += speed_min / s;
  return std::max(1.0, busy / double(slots));
}

RealSimResult run_real_sim(const RealSimConfig& c, std::ostream& metrics) {
  const auto start = Clock::now();
  const int64_t start_unix_ms = net::unix_ms_now();
  auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  // Many actors train at once on few cores: one thread per torch op keeps them from oversubscribing.
  const int threads_before = torch::get_num_threads();
  torch::set_num_threads(1);
  struct RestoreThreads {
    int n;
    ~RestoreThreads() { torch::set_num_threads(n); }
  } restore{threads_before};
  auto experts = load_expert_data(c);
  if (c.workers < experts.size())
    throw std::runtime_error("--workers " + std::to_string(c.workers) + ": at least one per expert (" +
                             std::to_string(experts.size()) + ")");
  if (c.shards == 0) throw std::runtime_error("--shards: at least 1");
  const auto probe = make_base(c);
  auto tok = model::load_tokenizer(c.tokenizer, c.base_model);
  const auto speeds = worker_speeds(experts.size(), c.workers, c.speed_min, c.speed_max);
  const double time_scale = device_time_scale(speeds, c.speed_min, c.compute_slots);
  {
    json cfg = {{"event", "config"},         {"policy", c.policy.name},     {"workers", c.workers},
                {"local_steps", c.local_steps}, {"batch", c.batch},         {"seq_len", c.seq_len},
                {"lr", c.lr},                 {"rank", c.rank},             {"targets", c.targets},
                {"speed_min", c.speed_min},   {"speed_max", c.speed_max},   {"latency_ms", c.latency_ms},
                {"jitter_ms", c.jitter_ms},   {"duration_s", c.duration_s}, {"rounds", c.rounds},
                {"keep_optimizer_state", c.keep_optimizer_state}, {"compute_slots", c.compute_slots},
                {"temperature", c.temperature}, {"top_k", c.top_k}, {"top_p", c.top_p},
                {"time_scale", time_scale},
                {"base_model", c.base_model.empty() ? "fresh " + c.model_config : c.base_model}};
    metrics << cfg.dump() << std::endl;
  }

  NodeSystem node;
  // Control plane and shards, joined as separate nodes would be.
  actors::CoordinatorOptions co;
  co.registry = {c.replication, 5000};
  auto coord = node.own(node.system().spawn(actors::coordinator, node.transport(), co));
  std::map<std::string, caf::actor> shards;
  for (uint64_t i = 0; i < c.shards; ++i) {
    actors::ShardOptions so;
    so.store.policy = c.policy;
    so.membership.coordinator = coord;
    so.membership.heartbeat_ms = 500;
    const std::string id = "shard-" + std::to_string(i);
    shards[id] = node.own(node.system().spawn(actors::expert_shard_node, id, node.transport(), so));
  }
  for (int i = 0; i < 200 && status(node, coord)["members"].size() < c.shards; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));

  // Experts: registered, placed on R shards, each replica seeded with version 0.
  model::LoraSpec ls;
  ls.rank = c.rank;
  ls.alpha = c.alpha;
  ls.target_modules = c.targets;
  std::map<std::string, std::vector<caf::actor>> replicas;
  for (const auto& e : experts) {
    net::ExpertSpec spec;
    spec.expert_id = e.id;
    spec.domain = e.id;
    spec.lora_rank = uint32_t(c.rank);
    spec.lora_alpha = float(c.alpha);
    spec.target_modules = c.targets;
    spec.base_model_id = c.base_model.empty() ? c.model_config : c.base_model;
    std::string error;
    auto map = register_expert(node, coord, spec, kTimeout, &error);
    if (!map) throw std::runtime_error("registering expert '" + e.id + "': " + error);
    net::ExpertSnapshot snap;
    snap.spec = spec;
    snap.tensors = actors::to_wire(model::make_lora_tensors(probe->config(), ls, model::LoraInit::peft, c.seed));
    for (const auto& p : map->placements) {
      if (p.expert_id != e.id) continue;
      for (const auto& r : p.replicas) {
        auto pushed = push_snapshot(node, shards.at(r.shard_id), snap, kTimeout);
        if (!pushed.ok) throw std::runtime_error("seeding " + r.shard_id + " with '" + e.id + "': " + pushed.error);
        replicas[e.id].push_back(shards.at(r.shard_id));
      }
    }
  }

  // Captured versions for the validation curve: taken while the federation runs, evaluated after.
  struct Capture {
    double t;
    std::string expert;
    uint64_t version;
    net::ExpertSpec spec;
    std::map<std::string, torch::Tensor> tensors;
  };
  std::vector<Capture> captures;
  auto capture = [&] {
    for (const auto& e : experts) {
      // The primary (first in the placement) has every accepted update first.
      auto pulled = pull_snapshot(node, replicas.at(e.id).front(), e.id, 0, kTimeout);
      if (!pulled.ok) {
        spdlog::warn("sim: no snapshot of '{}' for the validation curve: {}", e.id, pulled.error);
        continue;
      }
      Capture cap{seconds(), e.id, pulled.snapshot.version, pulled.snapshot.spec, {}};
      for (const auto& t : pulled.snapshot.tensors) cap.tensors.emplace(t.name, actors::from_wire(t).clone());
      captures.push_back(std::move(cap));
    }
  };
  capture();  // version 0: the base's own loss

  // The router: the configured rules, and a learned router trained on the experts' data (before the
  // workers start, so that its training takes no cores from theirs).
  actors::RouterOptions ro;
  ro.node_id = "router";
  ro.server = std::make_shared<model::ExpertServer>(make_base(c), tok);
  ro.rules = std::make_shared<model::RuleRouter>(c.rules);
  if (experts.size() >= 2) {
    std::map<std::string, std::vector<std::string>> texts;
    for (const auto& e : experts)
      for (const auto& ex : e.train) texts[e.id].push_back(model::routing_text(ex));
    model::RouterTrainingReport report;
    model::RouterTrainingConfig router_config;
    router_config.max_texts = c.router_texts;
    ro.learned = std::make_shared<model::HiddenStateRouter>(
        model::HiddenStateRouter::train(ro.server->base(), tok, texts, router_config, &report));
    metrics << json{{"event", "router_trained"}, {"t", seconds()}, {"train_accuracy", report.train_accuracy},
                    {"validation_accuracy", report.validation_accuracy}, {"examples", report.train_examples},
                    {"seconds", report.seconds}}
                   .dump()
            << std::endl;
    if (!c.out_dir.empty()) {
      std::filesystem::create_directories(c.out_dir);
      ro.learned->save((std::filesystem::path(c.out_dir) / "router.safetensors").string());
    }
  }
  ro.max_new_tokens = c.max_new_tokens;
  ro.max_experts = c.max_experts;
  ro.membership.coordinator = coord;
  ro.membership.heartbeat_ms = 500;
  auto router = node.own(node.system().spawn<caf::detached>(actors::router, node.transport(), ro));

  // Workers: round-robin over the experts, each with its own part of the expert's data.
  auto stop = std::make_shared<std::atomic<bool>>(false);
  // Each worker's data is tokenized and packed before any starts (on the big corpora that takes tens
  // of seconds, which would otherwise count as the first workers' training time).
  std::map<std::string, uint64_t> per_expert;
  for (uint64_t w = 0; w < c.workers; ++w) ++per_expert[experts[w % experts.size()].id];
  // More workers than cores: with compute slots they take turns at full speed, and speed factors
  // scale what a step costs on a core of its own (without, a worker that never waits takes the
  // cores from the others, whatever the factors say).
  auto slots = c.compute_slots > 0 ? std::make_shared<model::ComputeSlots>(c.compute_slots) : nullptr;
  std::vector<std::pair<actors::WorkerOptions, json>> prepared;
  for (uint64_t w = 0; w < c.workers; ++w) {
    const auto& e = experts[w % experts.size()];
    const uint64_t n = per_expert[e.id], part = w / experts.size();
    std::vector<model::Example> mine;
    for (size_t i = part; i < e.train.size(); i += n) mine.push_back(e.train[i]);
    const double speed = speeds[w];
    actors::WorkerOptions o;
    o.worker_id = "worker-" + std::to_string(w);
    o.expert_id = e.id;
    o.replicas = replicas[e.id];
    model::LocalTrainingConfig lc;
    lc.steps = c.local_steps;
    lc.batch = c.batch;
    lc.lr = c.lr;
    lc.seed = c.seed + w;
    lc.eval_batches = c.local_eval_batches;
    lc.keep_optimizer_state = c.keep_optimizer_state;
    lc.compute_slots = slots;
    lc.cancel = stop;
    try {
      o.trainer = std::make_shared<model::LocalTrainer>(
          make_base(c), model::prepare(mine, tok, size_t(c.seq_len), 0.2, c.seed + w), lc);
    } catch (const std::exception& ex) {
      throw std::runtime_error(o.worker_id + " (expert '" + e.id + "', " + std::to_string(mine.size()) +
                               " examples): " + ex.what());
    }
    o.rounds = c.rounds;
    o.speed_factor = speed / c.speed_min * time_scale;
    o.sync_rounds = c.policy.name == "fedavg";  // synchronous rounds: one update per worker per round
    o.stop = stop;
    o.latency_ms = c.latency_ms;
    o.jitter_ms = c.jitter_ms;
    o.seed = c.seed + w;
    o.membership.coordinator = coord;
    o.membership.heartbeat_ms = 500;
    prepared.emplace_back(std::move(o),
                          json{{"worker", "worker-" + std::to_string(w)}, {"expert", e.id}, {"speed_factor", speed},
                               {"seen", 0}});
  }
  const double workers_start = seconds();  // duration_s counts from here: set-up is not training time
  metrics << json{{"event", "workers_start"}, {"t", workers_start}}.dump() << std::endl;
  std::vector<std::pair<caf::actor, json>> workers;
  for (auto& [o, info] : prepared)
    workers.emplace_back(node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o)), info);


  // Metrics while the federation runs: one line per finished round, as the workers report them. A
  // worker answers between rounds only (training blocks it): one that does not answer within 100 ms
  // is asked again on the next pass; t is when its verdict arrived.
  RealSimResult result;
  double next_capture = c.eval_every_s > 0 ? seconds() + c.eval_every_s : -1;
  for (;;) {
    if (c.duration_s > 0 && !stop->load() && seconds() >= workers_start + c.duration_s) {
      stop->store(true);  // no new rounds; training in progress ends within a step
      metrics << json{{"event", "stop"}, {"t", seconds()}}.dump() << std::endl;
    }
    if (next_capture > 0 && !stop->load() && seconds() >= next_capture) {
      capture();
      next_capture += c.eval_every_s;
    }
    bool all = true;
    for (auto& [w, info] : workers) {
      std::string error;
      auto text = node_status(node, w, std::chrono::milliseconds(100), &error);
      if (!text) {
        all = false;
        continue;
      }
      auto s = json::parse(*text);
      for (const auto& r : s["rounds"]) {
        if (r["round"].get<uint64_t>() <= info["seen"].get<uint64_t>()) continue;
        info["seen"] = r["round"];
        ++result.updates;
        if (r["verdict"] == "accepted") ++result.accepted;
        json line = r;
        line["event"] = "round";
        line["t"] = double(r["finished_unix_ms"].get<int64_t>() - start_unix_ms) / 1000.0;
        line["worker"] = info["worker"];
        line["expert"] = info["expert"];
        line["speed_factor"] = info["speed_factor"];
        metrics << line.dump() << std::endl;
      }
      all = all && s["finished"].get<bool>();
    }
    if (all) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }

  capture();  // the final versions

  // Summary from the coordinator's view of the shards.
  auto cs = status(node, coord);
  json summary = {{"event", "summary"}, {"t", seconds()}, {"workers", c.workers}, {"updates", result.updates},
                  {"accepted", result.accepted}};
  json per = json::object();
  std::map<uint64_t, uint64_t> histogram;
  for (const auto& [shard, s] : cs["shards"].items())
    for (const auto& e : s.value("experts", json::array())) {
      auto& x = per[e.value("expert_id", "?")];
      if (!x.contains("version")) x["version"] = 0;
      x["version"] = std::max<uint64_t>(x["version"].get<uint64_t>(), e.value("version", uint64_t{0}));
      x["replicas"][shard] = e.value("version", uint64_t{0});
    }
  for (auto& [w, info] : workers) {
    auto s = status(node, w);
    auto& x = per[info["expert"].get<std::string>()];
    if (!x.contains("accepted")) x["accepted"] = 0;
    if (!x.contains("rejected")) x["rejected"] = json::object();
    x["accepted"] = x["accepted"].get<uint64_t>() + s["accepted"].get<uint64_t>();
    for (const auto& [reason, n] : s["rejected"].items())
      x["rejected"][reason] = x["rejected"].value(reason, uint64_t{0}) + n.get<uint64_t>();
    for (const auto& r : s["rounds"]) ++histogram[r["staleness"].get<uint64_t>()];
  }
  json hist = json::object();
  for (const auto& [k, v] : histogram) hist[std::to_string(k)] = v;
  summary["experts"] = per;
  summary["staleness_histogram"] = hist;
  metrics << summary.dump() << std::endl;

  // The router on a held-out prompt of each expert (one expert each), then on the configured prompts.
  auto ask = [&](const std::string& prompt, uint32_t max_experts, const std::string& expected) {
    net::GenerateRequest req;
    req.prompt = prompt;
    req.max_new_tokens = c.max_new_tokens;
    req.temperature = c.temperature;
    req.top_k = c.top_k;
    req.top_p = c.top_p;
    req.seed = c.seed;
    req.max_experts = max_experts;
    std::string error;
    auto reply = ask_router(node, router, req, kTimeout, &error);
    json line = {{"event", "ask"}, {"t", seconds()}, {"prompt", req.prompt.substr(0, 200)}};
    if (!expected.empty()) line["expected_expert"] = expected;
    if (!reply || !reply->error.empty()) {
      line["error"] = reply ? reply->error : error;
    } else {
      line["expert"] = reply->experts.empty() ? "" : reply->experts[0].expert_id;
      line["version"] = reply->experts.empty() ? 0 : reply->experts[0].version;
      line["reason"] = reply->choices.empty() ? "" : reply->choices[0].reason;
      json chosen = json::array();
      for (size_t i = 0; i < reply->experts.size(); ++i)
        chosen.push_back({{"expert", reply->experts[i].expert_id},
                          {"version", reply->experts[i].version},
                          {"reason", i < reply->choices.size() ? reply->choices[i].reason : ""}});
      line["experts"] = chosen;
      line["text"] = reply->text;
      if (!expected.empty()) {
        ++result.asked;
        if (line["expert"] == expected) ++result.routed_right;
      }
    }
    metrics << line.dump() << std::endl;
  };
  for (const auto& e : experts) ask(model::routing_text(e.held_out.front()), 1, e.id);
  for (const auto& p : c.prompts) ask(p, c.max_experts, "");
  result.wall_seconds = seconds();

  // The validation curve, computed now that the workers are done (their cores are free again).
  torch::set_num_threads(threads_before);
  for (const auto& e : experts) {
    // Each example scored on its own first seq_len tokens, as `fedmoe eval` scores them (so the curve
    // and the perplexity matrix measure the same thing, and an example's length does not set its weight).
    const auto windows = model::example_windows(e.validation, model::encoder_for(tok), size_t(c.seq_len));
    // One base for this expert's versions (attached one at a time) and its final adapter.
    model::LoraExperts adapters(make_base(c));
    std::map<uint64_t, double> by_version;  // a version's loss does not change
    const Capture* last = nullptr;
    for (const auto& cap : captures) {
      if (cap.expert != e.id) continue;
      auto it = by_version.find(cap.version);
      if (it == by_version.end()) {
        const std::string name = e.id + "@" + std::to_string(cap.version);
        adapters.import_adapter(name, actors::lora_spec_of(cap.spec), cap.tensors);
        adapters.activate(name);
        it = by_version.emplace(cap.version, model::summarize(model::example_losses(adapters.model(), windows, c.batch)).loss)
                 .first;
        adapters.detach(name);
      }
      metrics << json{{"event", "eval"}, {"t", cap.t}, {"expert", e.id}, {"version", cap.version},
                      {"val_loss", it->second}, {"val_ppl", std::exp(it->second)}, {"examples", e.validation.size()}}
                     .dump()
              << std::endl;
      last = &cap;
    }
    if (!c.out_dir.empty() && last) {
      adapters.import_adapter(e.id, actors::lora_spec_of(last->spec), last->tensors);
      const auto dir = (std::filesystem::path(c.out_dir) / e.id).string();
      model::save_peft_adapter(adapters, e.id, dir, c.base_model.empty() ? c.model_config : c.base_model);
    }
  }
  return result;
}

}  // namespace fedmoe::runtime
