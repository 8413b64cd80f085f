// The training loop on a toy language model (embedding -> dropout -> linear), small enough that
// exactness can be checked bit for bit.

#include <filesystem>
#include <fstream>

#include <torch/torch.h>
// glog (via LibTorch) defines CHECK too; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "model/trainer.hpp"

using namespace fedmoe::model;
namespace fs = std::filesystem;

namespace {

struct ToyLMImpl : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear head{nullptr};
  explicit ToyLMImpl(double p) {
    embed = register_module("embed", torch::nn::Embedding(32, 16));
    dropout = register_module("dropout", torch::nn::Dropout(p));
    head = register_module("head", torch::nn::Linear(16, 32));
  }
  torch::Tensor forward(const torch::Tensor& ids) { return head(dropout(embed(ids))); }  // [B, T, 32]
};
TORCH_MODULE(ToyLM);

TrainTarget target_for(ToyLM& model) {
  TrainTarget t;
  for (auto& item : model->named_parameters()) t.params.emplace_back(item.key(), item.value());
  t.loss = [model](const torch::Tensor& ids, const torch::Tensor& labels) mutable {
    auto logits = model->forward(ids);
    return torch::nn::functional::cross_entropy(
        logits.reshape({-1, 32}), labels.reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreLabel));
  };
  t.set_training = [model](bool on) mutable { model->train(on); };
  return t;
}

std::vector<PackedSequence> toy_data(size_t n, uint64_t seed) {
  // A learnable pattern: next = (3 * current + 1) mod 32, with some labels masked out.
  std::vector<TokenizedExample> ex;
  uint64_t s = seed;
  for (size_t i = 0; i < n; ++i) {
    TokenizedExample e;
    int32_t x = static_cast<int32_t>((s = s * 6364136223846793005ull + 1442695040888963407ull) >> 59);
    for (int k = 0; k < 9; ++k) {
      e.ids.push_back(x);
      e.loss_mask.push_back(k % 4 != 0);
      x = (3 * x + 1) % 32;
    }
    ex.push_back(e);
  }
  return pack(ex, 8, 0, true);
}

ToyLM fresh_model(double dropout) {
  torch::manual_seed(1234);
  return ToyLM(dropout);
}

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("fedmoe_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST_CASE("trainer: warmup then cosine to the floor", "[trainer]") {
  TrainConfig c;
  c.lr = 1.0;
  c.min_lr_ratio = 0.1;
  c.warmup_steps = 4;
  c.total_steps = 14;
  CHECK(lr_at(c, 0) == Approx(0.25));
  CHECK(lr_at(c, 3) == Approx(1.0));
  CHECK(lr_at(c, 4) == Approx(1.0));
  CHECK(lr_at(c, 9) == Approx(0.55));  // halfway through the decay: floor + (peak - floor) / 2
  CHECK(lr_at(c, 14) == Approx(0.1));
  CHECK(lr_at(c, 100) == Approx(0.1));
  c.min_lr_ratio = 1.0;  // a constant rate after the warmup (fedmoe finetune --min-lr-ratio 1)
  CHECK(lr_at(c, 0) == Approx(0.25));
  CHECK(lr_at(c, 9) == Approx(1.0));
  CHECK(lr_at(c, 14) == Approx(1.0));
}

