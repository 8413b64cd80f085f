#include "model/trainer.hpp"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

namespace fedmoe::model {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double lr_at(const TrainConfig& cfg, int64_t step) {
  if (cfg.warmup_steps > 0 && step < cfg.warmup_steps) return cfg.lr * double(step + 1) / double(cfg.warmup_steps);
  int64_t decay_steps = std::max<int64_t>(1, cfg.total_steps - cfg.warmup_steps);
  double progress = std::clamp(double(step - cfg.warmup_steps) / double(decay_steps), 0.0, 1.0);
  double floor = cfg.lr * cfg.min_lr_ratio;
  return floor + (cfg.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

std::pair<torch::Tensor, torch::Tensor> make_batch(const std::vector<PackedSequence>& data,
                                                   const std::vector<size_t>& indices) {
  const int64_t b = static_cast<int64_t>(indices.size());
  const int64_t t = static_cast<int64_t>(data.at(indices.at(0)).input_ids.size());
  auto inputs = torch::empty({b, t}, torch::kInt64);  // [B, T]
  auto labels = torch::empty({b, t}, torch::kInt64);  // [B, T]
  auto* in = inputs.data_ptr<int64_t>();
  auto* lb = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    const auto& seq = data[indices[i]];
    if (static_cast<int64_t>(seq.input_ids.size()) != t || seq.labels.size() != seq.input_ids.size())
      throw std::invalid_argument("make_batch: sequences of different lengths in one batch");
    std::copy(seq.input_ids.begin(), seq.input_ids.end(), in + i * t);
    std::copy(seq.labels.begin(), seq.labels.end(), lb + i * t);
  }
  return {inputs, labels};
}

namespace {

int64_t supervised_tokens(const torch::Tensor& labels) { return (labels != kIgnoreLabel).sum().item<int64_t>(); }

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(s / 3600), (long long)(s / 60 % 60), (long long)(s % 60));
  else std::snprintf(buf, sizeof buf, "%02lld:%02lld", (long long)(s / 60), (long long)(s % 60));
  return buf;
}

}  // namespace

struct Trainer::Impl {
  TrainTarget target;
  TrainConfig cfg;
  std::unique_ptr<torch::optim::AdamW> optimizer;
  int64_t step = 0;
  double best_val_loss = std::numeric_limits<double>::infinity();

  Impl(TrainTarget t, TrainConfig c) : target(std::move(t)), cfg(std::move(c)) {
    if (target.params.empty()) throw std::invalid_argument("Trainer: nothing to train (no parameters)");
    if (cfg.batch_size <= 0 || cfg.grad_accum <= 0 || cfg.total_steps < 0)
      throw std::invalid_argument("Trainer: batch_size and grad_accum must be positive");
    std::vector<torch::Tensor> params;
    for (auto& [name, p] : target.params) {
      if (!p.requires_grad()) throw std::invalid_argument("Trainer: parameter '" + name + "' does not require grad");
      params.push_back(p);
    }
    torch::optim::AdamWOptions o(cfg.lr);
    o.betas({cfg.beta1, cfg.beta2}).eps(cfg.eps).weight_decay(cfg.weight_decay);
    optimizer = std::make_unique<torch::optim::AdamW>(params, o);
  }

  void set_lr(double lr) {
    for (auto& group : optimizer->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }

  // Micro-batch `k` of the whole run: epoch k / per_epoch, in that epoch's seeded order. A function of
  // the step alone, which is what makes resume exact.
  std::vector<size_t> micro_batch(size_t n, int64_t k) const {
    size_t per_epoch = std::max<size_t>(1, n / cfg.batch_size);
    uint64_t epoch = static_cast<uint64_t>(k) / per_epoch;
    size_t pos = static_cast<size_t>(k) % per_epoch;
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    shuffle_deterministic(order, cfg.seed * 0x9e3779b97f4a7c15ull + epoch);
    std::vector<size_t> out;
    for (size_t i = 0; i < static_cast<size_t>(cfg.batch_size); ++i) out.push_back(order[(pos * cfg.batch_size + i) % n]);
    return out;
  }
};

Trainer::Trainer(TrainTarget target, TrainConfig cfg) : impl_(std::make_unique<Impl>(std::move(target), std::move(cfg))) {}
Trainer::~Trainer() = default;

int64_t Trainer::step() const { return impl_->step; }

void Trainer::save_checkpoint(const std::string& dir) const {
  torch::serialize::OutputArchive archive;
  archive.write("step", torch::tensor(impl_->step, torch::kInt64));
  archive.write("best_val_loss", torch::tensor(impl_->best_val_loss, torch::kFloat64));
  for (const auto& [name, p] : impl_->target.params) archive.write("param/" + name, p.detach());
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    archive.write("rng", gen.get_state());
  }
  torch::serialize::OutputArchive opt;
  impl_->optimizer->save(opt);
  archive.write("optimizer", opt);

