// The router actor against real expert shards in one actor system: rule routing to the right expert
// (its text equals a local generation with that expert's adapter), several experts stitched, TR-FMoE
// consensus over two replicas, new versions learned from the shards' notices (then served from the
// cache until the next one), failover from a dead replica, and clear errors for unknown experts and
// unroutable prompts.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <thread>

#include <caf/send.hpp>
#include <nlohmann/json.hpp>

#include "actors/expert_shard.hpp"
#include "actors/router.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/expert_server.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "net/text.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"
#include "model_test_util.hpp"
#include "federation_test_util.hpp"

using namespace fedmoe;
using Catch::Matchers::Contains;

namespace {

using fedmoe::test::status_of;
const std::string kTokenizer = fedmoe::test::kTokenizerPath;
const auto kTimeout = fedmoe::test::kFederationTimeout;

struct Experts {
  model::Qwen2Config cfg = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json");
  model::Tokenizer tok = model::Tokenizer::from_file(kTokenizer);
  model::LoraSpec spec;
  Experts() { spec.rank = 4, spec.alpha = 16, spec.target_modules = {"q_proj", "v_proj"}; }

  // Strong random adapters, so that the experts' greedy answers differ.
  std::vector<model::NamedTensor> tensors(uint64_t seed) const {
    auto t = model::make_lora_tensors(cfg, spec, model::LoraInit::random, seed);
    for (auto& nt : t) nt.tensor = nt.tensor * 20;
    return t;
  }
  net::ExpertSnapshot snapshot(const std::string& id, uint64_t seed, uint64_t version) const {
    net::ExpertSnapshot s;
    s.spec = {id, id, 4, 16.0f, 0.0f, spec.target_modules, "fedmoe-tiny", false};
    s.version = version;
    s.tensors = actors::to_wire(tensors(seed));
    return s;
  }
  std::shared_ptr<model::ExpertServer> server() const {
    return std::make_shared<model::ExpertServer>(fedmoe::test::make_model(cfg, 5), tok);
  }
  // What a router must answer with expert `seed`'s tensors: a local generation.
  std::string expected(const std::vector<model::NamedTensor>& adapter, const std::string& prompt,
                       int64_t max_new_tokens) const {
    auto s = server();
    std::map<std::string, torch::Tensor> m;
    for (const auto& nt : adapter) m.emplace(nt.name, nt.tensor);
    model::GenerationOptions g;
    g.max_new_tokens = max_new_tokens;
    return s->generate({s->attach("x", 0, spec, m)}, prompt, g);
  }
};


net::GenerateReply ask(runtime::NodeSystem& node, const caf::actor& router, net::GenerateRequest req) {
  std::string error;
  auto r = runtime::ask_router(node, router, req, kTimeout, &error);
  INFO(error);
  REQUIRE(r);
  return *r;
}

net::GenerateRequest gen(uint64_t id, const std::string& prompt) {
  net::GenerateRequest r;
  r.request_id = id;
  r.prompt = prompt;
  r.max_new_tokens = 8;
  return r;
}

actors::RouterOptions router_options(const Experts& ex, const std::vector<std::pair<std::string, caf::actor>>& shards) {
  actors::RouterOptions o;
  o.node_id = "router-test";
  o.server = ex.server();
  o.rules = std::make_shared<model::RuleRouter>(
      std::vector<std::string>{"sql=select,from,where", "python=def,import,return"});
  o.reply_timeout_ms = 1000;
  for (const auto& [id, h] : shards) {
    o.shards[id] = h;
    o.placement["sql"].push_back(id);
    o.placement["python"].push_back(id);
  }
  return o;
}

}  // namespace