TEST_CASE("trainer: 20 steps equal 10 steps, resume, 10 steps — bit for bit", "[trainer]") {
  auto train = toy_data(64, 1), val = toy_data(16, 2);
  TrainConfig c;
  c.lr = 1e-2;
  c.warmup_steps = 3;
  c.total_steps = 20;
  c.batch_size = 4;
  c.progress = TrainConfig::Progress::none;

  auto straight = fresh_model(0.2);  // dropout draws from the RNG: resume must restore it
  Trainer(target_for(straight), c).run(train, val);

  auto dir = temp_dir("resume");
  auto cut = fresh_model(0.2);
  {
    auto cfg = c;
    cfg.out_dir = dir.string();
    Trainer first(target_for(cut), cfg);
    first.run(train, val, 10);
    CHECK(first.step() == 10);
  }
  torch::manual_seed(999);  // whatever happened to the RNG since must not matter
  auto resumed_model = fresh_model(0.2);
  Trainer second(target_for(resumed_model), c);
  CHECK(second.resume((dir / "checkpoint-last").string()) == 10);
  second.run(train, val);

  auto a = straight->named_parameters(), b = resumed_model->named_parameters();
  for (auto& item : a) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), b[item.key()]));
  }
  // Sanity: training moved the weights.
  CHECK_FALSE(torch::equal(a["head.weight"], fresh_model(0.2)->named_parameters()["head.weight"]));
  fs::remove_all(dir);
}

TEST_CASE("trainer: gradient accumulation equals one large batch", "[trainer]") {
  auto train = toy_data(32, 3);
  TrainConfig c;
  c.lr = 1e-2;
  c.total_steps = 6;
  c.progress = TrainConfig::Progress::none;
  c.batch_size = 4;
  auto big = fresh_model(0.0);
  Trainer(target_for(big), c).run(train, {});
  c.batch_size = 2;
  c.grad_accum = 2;
  auto accum = fresh_model(0.0);
  Trainer(target_for(accum), c).run(train, {});
  auto a = big->named_parameters(), b = accum->named_parameters();
  for (auto& item : a) CHECK(torch::allclose(item.value(), b[item.key()], 1e-5, 1e-6));
}

TEST_CASE("trainer: evaluation, metrics, best copy and loss going down", "[trainer]") {
  auto train = toy_data(64, 4), val = toy_data(16, 5);
  auto dir = temp_dir("metrics");
  TrainConfig c;
  c.lr = 3e-2;
  c.total_steps = 40;
  c.eval_every = 10;
  c.save_every = 20;
  c.progress = TrainConfig::Progress::none;
  c.out_dir = dir.string();
  auto model = fresh_model(0.0);
  Trainer trainer(target_for(model), c);
  auto before = trainer.evaluate(val);
  CHECK(before.perplexity == Approx(std::exp(before.loss)));
  auto r = trainer.run(train, val);
  REQUIRE(r.last_eval);
  CHECK(r.last_eval->loss < before.loss * 0.5);
  CHECK(r.best_val_loss <= r.last_eval->loss);
  CHECK(fs::exists(dir / "best" / "trainer.pt"));
  CHECK(fs::exists(dir / "checkpoint-last" / "trainer.pt"));
  std::ifstream in(dir / "metrics.jsonl");
  int train_lines = 0, eval_lines = 0;
  for (std::string line; std::getline(in, line);) {
    train_lines += line.find("\"event\":\"train\"") != std::string::npos;
    eval_lines += line.find("\"event\":\"eval\"") != std::string::npos;
  }
  CHECK(train_lines == 40);
  CHECK(eval_lines == 4);
  fs::remove_all(dir);
}

TEST_CASE("trainer: resume names what is wrong with a checkpoint", "[trainer]") {
  auto model = fresh_model(0.0);
  TrainConfig c;
  c.progress = TrainConfig::Progress::none;
  Trainer t(target_for(model), c);
  CHECK_THROWS_WITH(t.resume("/nonexistent/ckpt"), Catch::Contains("no checkpoint at /nonexistent/ckpt"));

  auto dir = temp_dir("mismatch");
  t.save_checkpoint(dir.string());
  TrainTarget tt;
  tt.params.emplace_back("head.weight", torch::zeros({3, 3}, torch::requires_grad()));
  tt.loss = [](const torch::Tensor&, const torch::Tensor&) { return torch::zeros({}); };
  tt.set_training = [](bool) {};
  Trainer wrong(tt, c);
  CHECK_THROWS_WITH(wrong.resume(dir.string()), Catch::Contains("'head.weight'") && Catch::Contains("[3, 3]"));
  fs::remove_all(dir);
}