  fs::path target(dir), tmp = target;
  tmp += ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  archive.save_to((tmp / "trainer.pt").string());
  nlohmann::json info = {{"step", impl_->step}, {"best_val_loss", impl_->best_val_loss}};
  std::ofstream(tmp / "trainer.json") << info.dump(2) << "\n";
  fs::path old = target;
  old += ".old";
  fs::remove_all(old);
  if (fs::exists(target)) fs::rename(target, old);
  fs::rename(tmp, target);
  fs::remove_all(old);
}

int64_t Trainer::resume(const std::string& dir) {
  auto file = fs::path(dir) / "trainer.pt";
  if (!fs::exists(file)) throw std::runtime_error("resume: no checkpoint at " + file.string());
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(file.string());
  } catch (const c10::Error& e) {
    throw std::runtime_error("resume: " + file.string() + " is not a readable checkpoint");
  }
  auto read = [&](const std::string& key) {
    torch::Tensor t;
    if (!archive.try_read(key, t)) throw std::runtime_error("resume: " + file.string() + " has no '" + key + "'");
    return t;
  };
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : impl_->target.params) {
      auto t = read("param/" + name);
      if (t.sizes() != p.sizes())
        throw std::runtime_error("resume: parameter '" + name + "' has shape " + c10::str(t.sizes()) + " in " +
                                 file.string() + " but " + c10::str(p.sizes()) + " in the model");
      p.copy_(t);
    }
  }
  impl_->step = read("step").item<int64_t>();
  impl_->best_val_loss = read("best_val_loss").item<double>();
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(read("rng"));
  }
  torch::serialize::InputArchive opt;
  if (!archive.try_read("optimizer", opt)) throw std::runtime_error("resume: " + file.string() + " has no optimizer state");
  impl_->optimizer->load(opt);
  return impl_->step;
}

EvalResult Trainer::evaluate(const std::vector<PackedSequence>& validation) const {
  EvalResult r;
  if (validation.empty()) return r;
  torch::NoGradGuard no_grad;
  impl_->target.set_training(false);
  double total = 0;
  for (size_t start = 0; start < validation.size(); start += impl_->cfg.batch_size) {
    std::vector<size_t> idx;
    for (size_t i = start; i < std::min(validation.size(), start + size_t(impl_->cfg.batch_size)); ++i) idx.push_back(i);
    auto [inputs, labels] = make_batch(validation, idx);
    int64_t n = supervised_tokens(labels);
    if (n == 0) continue;
    total += impl_->target.loss(inputs, labels).item<double>() * double(n);
    r.tokens += n;
  }
  impl_->target.set_training(true);
  r.loss = r.tokens ? total / double(r.tokens) : 0;
  r.perplexity = std::exp(r.loss);
  return r;
}

