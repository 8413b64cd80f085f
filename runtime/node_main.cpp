#include "runtime/node_main.hpp"

#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <iostream>
#include <pthread.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <caf/send.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/coordinator.hpp"
#include "actors/expert_shard.hpp"
#include "actors/membership.hpp"
#include "actors/router.hpp"
#include "actors/worker.hpp"
#include "model/checkpoint.hpp"
#include "model/dataset.hpp"
#include "model/expert_server.hpp"
#include "model/routing.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/lora_expert.hpp"
#include "net/endpoint.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"
#include "runtime/real_sim.hpp"
#include "runtime/virtual_sim.hpp"

namespace fedmoe::runtime {

namespace {

net::Endpoint must_parse(const std::string& text, const char* flag) {
  std::string error;
  auto ep = net::parse_endpoint(text, &error);
  if (!ep) throw CLI::ValidationError(flag, error);
  return *ep;
}

// Blocks SIGINT/SIGTERM in every thread (call before any thread starts) so that the main thread
// alone takes them in wait_for_shutdown().
sigset_t block_shutdown_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int wait_for_shutdown(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

struct NodeFlags {
  std::string role;
  std::string listen = "127.0.0.1:0";
  std::string node_id;
  std::string advertise;       // host peers reach this node at (CAF port and bulk channel)
  std::string bulk_advertise;
  std::string coordinator;  // HOST:PORT of the coordinator to join ("" = standalone)
  uint64_t heartbeat_ms = 1000;
  uint64_t replication_timeout_ms = 5000;
  // coordinator
  uint64_t replication = 3;
  uint64_t min_insync = 0;
  uint64_t lease_ms = 5000;
  // shard: aggregation and durability
  actors::ExpertStoreOptions store;
  std::string staleness_function = "exponential";
  // worker
  std::string expert, base_model, tokenizer, device = "cpu";
  std::vector<std::string> data;
  double speed_factor = 1.0;
  bool sync_rounds = false;
  uint64_t latency_ms = 0, jitter_ms = 0, rounds = 0;
  int64_t local_steps = 8, batch = 4, seq_len = 128;
  double lr = 1e-3, val_fraction = 0.1;
  uint64_t seed = 0;
  // router
  std::vector<std::string> rules, router_data;
  std::string routing = "auto", combine = "stitch", router_model, default_expert;
  uint32_t max_experts = 2, consensus_replicas = 3, max_new_tokens = 64;
  uint64_t reply_timeout_ms = 10'000;
  // sim
  std::string clock = "virtual", metrics;
  double duration_s = 0, eval_every_s = 0;
  std::vector<std::string> validation_data;
  size_t eval_examples = 64;
  std::string out_dir;
  std::vector<std::string> prompts;
  size_t router_texts = 400;
  int64_t local_eval_batches = 1;
  bool keep_optimizer_state = false;
  size_t compute_slots = 0;
  float temperature = 0, top_p = 1;  // sim, real clock: sampling of the asks' answers
  uint32_t top_k = 0;
  VirtualSimConfig sim;
  bool workers_given = false;
  std::vector<std::string> expert_data;
  uint64_t shards = 3;
  std::string model_config = "examples/models/fedmoe-tiny.json";
  int64_t rank = 8;
  double alpha = 16;
  std::vector<std::string> targets{"q_proj", "v_proj"};
};

// Connects to the coordinator of --coordinator (invalid handle when none is given).
caf::actor coordinator_of(NodeSystem& node, const NodeFlags& f) {
  if (f.coordinator.empty()) return {};
  auto ep = must_parse(f.coordinator, "--coordinator");
  return node.connect(ep.host, ep.port);
}

// The host peers reach this node at: --advertise (or --bulk-advertise, which served both before
// --advertise existed); else the --listen host unless it is a wildcard (0.0.0.0, ::), which no peer
// can connect to; then the local address on the route to the coordinator, or to the outside world,
// or this host's name.
std::string advertised_host(const NodeFlags& f, const net::Endpoint& listen) {
  if (!f.advertise.empty()) return f.advertise;
  if (!f.bulk_advertise.empty()) return f.bulk_advertise;
  if (!net::is_wildcard_host(listen.host)) return listen.host;
  std::string host;
  if (auto coord = net::parse_endpoint(f.coordinator)) host = net::local_address_toward(coord->host, coord->port);
  if (host.empty()) host = net::local_address_toward("192.0.2.1", 9);  // TEST-NET-1: a route, no traffic
  if (host.empty()) {
    char name[256] = {0};
    ::gethostname(name, sizeof name - 1);
    host = name;
  }
  return host;
}

NodeSystemOptions listening_options(const NodeFlags& f, const net::Endpoint& listen, const std::string& advertised) {
  NodeSystemOptions opts;
  opts.bulk_bind_host = listen.host;
  opts.bulk_advertise_host = f.bulk_advertise.empty() ? advertised : f.bulk_advertise;
  return opts;
}

void announce(const char* role, const std::string& id, const std::string& host, uint16_t port, NodeSystem& node) {
  // Scripts wait for this line (and read the port from it when --listen asked for port 0).
  std::cout << "fedmoe-node: " << role << " '" << id << "' listening on " << host << ":" << port
            << " (bulk channel port " << node.transport()->bulk_port() << ")" << std::endl;
}

int run_coordinator(const NodeFlags& f, const sigset_t& signals) {
  auto listen = must_parse(f.listen, "--listen");
  const auto advertised = advertised_host(f, listen);
  auto opts = listening_options(f, listen, advertised);
  NodeSystem node(opts);
  actors::CoordinatorOptions co;
  co.node_id = f.node_id.empty() ? "coordinator" : f.node_id;
  co.registry = {f.replication, f.lease_ms, f.min_insync};
  co.state_dir = f.store.state_dir;
  auto coord = node.own(node.system().spawn(actors::coordinator, node.transport(), co));
  uint16_t port = node.publish(coord, listen.host, listen.port);
  announce("coordinator", co.node_id, listen.host, port, node);
  int sig = wait_for_shutdown(signals);
  spdlog::info("{}: {} received, shutting down", co.node_id, sig == SIGINT ? "SIGINT" : "SIGTERM");
  return 0;
}

std::ofstream open_metrics(const std::string& path) {
  std::ofstream file;
  if (path.empty()) return file;
  if (auto parent = std::filesystem::path(path).parent_path(); !parent.empty()) std::filesystem::create_directories(parent);
  file.open(path, std::ios::trunc);
  if (!file) throw std::runtime_error("cannot write " + path);
  return file;
}

int run_real_sim(const NodeFlags& f) {
  RealSimConfig c;
  c.expert_data = f.expert_data;
  if (f.workers_given) c.workers = f.sim.workers;
  c.shards = f.shards;
  c.replication = f.replication;
  if (f.rounds > 0) c.rounds = f.rounds;
  c.duration_s = f.duration_s;
  if (c.duration_s > 0 && f.rounds == 0) c.rounds = 0;  // as many rounds as the time allows
  c.eval_every_s = f.eval_every_s;
  c.validation_data = f.validation_data;
  c.eval_examples = f.eval_examples;
  c.out_dir = f.out_dir;
  c.base_model = f.base_model;
  c.model_config = f.model_config;
  c.tokenizer = f.tokenizer;
  c.rank = f.rank;
  c.alpha = f.alpha;
  c.targets = f.targets;
  c.local_steps = f.local_steps;
  c.batch = f.batch;
  c.seq_len = f.seq_len;
  c.lr = f.lr;
  c.keep_optimizer_state = f.keep_optimizer_state;
  c.compute_slots = f.compute_slots;
  c.speed_min = f.sim.speed_min;
  c.speed_max = f.sim.speed_max;
  if (c.speed_min <= 0 || c.speed_max < c.speed_min)
    throw CLI::ValidationError("--speed-min/--speed-max", "need 0 < speed-min <= speed-max");
  c.latency_ms = f.latency_ms;
  c.jitter_ms = f.jitter_ms;
  c.rules = f.rules;
  c.max_new_tokens = f.max_new_tokens;
  c.max_experts = f.max_experts;
  c.temperature = f.temperature;
  c.top_k = f.top_k;
  c.top_p = f.top_p;
  c.router_texts = f.router_texts;
  c.local_eval_batches = f.local_eval_batches;
  c.prompts = f.prompts;
  c.seed = f.seed ? f.seed : 1;
  c.policy = f.store.policy;
  c.policy.staleness_function = model::StalenessFunction::parse(f.staleness_function);
  model::make_policy(c.policy);
  auto file = open_metrics(f.metrics);
  auto r = run_real_sim(c, f.metrics.empty() ? std::cout : file);
  std::cerr << "fedmoe-node sim (real clock): " << c.workers << " workers, " << r.updates << " updates (" << r.accepted
            << " accepted), router chose the right expert for " << r.routed_right << " of " << r.asked
            << " held-out prompts, " << r.wall_seconds << " s" << std::endl;
  return r.accepted > 0 ? 0 : 1;
}

int run_sim(const NodeFlags& f) {
  if (f.clock == "real") return run_real_sim(f);
  auto c = f.sim;
  c.policy = f.store.policy;
  c.policy.staleness_function = model::StalenessFunction::parse(f.staleness_function);
  c.latency_ms = double(f.latency_ms);
  c.jitter_ms = double(f.jitter_ms);
  c.seed = f.seed ? f.seed : 1;
  auto file = open_metrics(f.metrics);
  auto r = run_virtual_sim(c, f.metrics.empty() ? std::cout : file);
  std::cerr << "fedmoe-node sim: " << c.workers << " workers, " << r.updates << " updates (" << r.accepted
            << " accepted) in " << r.virtual_seconds << " virtual s, " << r.wall_seconds << " wall s" << std::endl;
  return 0;
}

int run_worker(const NodeFlags& f, const sigset_t& signals) {
  if (f.coordinator.empty()) throw CLI::RequiredError("--coordinator");
  if (f.base_model.empty()) throw CLI::RequiredError("--base-model");
  if (f.data.empty()) throw CLI::RequiredError("--data");
  if (f.device != "cpu") throw CLI::ValidationError("--device", f.device + ": workers train on the CPU in this build");
  NodeSystem node;
  std::string id = f.node_id.empty() ? "worker-" + std::to_string(::getpid()) : f.node_id;
  auto coord = coordinator_of(node, f);
  // Where does the expert live? The coordinator's status has the placement and the shards' endpoints.
  std::string error;
  auto status = node_status(node, coord, std::chrono::milliseconds(30'000), &error);
  if (!status) throw std::runtime_error("cannot reach the coordinator: " + error);
  auto j = nlohmann::json::parse(*status);
  std::string expert = f.expert;
  if (expert.empty()) {
    if (j["experts"].empty()) throw std::runtime_error("the coordinator has no experts yet");
    expert = j["experts"][0]["expert_id"].get<std::string>();
  }
  if (!j["placement"].contains(expert)) {
    std::string known;
    for (const auto& e : j["experts"]) known += (known.empty() ? "" : ", ") + e["expert_id"].get<std::string>();
    throw std::runtime_error("the coordinator has no expert '" + expert + "' (registered: " +
                             (known.empty() ? "none" : known) + ")");
  }
  std::map<std::string, std::string> endpoints;
  for (const auto& m : j["members"]) endpoints[m["node_id"].get<std::string>()] = m.value("endpoint", "");
  actors::WorkerOptions o;
  for (const auto& shard : j["placement"][expert]) {
    auto ep = net::parse_endpoint(endpoints[shard.get<std::string>()]);
    if (!ep) continue;
    try {
      o.replicas.push_back(node.connect(ep->host, ep->port));
    } catch (const std::exception& e) {
      spdlog::warn("{}: replica {} unreachable: {}", id, shard.get<std::string>(), e.what());
    }
  }
  if (o.replicas.empty()) throw std::runtime_error("no replica of expert '" + expert + "' is reachable");

  auto base = model::load_pretrained(f.base_model);
  auto tok = model::load_tokenizer(f.tokenizer, f.base_model);
  auto data = model::prepare(model::load_examples(f.data), tok, size_t(f.seq_len), f.val_fraction, f.seed);
  model::LocalTrainingConfig lc;
  lc.steps = f.local_steps;
  lc.batch = f.batch;
  lc.lr = f.lr;
  lc.seed = f.seed;
  lc.keep_optimizer_state = f.keep_optimizer_state;
  o.worker_id = id;
  o.expert_id = expert;
  o.trainer = std::make_shared<model::LocalTrainer>(base, std::move(data), lc);
  o.rounds = f.rounds;
  o.speed_factor = f.speed_factor;
  o.sync_rounds = f.sync_rounds;
  o.latency_ms = f.latency_ms;
  o.jitter_ms = f.jitter_ms;
  o.seed = f.seed;
  o.membership.coordinator = coord;
  o.membership.coordinator_endpoint = f.coordinator;
  o.membership.heartbeat_ms = f.heartbeat_ms;
  auto w = node.own(node.system().spawn<caf::detached>(actors::worker, node.transport(), o));
  std::cout << "fedmoe-node: worker '" << id << "' training expert '" << expert << "' on " << o.replicas.size()
            << " replica(s)" << std::endl;
  if (f.rounds == 0) {
    int sig = wait_for_shutdown(signals);
    spdlog::info("{}: {} received, shutting down", id, sig == SIGINT ? "SIGINT" : "SIGTERM");
    return 0;
  }
  for (;;) {  // --rounds N: exit when they are done (or on a signal)
    auto ws = node_status(node, w, std::chrono::milliseconds(30'000), &error);
    if (ws) {
      auto wj = nlohmann::json::parse(*ws);
      if (wj["finished"].get<bool>()) {
        std::cout << wj.dump() << std::endl;
        return wj["accepted"].get<uint64_t>() > 0 ? 0 : 1;
      }
    }
    timespec wait{0, 200'000'000};
    if (sigtimedwait(&signals, nullptr, &wait) > 0) return 0;
  }
}

int run_shard(const NodeFlags& f, const sigset_t& signals) {
  auto listen = must_parse(f.listen, "--listen");
  const auto advertised = advertised_host(f, listen);
  auto opts = listening_options(f, listen, advertised);
  NodeSystem node(opts);
  std::string id = f.node_id.empty() ? "shard-" + std::to_string(::getpid()) : f.node_id;
  auto store = f.store;
  store.policy.staleness_function = model::StalenessFunction::parse(f.staleness_function);
  model::make_policy(store.policy);  // a bad configuration fails here, with the field named
  actors::ShardOptions so;
  so.store = store;
  so.membership.heartbeat_ms = f.heartbeat_ms;
  so.replication_timeout_ms = f.replication_timeout_ms;
  auto shard = node.own(node.system().spawn(actors::expert_shard_node, id, node.transport(), so));
  uint16_t port = node.publish(shard, listen.host, listen.port);
  if (auto coord = coordinator_of(node, f)) {
    const std::string endpoint = advertised + ":" + std::to_string(port);
    caf::anon_send(shard, actors::join_atom::value, coord, endpoint, f.coordinator);
  }
  announce("shard", id, listen.host, port, node);
  int sig = wait_for_shutdown(signals);
  spdlog::info("{}: {} received, shutting down", id, sig == SIGINT ? "SIGINT" : "SIGTERM");
  return 0;
}

// --router-data EXPERT=FILE[,FILE...] -> texts per expert (a prompt's part of each example).
std::map<std::string, std::vector<std::string>> router_texts(const std::vector<std::string>& specs) {
  std::vector<std::pair<std::string, std::vector<model::Example>>> domains;
  try {
    domains = model::load_domain_examples(specs);
  } catch (const std::invalid_argument& e) {
    throw CLI::ValidationError("--router-data", e.what());
  }
  std::map<std::string, std::vector<std::string>> texts;
  for (const auto& [expert, examples] : domains) {
    auto& out = texts[expert];
    for (const auto& ex : examples)
      if (auto t = model::routing_text(ex); !t.empty()) out.push_back(std::move(t));
  }
  return texts;
}

int run_router(const NodeFlags& f, const sigset_t& signals) {
  if (f.base_model.empty()) throw CLI::RequiredError("--base-model");
  if (f.device != "cpu") throw CLI::ValidationError("--device", f.device + ": routers generate on the CPU in this build");
  auto listen = must_parse(f.listen, "--listen");
  actors::RouterOptions o;
  o.node_id = f.node_id.empty() ? "router-" + std::to_string(::getpid()) : f.node_id;
  try {
    o.rules = std::make_shared<model::RuleRouter>(f.rules);
  } catch (const std::invalid_argument& e) {
    throw CLI::ValidationError("--rule", e.what());
  }
  auto base = model::load_pretrained(f.base_model);
  base->eval();
  auto tok = model::load_tokenizer(f.tokenizer, f.base_model);
  o.server = std::make_shared<model::ExpertServer>(base, tok);
  if (!f.router_data.empty()) {  // train the learned router now (and keep it when --router-model names a file)
    model::RouterTrainingReport report;
    model::RouterTrainingConfig rc;
    rc.max_texts = f.router_texts;
    auto learned = model::HiddenStateRouter::train(base, tok, router_texts(f.router_data), rc, &report);
    std::cout << "fedmoe-node: router trained on " << report.train_examples << " texts of "
              << learned.experts().size() << " experts: train accuracy " << report.train_accuracy
              << ", validation accuracy " << report.validation_accuracy << " (" << report.validation_examples
              << " held out), " << report.seconds << " s" << std::endl;
    if (!f.router_model.empty()) learned.save(f.router_model);
    o.learned = std::make_shared<model::HiddenStateRouter>(std::move(learned));
  } else if (!f.router_model.empty()) {
    o.learned = std::make_shared<model::HiddenStateRouter>(
        model::HiddenStateRouter::load(f.router_model, base->config().hidden_size));
  }
  if (f.routing == "rules" && o.rules->empty()) throw CLI::ValidationError("--routing", "rules: no --rule given");
  if (f.routing == "learned" && !o.learned)
    throw CLI::ValidationError("--routing", "learned: give --router-data EXPERT=FILE (to train) or --router-model FILE");
  o.routing = f.routing;
  o.combine = f.combine;
  o.max_experts = f.max_experts;
  o.consensus_replicas = f.consensus_replicas;
  o.default_expert = f.default_expert;
  o.max_new_tokens = f.max_new_tokens;
  o.reply_timeout_ms = f.reply_timeout_ms;
  o.membership.heartbeat_ms = f.heartbeat_ms;
  const auto advertised = advertised_host(f, listen);
  auto opts = listening_options(f, listen, advertised);
  NodeSystem node(opts);
  auto r = node.own(node.system().spawn<caf::detached>(actors::router, node.transport(), o));
  uint16_t port = node.publish(r, listen.host, listen.port);
  if (auto coord = coordinator_of(node, f)) {
    const std::string endpoint = advertised + ":" + std::to_string(port);
    caf::anon_send(r, actors::join_atom::value, coord, endpoint, f.coordinator);
  }
  announce("router", o.node_id, listen.host, port, node);
  int sig = wait_for_shutdown(signals);
  spdlog::info("{}: {} received, shutting down", o.node_id, sig == SIGINT ? "SIGINT" : "SIGTERM");
  return 0;
}

struct AskFlags {
  std::string router, prompt, combine;
  std::vector<std::string> experts;  // EXPERT or EXPERT@VERSION
  uint32_t max_experts = 0, max_new_tokens = 0, top_k = 0;
  float temperature = 0, top_p = 1;
  uint64_t seed = 0, timeout_ms = 120'000;
  bool json = false;
};

int run_ask(const AskFlags& f) {
  auto ep = must_parse(f.router, "--router");
  net::GenerateRequest req;
  req.prompt = f.prompt;
  req.max_experts = f.max_experts;
  req.max_new_tokens = f.max_new_tokens;
  req.temperature = f.temperature;
  req.top_k = f.top_k;
  req.top_p = f.top_p;
  req.seed = f.seed;
  req.combine = f.combine;
  for (const auto& e : f.experts) {
    const auto at = e.find('@');
    net::ExpertRef ref{e.substr(0, at), 0};
    if (at != std::string::npos) {
      try {
        ref.version = std::stoull(e.substr(at + 1));
      } catch (const std::exception&) {
        throw CLI::ValidationError("--expert", "'" + e + "': expected EXPERT or EXPERT@VERSION");
      }
    }
    req.experts.push_back(ref);
  }
  NodeSystem node;
  auto router = node.connect(ep.host, ep.port);
  std::string error;
  auto reply = ask_router(node, router, req, std::chrono::milliseconds(f.timeout_ms), &error);
  if (!reply) {
    std::cerr << "fedmoe-node ask: " << error << std::endl;
    return 1;
  }
  if (f.json) {
    const auto choices = actors::choices_json(reply->choices);
    nlohmann::json used = nlohmann::json::array();
    for (const auto& e : reply->experts) used.push_back({{"expert", e.expert_id}, {"version", e.version}});
    std::cout << nlohmann::json{{"choices", choices}, {"experts", used}, {"combine", reply->combine},
                                {"text", reply->text}, {"error", reply->error}}
                     .dump()
              << std::endl;
  } else {
    for (const auto& c : reply->choices)
      std::cout << "expert " << c.expert_id << " v" << c.version << " from " << (c.shard_id.empty() ? "-" : c.shard_id)
                << " (score " << c.score << ", " << c.reason << ")" << std::endl;
    if (reply->error.empty()) std::cout << "combine: " << reply->combine << "\n\n" << reply->text << std::endl;
  }
  if (!reply->error.empty()) {
    std::cerr << "fedmoe-node ask: " << reply->error << std::endl;
    return 1;
  }
  return 0;
}

struct PushFlags {
  std::string to;
  std::string expert = "python";
  std::string domain;
  std::string preset = "qwen2-0.5b";
  int64_t rank = 16;
  double alpha = 32;
  std::vector<std::string> targets{"q_proj", "v_proj"};
  double size_mib = 0;
  std::string init = "random";
  uint64_t seed = 1;
  uint64_t version = 1;
  bool pull_back = false;
  int64_t timeout_ms = 120'000;
};

int run_push(const PushFlags& f) {
  auto to = must_parse(f.to, "--to");
  auto cfg = model::qwen2_preset(f.preset);
  model::LoraSpec spec;
  spec.rank = f.rank;
  spec.alpha = f.alpha;
  spec.target_modules = f.targets;
  if (f.size_mib > 0) {  // the smallest rank whose fp32 adapter reaches the requested size
    spec.rank = 1;
    int64_t per_rank = model::lora_parameter_count(cfg, spec) * 4;
    spec.rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(f.size_mib * 1048576.0 / per_rank)));
  }
  auto init = f.init == "peft" ? model::LoraInit::peft : model::LoraInit::random;
  net::ExpertSnapshot snap;
  snap.spec = {f.expert, f.domain.empty() ? f.expert : f.domain, static_cast<uint32_t>(spec.rank),
               static_cast<float>(spec.alpha), 0.0f, spec.target_modules, f.preset, false};
  snap.version = f.version;
  snap.tensors = actors::to_wire(model::make_lora_tensors(cfg, spec, init, f.seed));

  NodeSystem node;
  auto shard = node.connect(to.host, to.port);
  auto timeout = std::chrono::milliseconds(f.timeout_ms);
  auto pushed = push_snapshot(node, shard, snap, timeout);
  if (!pushed.ok) {
    std::cerr << "fedmoe-node push: " << pushed.error << std::endl;
    return 1;
  }
  double mb = pushed.receipt.byte_count / 1e6;
  std::printf("pushed expert '%s' v%llu (%s, rank %lld): %u tensors, %.1f MB in %.3f s (%.0f MB/s); "
              "shard checksum %016llx verified\n",
              f.expert.c_str(), (unsigned long long)f.version, f.preset.c_str(), (long long)spec.rank,
              pushed.receipt.tensor_count, mb, pushed.seconds, mb / pushed.seconds,
              (unsigned long long)pushed.receipt.checksum);
  if (f.pull_back) {
    auto pulled = pull_snapshot(node, shard, f.expert, f.version, timeout);
    if (!pulled.ok) {
      std::cerr << "fedmoe-node push: pull back failed: " << pulled.error << std::endl;
      return 1;
    }
    if (pulled.checksum != pushed.local_checksum || pulled.snapshot.version != f.version) {
      std::cerr << "fedmoe-node push: pulled snapshot differs: checksum " << pulled.checksum << " vs "
                << pushed.local_checksum << std::endl;
      return 1;
    }
    std::printf("pulled expert '%s' v%llu back: %zu tensors in %.3f s (%.0f MB/s); checksum %016llx verified\n",
                f.expert.c_str(), (unsigned long long)pulled.snapshot.version, pulled.snapshot.tensors.size(),
                pulled.seconds, mb / pulled.seconds, (unsigned long long)pulled.checksum);
  }
  return 0;
}

struct ExpertFlags {
  std::string coordinator, add, remove, base_model, preset = "qwen2-0.5b", domain, init = "peft";
  int64_t rank = 16;
  double alpha = 32;
  std::vector<std::string> targets{"q_proj", "v_proj"};
  uint64_t seed = 1;
};

// Registers an expert and seeds each of its replicas with version 0 (PEFT init: B = 0, so the
// expert starts as the bare base), or removes one.
int run_expert(const ExpertFlags& f) {
  if (f.add.empty() == f.remove.empty()) throw CLI::ValidationError("expert", "give exactly one of --add ID, --remove ID");
  NodeSystem node;
  auto ep = must_parse(f.coordinator, "--coordinator");
  auto coord = node.connect(ep.host, ep.port);
  const auto timeout = std::chrono::milliseconds(60'000);
  net::ExpertSpec spec;
  spec.expert_id = f.add.empty() ? f.remove : f.add;
  spec.removed = !f.remove.empty();
  std::string error;
  if (spec.removed) {
    auto map = register_expert(node, coord, spec, timeout, &error);
    if (!map) throw std::runtime_error(error);
    std::cout << nlohmann::json{{"removed", spec.expert_id}, {"epoch", map->epoch}}.dump() << std::endl;
    return 0;
  }
  auto cfg = f.base_model.empty() ? model::qwen2_preset(f.preset)
                                  : model::load_qwen2_config((std::filesystem::path(f.base_model) / "config.json").string());
  model::LoraSpec ls;
  ls.rank = f.rank;
  ls.alpha = f.alpha;
  ls.target_modules = f.targets;
  spec.domain = f.domain.empty() ? spec.expert_id : f.domain;
  spec.lora_rank = static_cast<uint32_t>(f.rank);
  spec.lora_alpha = static_cast<float>(f.alpha);
  spec.target_modules = f.targets;
  spec.base_model_id = f.base_model.empty() ? f.preset : f.base_model;
  auto map = register_expert(node, coord, spec, timeout, &error);
  if (!map) throw std::runtime_error(error);
  net::ExpertSnapshot snap;
  snap.spec = spec;
  snap.version = 0;
  snap.tensors = actors::to_wire(
      model::make_lora_tensors(cfg, ls, f.init == "peft" ? model::LoraInit::peft : model::LoraInit::random, f.seed));
  nlohmann::json seeded = nlohmann::json::array();
  try {
    for (const auto& p : map->placements) {
      if (p.expert_id != spec.expert_id) continue;
      for (const auto& r : p.replicas) {
        auto rep = net::parse_endpoint(r.endpoint);
        if (!rep || net::is_wildcard_host(rep->host))
          throw std::runtime_error("replica " + r.shard_id + " has no reachable endpoint ('" + r.endpoint +
                                   "'; start it with --advertise HOST)");
        PushResult pushed;
        try {
          pushed = push_snapshot(node, node.connect(rep->host, rep->port), snap, timeout);
        } catch (const std::exception& e) {
          pushed.error = e.what();
        }
        if (!pushed.ok) throw std::runtime_error("seeding replica " + r.shard_id + ": " + pushed.error);
        seeded.push_back(r.shard_id);
      }
    }
    if (seeded.empty()) throw std::runtime_error("no shard to place expert '" + spec.expert_id + "' on yet");
  } catch (const std::exception& e) {
    // All or nothing: withdraw the registration, so that no half-seeded expert is left behind.
    auto withdraw = spec;
    withdraw.removed = true;
    std::string why;
    const bool withdrawn = register_expert(node, coord, withdraw, timeout, &why).has_value();
    throw std::runtime_error(std::string(e.what()) + (withdrawn ? "; the registration of '" + spec.expert_id +
                                                                      "' was withdrawn"
                                                                : "; withdrawing the registration failed too: " + why));
  }
  std::cout << nlohmann::json{{"added", spec.expert_id}, {"epoch", map->epoch}, {"replicas", seeded}}.dump() << std::endl;
  return 0;
}

int run_status(const std::string& target, bool verbose) {
  auto ep = must_parse(target, "--coordinator");
  NodeSystem node;
  auto actor = node.connect(ep.host, ep.port);
  std::string error;
  auto json = node_status(node, actor, std::chrono::milliseconds(10'000), &error, verbose);
  if (!json) {
    std::cerr << "fedmoe-node status: " << error << std::endl;
    return 1;
  }
  std::cout << *json << std::endl;
  return 0;
}

}  // namespace

int node_main(int argc, char** argv) {
  auto signals = block_shutdown_signals();
  CLI::App app{"fedmoe-node: a node of a fedmoe federation (coordinator, worker, expert shard, router or a "
               "whole simulated federation)"};
  app.option_defaults()->always_capture_default();
  app.set_config("--config", "", "TOML file with any of these options (command-line flags win)");
  app.require_subcommand(0, 1);

  NodeFlags nf;
  app.add_option("--role", nf.role, "coordinator|worker|shard|router|sim")
      ->check(CLI::IsMember({"coordinator", "worker", "shard", "router", "sim"}));
  app.add_option("--listen", nf.listen, "HOST:PORT to publish this node's actor on (port 0: any free port)");
  app.add_option("--node-id", nf.node_id, "this node's id (default: role-pid)");
  app.add_option("--advertise", nf.advertise,
                 "host that peers use to reach this node, its actor and its bulk channel (default: the --listen "
                 "host; for a wildcard --listen 0.0.0.0 or [::], this host's address on the route to the coordinator)");
  app.add_option("--bulk-advertise", nf.bulk_advertise,
                 "host that peers use to reach this node's bulk channel, when it differs from --advertise "
                 "(without --advertise it is advertised for the node's actor too, as before --advertise existed)");

  app.add_option("--coordinator", nf.coordinator, "HOST:PORT of the coordinator to join");
  app.add_option("--heartbeat-ms", nf.heartbeat_ms,
                 "heartbeat period towards the coordinator (a primary shard stops acknowledging after half a "
                 "lease without an answer: keep it well under half the coordinator's --lease-ms)");
  app.add_option("--replication-timeout-ms", nf.replication_timeout_ms,
                 "shard: an in-sync replica silent this long leaves the in-sync set")
      ->group("Shard");
  app.add_option("--replication", nf.replication, "coordinator: replicas per expert (R)")->group("Coordinator");
  app.add_option("--min-insync", nf.min_insync,
                 "coordinator: a push is acknowledged only when this many replicas hold it (default 2, 1 when R = 1)")
      ->group("Coordinator");
  app.add_option("--lease-ms", nf.lease_ms, "coordinator: a member silent this long is dead")->group("Coordinator");
  const char* worker_group = "Worker";
  app.add_option("--expert", nf.expert, "worker: the expert to train (default: the coordinator's choice)")
      ->group(worker_group);
  app.add_option("--data", nf.data, "worker: private JSON lines / text files")->group(worker_group);
  app.add_option("--base-model", nf.base_model, "worker, router: Hugging Face Qwen2 directory of the shared base")
      ->group(worker_group);
  app.add_option("--tokenizer", nf.tokenizer, "worker, router: tokenizer.json (default: the base model's)")->group(worker_group);
  app.add_option("--device", nf.device, "worker: cpu")->group(worker_group);
  app.add_option("--speed-factor", nf.speed_factor, "worker: behave like a device this many times slower")
      ->group(worker_group);
  app.add_flag("--keep-optimizer-state", nf.keep_optimizer_state,
               "worker, sim: carry AdamW's moments from round to round (default: a fresh AdamW each round)")
      ->group(worker_group);
  app.add_flag("--sync-rounds", nf.sync_rounds,
               "worker: start each round from a newer version than the last (synchronous FedAvg rounds)")
      ->group(worker_group);
  app.add_option("--latency-ms", nf.latency_ms, "worker: delay every message it sends")->group(worker_group);
  app.add_option("--jitter-ms", nf.jitter_ms, "worker: +- random part of the latency")->group(worker_group);
  app.add_option("--rounds", nf.rounds, "worker: pushes to make, then exit (0: until stopped)")->group(worker_group);
  app.add_option("--local-steps", nf.local_steps, "worker: LoRA steps per round (K)")->group(worker_group);
  app.add_option("--batch", nf.batch, "worker: sequences per step")->group(worker_group);
  app.add_option("--seq-len", nf.seq_len, "worker: tokens per packed sequence")->group(worker_group);
  app.add_option("--lr", nf.lr, "worker: AdamW learning rate")->group(worker_group);
  app.add_option("--seed", nf.seed, "worker: data order and update ids")->group(worker_group);

  const char* router_group = "Router";
  app.add_option("--rule", nf.rules, "router: EXPERT:REGEX or EXPERT=WORD,WORD (case-insensitive; repeatable)")
      ->group(router_group);
  app.add_option("--routing", nf.routing, "router: rules | learned | auto (rules, then learned, then default)")
      ->check(CLI::IsMember({"rules", "learned", "auto"}))->group(router_group);
  app.add_option("--router-data", nf.router_data,
                 "router: EXPERT=FILE[,FILE]: domain data to train the learned router on (repeatable)")
      ->group(router_group);
  app.add_option("--router-model", nf.router_model,
                 "router: learned router file (written after training with --router-data, else read)")
      ->group(router_group);
  app.add_option("--router-texts", nf.router_texts,
                 "router, sim: the learned router trains on an even sample of this many texts per expert (0: all)")
      ->group(router_group);
  app.add_option("--combine", nf.combine, "router: stitch (experts answer in turn) | consensus (replicas averaged)")
      ->check(CLI::IsMember({"stitch", "consensus"}))->group(router_group);
  app.add_option("--max-experts", nf.max_experts, "router: experts per prompt")->group(router_group);
  app.add_option("--consensus-replicas", nf.consensus_replicas, "router: replicas averaged per expert in consensus")
      ->group(router_group);
  app.add_option("--default-expert", nf.default_expert, "router: expert for prompts nothing matches")->group(router_group);
  app.add_option("--max-new-tokens", nf.max_new_tokens, "router: tokens to generate when a request says 0")
      ->group(router_group);
  app.add_option("--reply-timeout-ms", nf.reply_timeout_ms, "router: a replica silent this long is failed over")
      ->group(router_group);

  const char* sim_group = "Simulation (--role sim)";
  app.add_option("--clock", nf.clock, "sim: virtual (discrete events, a cost model) or real")
      ->check(CLI::IsMember({"virtual", "real"}))->group(sim_group);
  auto* workers_opt = app.add_option("--workers", nf.sim.workers, "sim: simulated workers (real clock: default 4)")
                          ->group(sim_group);
  app.add_option("--expert-data", nf.expert_data,
                 "sim, real clock: EXPERT=FILE[,FILE]: an expert and its domain data, split among its workers "
                 "(repeatable)")
      ->group(sim_group);
  app.add_option("--shards", nf.shards, "sim, real clock: expert shards")->group(sim_group);
  app.add_option("--duration-s", nf.duration_s,
                 "sim, real clock: stop the workers this many seconds after they start (without --rounds: as many rounds as fit)")
      ->group(sim_group);
  app.add_option("--eval-every-s", nf.eval_every_s,
                 "sim, real clock: take each expert's newest version this often for the validation curve")
      ->group(sim_group);
  app.add_option("--validation-data", nf.validation_data,
                 "sim, real clock: EXPERT=FILE[,FILE]: held-out data of the validation curve (default: a tenth "
                 "of --expert-data)")
      ->group(sim_group);
  app.add_option("--eval-examples", nf.eval_examples, "sim, real clock: validation examples per expert")->group(sim_group);
  app.add_option("--out-dir", nf.out_dir,
                 "sim, real clock: write each expert's final version here as a PEFT adapter (OUT/EXPERT/), and the "
                 "learned router (OUT/router.safetensors)")
      ->group(sim_group);
  app.add_option("--compute-slots", nf.compute_slots,
                 "sim, real clock: at most this many workers compute at once, in turn (e.g. the number of cores; "
                 "speed factors then scale a step's cost on a core of its own; 0: off)")
      ->group(sim_group);
  app.add_option("--local-eval-batches", nf.local_eval_batches,
                 "sim, real clock: validation batches of each round's local before/after loss (< 0: none; the "
                 "validation curve is measured apart)")
      ->group(sim_group);
  app.add_option("--ask", nf.prompts,
                 "sim, real clock: a prompt to ask the router at the end, up to --max-experts experts (repeatable)")
      ->group(sim_group);
  app.add_option("--model-config", nf.model_config, "sim, real clock: config.json of a fresh base (without --base-model)")
      ->group(sim_group);
  app.add_option("--rank", nf.rank, "sim, real clock: LoRA rank of the experts")->group(sim_group);
  app.add_option("--alpha", nf.alpha, "sim, real clock: LoRA alpha")->group(sim_group);
  app.add_option("--targets", nf.targets, "sim, real clock: LoRA target modules")->delimiter(',')->group(sim_group);
  app.add_option("--experts", nf.sim.experts, "sim: experts")->group(sim_group);
  app.add_option("--updates-per-worker", nf.sim.updates_per_worker, "sim: pushes each worker makes")->group(sim_group);
  app.add_option("--dim", nf.sim.dim, "sim: parameters per expert")->group(sim_group);
  app.add_option("--compute-seconds", nf.sim.compute_seconds, "sim: a round's compute at speed factor 1")
      ->group(sim_group);
  app.add_option("--speed-min", nf.sim.speed_min, "sim: smallest speed factor (round time multiplier)")->group(sim_group);
  app.add_option("--speed-max", nf.sim.speed_max, "sim: largest speed factor")->group(sim_group);
  app.add_option("--serve-ms", nf.sim.serve_ms, "sim: shard time per update")->group(sim_group);
  app.add_option("--sim-local-steps", nf.sim.local_steps, "sim: gradient steps per round")->group(sim_group);
  app.add_option("--sim-lr", nf.sim.lr, "sim: local learning rate")->group(sim_group);
  app.add_option("--data-spread", nf.sim.data_spread, "sim: how far workers' private optima lie apart")->group(sim_group);
  app.add_option("--metrics-every", nf.sim.metrics_every_s, "sim: virtual seconds between loss lines")->group(sim_group);
  app.add_option("--temperature", nf.temperature, "sim, real clock: sampling temperature of the asks' answers (0: greedy)")
      ->group(sim_group);
  app.add_option("--top-k", nf.top_k, "sim, real clock: sample the asks' answers from the k likeliest tokens (0: off)")
      ->group(sim_group);
  app.add_option("--top-p", nf.top_p, "sim, real clock: nucleus sampling of the asks' answers (1: off)")->group(sim_group);
  app.add_option("--metrics", nf.metrics, "sim: write metrics JSON lines here (default: stdout)")->group(sim_group);

  auto& pc = nf.store.policy;
  const char* shard_group = "Shard: aggregation and durability";
  app.add_option("--policy", pc.name, "aggregation policy: fedavg|fedasync|fedbuff")
      ->check(CLI::IsMember({"fedavg", "fedasync", "fedbuff"}))->group(shard_group);
  app.add_option("--server-lr", pc.server_lr, "server learning rate applied to every aggregated step")->group(shard_group);
  app.add_option("--staleness-decay", pc.staleness_decay, "decay of the staleness function")->group(shard_group);
  app.add_option("--max-staleness", pc.max_staleness, "updates staler than this are rejected")->group(shard_group);
  app.add_option("--clip-norm", pc.clip_norm, "clip each update's global L2 norm to this (0: off)")->group(shard_group);
  app.add_option("--async-alpha", pc.alpha, "fedasync: mixing weight alpha (a_t = alpha * s(staleness))")->group(shard_group);
  app.add_option("--staleness-function", nf.staleness_function, "fedasync: constant|polynomial|hinge|exponential")
      ->check(CLI::IsMember({"constant", "polynomial", "hinge", "exponential"}))->group(shard_group);
  app.add_option("--staleness-exponent", pc.staleness_exponent, "fedasync polynomial: (1 + staleness)^-exponent")
      ->group(shard_group);
  app.add_option("--hinge-start", pc.hinge_start, "fedasync hinge: full weight up to this staleness")->group(shard_group);
  app.add_option("--clients-per-round", pc.clients_per_round, "fedavg: updates per round")->group(shard_group);
  app.add_option("--min-updates", pc.min_updates, "fedavg: a round closes at its deadline with at least this many")
      ->group(shard_group);
  app.add_option("--round-deadline-ms", pc.round_deadline_ms,
                 "fedavg: close a round this long after its first update (stragglers arriving later are stale; 0: never)")
      ->group(shard_group);
  app.add_option("--buffer-size", pc.buffer_size, "fedbuff: updates per aggregation (K)")->group(shard_group);
  app.add_option("--state-dir", nf.store.state_dir,
                 "keep experts and every accepted update here; a restarted shard resumes from it")->group(shard_group);
  app.add_option("--snapshot-every", nf.store.snapshot_every, "versions between snapshots (the log covers the rest)")
      ->group(shard_group);

  PushFlags pf;
  auto* push = app.add_subcommand("push", "send an expert snapshot to a shard and verify its checksum");
  push->add_option("--to", pf.to, "the shard's HOST:PORT")->required();
  push->add_option("--expert", pf.expert, "expert id");
  push->add_option("--domain", pf.domain, "domain (default: the expert id)");
  push->add_option("--preset", pf.preset, "base model shape: qwen2-0.5b|qwen2-1.5b|qwen2-7b|tiny");
  push->add_option("--rank", pf.rank, "LoRA rank");
  push->add_option("--alpha", pf.alpha, "LoRA alpha");
  push->add_option("--targets", pf.targets, "LoRA target modules")->delimiter(',');
  push->add_option("--size-mib", pf.size_mib, "pick the rank so that the snapshot is at least this large");
  push->add_option("--init", pf.init, "peft (B = 0) or random")->check(CLI::IsMember({"peft", "random"}));
  push->add_option("--seed", pf.seed, "initialization seed");
  push->add_option("--version", pf.version, "snapshot version");
  push->add_flag("--pull-back", pf.pull_back, "pull the snapshot back from the shard and verify it");
  push->add_option("--timeout-ms", pf.timeout_ms, "give up after this long");

  ExpertFlags ef;
  auto* expert = app.add_subcommand("expert", "add an expert to the federation (seeding its replicas) or remove one");
  expert->add_option("--coordinator", ef.coordinator, "HOST:PORT of the coordinator")->required();
  expert->add_option("--add", ef.add, "expert id to register");
  expert->add_option("--remove", ef.remove, "expert id to remove");
  expert->add_option("--base-model", ef.base_model, "the base the expert adapts (its config.json gives the shapes)");
  expert->add_option("--preset", ef.preset, "or a preset base shape: qwen2-0.5b|qwen2-1.5b|qwen2-7b|tiny");
  expert->add_option("--domain", ef.domain, "domain (default: the expert id)");
  expert->add_option("--rank", ef.rank, "LoRA rank");
  expert->add_option("--alpha", ef.alpha, "LoRA alpha");
  expert->add_option("--targets", ef.targets, "LoRA target modules")->delimiter(',');
  expert->add_option("--init", ef.init, "peft (B = 0) or random")->check(CLI::IsMember({"peft", "random"}));

  AskFlags af;
  auto* ask = app.add_subcommand("ask", "ask a router: prints the chosen experts with their versions, then the generation");
  ask->add_option("--router", af.router, "HOST:PORT of the router")->required();
  ask->add_option("prompt", af.prompt, "the prompt")->required();
  ask->add_option("--expert", af.experts, "skip routing: use this expert (EXPERT or EXPERT@VERSION; repeatable)");
  ask->add_option("--max-experts", af.max_experts, "experts to route to (0: the router's default)");
  ask->add_option("--combine", af.combine, "stitch | consensus (default: the router's)")
      ->check(CLI::IsMember({"stitch", "consensus"}));
  ask->add_option("--max-new-tokens", af.max_new_tokens, "tokens to generate (0: the router's default)");
  ask->add_option("--temperature", af.temperature, "0: greedy");
  ask->add_option("--top-k", af.top_k, "0: off");
  ask->add_option("--top-p", af.top_p, "1: off");
  ask->add_option("--seed", af.seed, "sampling seed");
  ask->add_option("--timeout-ms", af.timeout_ms, "give up after this long");
  ask->add_flag("--json", af.json, "print one JSON document");

  std::string status_target;
  auto* status = app.add_subcommand("status", "print a node's status as JSON");
  status->add_option("--coordinator", status_target, "HOST:PORT of the node to ask")->required();
  bool status_verbose = false;
  status->add_flag("--verbose", status_verbose, "with the bulky parts (a shard's retained update ids)");

  try {
    app.parse(argc, argv);
    nf.workers_given = workers_opt->count() > 0;
    if (push->parsed()) return run_push(pf);
    if (status->parsed()) return run_status(status_target, status_verbose);
    if (expert->parsed()) return run_expert(ef);
    if (ask->parsed()) return run_ask(af);
    if (nf.role.empty()) throw CLI::RequiredError("--role");
    if (nf.role == "shard") return run_shard(nf, signals);
    if (nf.role == "coordinator") return run_coordinator(nf, signals);
    if (nf.role == "worker") return run_worker(nf, signals);
    if (nf.role == "sim") return run_sim(nf);
    if (nf.role == "router") return run_router(nf, signals);
    std::cerr << "fedmoe-node: unknown role '" << nf.role << "'" << std::endl;
    return 2;
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "fedmoe-node: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace fedmoe::runtime