TEST_CASE("router: rules pick the expert, replicas serve it, versions advance by notice, failover",
          "[router]") {
  Experts ex;
  runtime::NodeSystem node;
  actors::ExpertStoreOptions so;
  so.policy.name = "fedasync";
  std::vector<std::pair<std::string, caf::actor>> shards;
  for (const char* id : {"s0", "s1"}) {
    auto s = node.own(node.system().spawn(actors::expert_shard_with, std::string(id), node.transport(), so));
    REQUIRE(runtime::push_snapshot(node, s, ex.snapshot("sql", 1, 1), kTimeout).ok);
    REQUIRE(runtime::push_snapshot(node, s, ex.snapshot("python", 2, 1), kTimeout).ok);
    shards.emplace_back(id, s);
  }
  auto router = node.own(node.system().spawn<caf::detached>(actors::router, node.transport(), router_options(ex, shards)));

  const std::string sql_prompt = "SELECT name FROM users WHERE id = 7";
  const std::string sql_expected = ex.expected(ex.tensors(1), sql_prompt, 8);
  const std::string python_expected = ex.expected(ex.tensors(2), sql_prompt, 8);
  REQUIRE(sql_expected != python_expected);  // otherwise the next checks could not tell the experts apart

  SECTION("one expert by rule; then several stitched; consensus over two replicas") {
    auto r = ask(node, router, gen(1, sql_prompt));
    CHECK(r.error.empty());
    REQUIRE(r.choices.size() == 1);
    CHECK(r.choices[0].expert_id == "sql");
    CHECK(r.choices[0].score == 3);
    CHECK_THAT(r.choices[0].reason, Contains("sql=select,from,where"));
    REQUIRE(r.experts.size() == 1);
    CHECK(r.experts[0].expert_id == "sql");
    CHECK(r.experts[0].version == 1);
    CHECK(r.combine == "single");
    CHECK(r.text == sql_expected);

    auto p = ask(node, router, gen(2, "import os\ndef f(): return 1"));
    REQUIRE(p.choices.size() == 1);
    CHECK(p.choices[0].expert_id == "python");

    auto both = gen(3, "def load(): return db.run('SELECT id FROM users')");
    both.max_experts = 2;
    auto b = ask(node, router, both);
    REQUIRE(b.choices.size() == 2);
    CHECK(b.combine == "stitch");
    CHECK_THAT(b.text, Contains("[python]\n") && Contains("[sql]\n"));

    auto consensus = gen(4, sql_prompt);
    consensus.combine = "consensus";
    auto c = ask(node, router, consensus);
    CHECK(c.combine == "consensus");
    REQUIRE(c.experts.size() == 2);  // one copy from each replica, same version
    CHECK(c.experts[0].version == c.experts[1].version);
    CHECK_THAT(c.choices[0].shard_id, Contains("s0") && Contains("s1"));
    CHECK(c.text == sql_expected);  // equal replicas: their average is each of them
  }

  SECTION("a new version is announced to the router, fetched once, then served from its cache") {
    REQUIRE(ask(node, router, gen(1, sql_prompt)).experts[0].version == 1);
    auto before = status_of(node, router);
    // An update to both replicas (without a coordinator each applies it itself).
    net::UpdatePush u;
    u.expert_id = "sql";
    u.worker_id = "w";
    u.update_id = "u1";
    u.base_version = 1;
    u.sample_count = 4;
    for (const auto& nt : ex.tensors(7)) u.deltas.push_back(actors::to_wire(nt.name, nt.tensor * 0.1));
    for (const auto& [id, s] : shards) REQUIRE(runtime::push_update(node, s, u, kTimeout).accepted);
    nlohmann::json st;
    for (int i = 0; i < 100; ++i) {
      st = status_of(node, router);
      if (st["version_notices"].get<int>() > 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    CHECK(st["version_notices"].get<int>() >= 1);
    auto r2 = ask(node, router, gen(2, sql_prompt));
    CHECK(r2.experts[0].version == 2);
    CHECK(r2.text != sql_expected);
    auto mid = status_of(node, router);
    CHECK(mid["fetches"].get<int>() == before["fetches"].get<int>() + 1);
    auto r3 = ask(node, router, gen(3, sql_prompt));
    CHECK(r3.experts[0].version == 2);
    CHECK(r3.text == r2.text);
    auto after = status_of(node, router);
    CHECK(after["fetches"] == mid["fetches"]);  // served from the attached v2
    CHECK(after["cache_hits"].get<int>() == mid["cache_hits"].get<int>() + 1);
    // A client may ask for at least a version: one no replica has yet is a clear error.
    auto ahead = gen(4, sql_prompt);
    ahead.experts = {{"sql", 3}};
    auto r4 = ask(node, router, ahead);
    CHECK_THAT(r4.error, Contains("no replica of expert 'sql' answered") && Contains("version_unavailable") &&
                             Contains("v3 was asked for"));
    ahead.experts = {{"sql", 2}};
    CHECK(ask(node, router, ahead).experts[0].version == 2);
  }

  SECTION("a dead replica is failed over to the next one") {
    caf::anon_send_exit(shards[0].second, caf::exit_reason::kill);
    auto r = ask(node, router, gen(1, sql_prompt));
    CHECK(r.error.empty());
    REQUIRE(r.choices.size() == 1);
    CHECK(r.choices[0].shard_id == "s1");
    CHECK(r.text == sql_expected);
    auto st = status_of(node, router);
    CHECK(st["failovers"] == 1);
    CHECK(st["replicas"]["s0"]["failures"] == 1);
    CHECK(st["replicas"]["s1"]["answers"] == 1);
    // The failed replica now ranks last: the next pull goes straight to s1.
    CHECK(st["replicas"]["s1"]["score"].get<double>() > st["replicas"]["s0"]["score"].get<double>());
    auto p = ask(node, router, gen(2, "def f(): return 2"));
    CHECK(p.choices[0].shard_id == "s1");
    CHECK(status_of(node, router)["failovers"] == 1);
  }

  SECTION("prompts in Chinese and Japanese, cut anywhere, never take the router down") {
    // Qwen's home languages: a prompt whose 80th byte falls inside a character used to kill the
    // router at its next status (the prompt's head, cut there, made nlohmann::json::dump throw).
    std::string zh = "select name from users where  ";
    while (zh.size() < 120) zh += "\xE8\xAF\xB7\xE7\x94\xA8\xE4\xB8\xAD\xE6\x96\x87";  // 请用中文
    REQUIRE((static_cast<uint8_t>(zh[80]) & 0xC0) == 0x80);  // byte 80 is inside a character
    std::string ja = "\xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1\xE3\x81\xAF";  // こんにちは
    while (ja.size() < 100) ja += ja;
    ja.resize(100);  // and one cut mid-character by the client itself
    CHECK(ask(node, router, gen(10, zh)).error.empty());
    CHECK_THAT(ask(node, router, gen(11, ja)).error, Contains("no expert matches"));
    auto st = status_of(node, router);  // the router still answers
    CHECK(st["generations"] == 1);
    CHECK(st["failed_generations"] == 1);
    REQUIRE(st["recent"].size() == 2);
    for (const auto& r : st["recent"]) {
      const auto head = r["prompt"].get<std::string>();
      CHECK(head.size() <= 80);
      CHECK(net::is_valid_utf8(head));
    }
    CHECK(st["recent"][0]["prompt"].get<std::string>() == zh.substr(0, 78));  // cut back to the boundary
    CHECK(ask(node, router, gen(12, sql_prompt)).text == sql_expected);   // and serves on
  }

  SECTION("unknown experts and unroutable prompts get a clear error") {
    auto unknown = gen(1, "anything");
    unknown.experts = {{"nosuch", 0}};
    auto u = ask(node, router, unknown);
    CHECK_THAT(u.error, Contains("unknown expert 'nosuch'") && Contains("known: python, sql"));
    auto n = ask(node, router, gen(2, "hello there"));
    CHECK_THAT(n.error, Contains("no expert matches"));
    auto bad = gen(3, sql_prompt);
    bad.combine = "vote";
    CHECK_THAT(ask(node, router, bad).error, Contains("combine 'vote'"));
    auto st = status_of(node, router);
    CHECK(st["failed_generations"] == 3);
    CHECK(st["generations"] == 0);
  }
}