TrainResult Trainer::run(const std::vector<PackedSequence>& train, const std::vector<PackedSequence>& validation,
                         int64_t stop_at) {
  auto& m = *impl_;
  const auto& cfg = m.cfg;
  if (train.empty()) throw std::invalid_argument("Trainer: no training sequences");
  TrainResult result;
  const bool tty = ::isatty(fileno(stderr));
  auto mode = cfg.progress;
  if (mode == TrainConfig::Progress::automatic) mode = tty ? TrainConfig::Progress::bar : TrainConfig::Progress::lines;
  std::ofstream metrics;
  if (!cfg.out_dir.empty()) {
    fs::create_directories(cfg.out_dir);
    metrics.open(fs::path(cfg.out_dir) / "metrics.jsonl", std::ios::app);
  }
  auto eval_and_record = [&]() {
    auto ev = evaluate(validation);
    result.last_eval = ev;
    if (metrics.is_open())
      metrics << nlohmann::json{{"event", "eval"}, {"step", m.step}, {"val_loss", ev.loss}, {"val_ppl", ev.perplexity}}.dump()
              << "\n" << std::flush;
    if (mode != TrainConfig::Progress::none)
      std::fprintf(stderr, "%seval step %lld: val_loss %.4f ppl %.2f\n", mode == TrainConfig::Progress::bar ? "\n" : "",
                   (long long)m.step, ev.loss, ev.perplexity);
    if (ev.tokens > 0 && ev.loss < m.best_val_loss) {
      m.best_val_loss = ev.loss;
      if (!cfg.out_dir.empty()) save_checkpoint((fs::path(cfg.out_dir) / "best").string());
    }
  };

  m.target.set_training(true);
  auto t_start = Clock::now();
  const int64_t first_step = m.step;
  int64_t tokens_seen = 0;
  const int64_t last_step = stop_at >= 0 ? std::min(stop_at, cfg.total_steps) : cfg.total_steps;
  while (m.step < last_step) {
    double lr = lr_at(cfg, m.step);
    m.set_lr(lr);
    m.optimizer->zero_grad();
    // Weight each micro-batch by its share of the step's supervised tokens, so that accumulation
    // equals one large batch.
    std::vector<std::pair<torch::Tensor, torch::Tensor>> micro;
    int64_t step_tokens = 0;
    for (int64_t a = 0; a < cfg.grad_accum; ++a) {
      micro.push_back(make_batch(train, m.micro_batch(train.size(), m.step * cfg.grad_accum + a)));
      step_tokens += supervised_tokens(micro.back().second);
    }
    double step_loss = 0;
    for (auto& [inputs, labels] : micro) {
      int64_t n = supervised_tokens(labels);
      if (n == 0) continue;
      auto loss = m.target.loss(inputs, labels);
      (loss * (double(n) / double(step_tokens))).backward();
      step_loss += loss.item<double>() * double(n) / double(step_tokens);
      tokens_seen += inputs.numel();
    }
    if (cfg.max_grad_norm > 0) {
      std::vector<torch::Tensor> params;
      for (auto& [name, p] : m.target.params) params.push_back(p);
      torch::nn::utils::clip_grad_norm_(params, cfg.max_grad_norm);
    }
    m.optimizer->step();
    ++m.step;
    result.last_loss = step_loss;

    double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();
    double tok_s = elapsed > 0 ? tokens_seen / elapsed : 0;
    result.tokens_per_second = tok_s;
    if (metrics.is_open())
      metrics << nlohmann::json{{"event", "train"}, {"step", m.step}, {"loss", step_loss}, {"lr", lr}, {"tokens_per_s", tok_s},
                                {"elapsed_s", elapsed}}.dump()
              << "\n";
    double eta = (elapsed / double(m.step - first_step)) * double(cfg.total_steps - m.step);
    if (mode == TrainConfig::Progress::bar) {
      int filled = int(30.0 * double(m.step) / double(std::max<int64_t>(1, cfg.total_steps)));
      std::fprintf(stderr, "\r[%.*s%*s] step %lld/%lld loss %.4f lr %.2e %.0f tok/s ETA %s ", filled,
                   "##############################", 30 - filled, "", (long long)m.step, (long long)cfg.total_steps,
                   step_loss, lr, tok_s, format_duration(eta).c_str());
      std::fflush(stderr);
    } else if (mode == TrainConfig::Progress::lines && (m.step % std::max<int64_t>(1, cfg.log_every) == 0 || m.step == last_step)) {
      std::fprintf(stderr, "step %lld/%lld loss %.4f lr %.2e %.0f tok/s ETA %s\n", (long long)m.step,
                   (long long)cfg.total_steps, step_loss, lr, tok_s, format_duration(eta).c_str());
    }
    if (cfg.eval_every > 0 && m.step % cfg.eval_every == 0 && !validation.empty()) eval_and_record();
    if (cfg.save_every > 0 && m.step % cfg.save_every == 0 && !cfg.out_dir.empty())
      save_checkpoint((fs::path(cfg.out_dir) / "checkpoint-last").string());
  }
  if (mode == TrainConfig::Progress::bar) std::fprintf(stderr, "\n");
  if (!validation.empty() && (cfg.eval_every <= 0 || m.step % cfg.eval_every != 0)) eval_and_record();
  if (!cfg.out_dir.empty()) save_checkpoint((fs::path(cfg.out_dir) / "checkpoint-last").string());
  result.steps = m.step;
  result.best_val_loss = m.best_val_loss;
  return result;
}

}  // namespace fedmoe::model
