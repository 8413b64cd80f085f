#include "runtime/node_main.hpp"

#include <csignal>
#include <cmath>
#include <iostream>
#include <pthread.h>

#include <CLI/CLI.hpp>
#include <caf/send.hpp>
#include <spdlog/spdlog.h>

#include "actors/expert_shard.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/lora_expert.hpp"
#include "net/endpoint.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

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
  std::string bulk_advertise;
  // shard: aggregation and durability
  actors::ExpertStoreOptions store;
  std::string staleness_function = "exponential";
};

int run_shard(const NodeFlags& f, const sigset_t& signals) {
  auto listen = must_parse(f.listen, "--listen");
  NodeSystemOptions opts;
  opts.bulk_bind_host = listen.host;
  opts.bulk_advertise_host = f.bulk_advertise;
  NodeSystem node(opts);
  std::string id = f.node_id.empty() ? "shard-" + std::to_string(::getpid()) : f.node_id;
  auto store = f.store;
  store.policy.staleness_function = model::StalenessFunction::parse(f.staleness_function);
  model::make_policy(store.policy);  // a bad configuration fails here, with the field named
  auto shard = node.own(node.system().spawn(actors::expert_shard_with, id, node.transport(), store));
  uint16_t port = node.publish(shard, listen.host, listen.port);
  // Scripts wait for this line (and read the port from it when --listen asked for port 0).
  std::cout << "fedmoe-node: shard '" << id << "' listening on " << listen.host << ":" << port
            << " (bulk channel port " << node.transport()->bulk_port() << ")" << std::endl;
  int sig = wait_for_shutdown(signals);
  spdlog::info("{}: {} received, shutting down", id, sig == SIGINT ? "SIGINT" : "SIGTERM");
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

int run_status(const std::string& target) {
  auto ep = must_parse(target, "--coordinator");
  NodeSystem node;
  auto actor = node.connect(ep.host, ep.port);
  std::string error;
  auto json = node_status(node, actor, std::chrono::milliseconds(10'000), &error);
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
  app.add_option("--bulk-advertise", nf.bulk_advertise,
                 "host that peers use to reach this node's bulk channel (default: the --listen host)");

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

  std::string status_target;
  auto* status = app.add_subcommand("status", "print a node's status as JSON");
  status->add_option("--coordinator", status_target, "HOST:PORT of the node to ask")->required();

  try {
    app.parse(argc, argv);
    if (push->parsed()) return run_push(pf);
    if (status->parsed()) return run_status(status_target);
    if (nf.role.empty()) throw CLI::RequiredError("--role");
    if (nf.role == "shard") return run_shard(nf, signals);
    std::cerr << "fedmoe-node: role '" << nf.role
              << "' is not available in this build yet; available: --role shard, and the push and status subcommands"
              << std::endl;
    return 2;
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "fedmoe-node: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace fedmoe::runtime
