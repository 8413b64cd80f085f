#include "model/local_update.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include <torch/torch.h>

#include "model/lm_loss.hpp"
#include "model/trainer.hpp"

namespace fedmoe::model {

LocalTrainer::LocalTrainer(Qwen2ForCausalLM base, DataSplit data, LocalTrainingConfig config)
    : experts_(std::move(base)), data_(std::move(data)), config_(config) {
  if (data_.train.empty()) throw std::invalid_argument("a local trainer needs training data");
  if (config_.steps <= 0 || config_.batch <= 0) throw std::invalid_argument("local steps and batch must be positive");
  order_.resize(data_.train.size());
  std::iota(order_.begin(), order_.end(), size_t{0});
  shuffle_deterministic(order_, config_.seed);
}

void LocalTrainer::load(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter) {
  if (experts_.contains("local")) experts_.detach("local");
  experts_.import_adapter("local", spec, adapter);
  experts_.activate("local");
}

ComputeSlots::ComputeSlots(size_t slots) : slots_(std::max<size_t>(slots, 1)), free_(slots_) {}

void ComputeSlots::acquire() {
  std::unique_lock<std::mutex> lock(mutex_);
  const uint64_t ticket = next_ticket_++;
  changed_.wait(lock, [&] { return ticket == serving_ && free_ > 0; });
  ++serving_;
  --free_;
  changed_.notify_all();  // the next ticket may take another free slot
}

size_t ComputeSlots::waiting() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return size_t(next_ticket_ - serving_);
}

void ComputeSlots::release() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++free_;
  }
  changed_.notify_all();
}

double evaluate_loss(Qwen2ForCausalLM& model, const std::vector<PackedSequence>& sequences, int64_t batch,
                     int64_t max_batches) {
  if (sequences.empty()) return std::numeric_limits<double>::quiet_NaN();
  torch::NoGradGuard no_grad;
  model->eval();
  double total = 0;
  int64_t batches = 0;
  for (size_t start = 0; start < sequences.size(); start += size_t(batch)) {
    if (max_batches > 0 && batches >= max_batches) break;
    std::vector<size_t> idx;
    for (size_t i = start; i < std::min(sequences.size(), start + size_t(batch)); ++i) idx.push_back(i);
    auto [ids, labels] = make_batch(sequences, idx);
    total += causal_lm_loss(model, ids, labels).item<double>();
    ++batches;
  }
  return total / double(batches);
}

double LocalTrainer::validation_loss() {
  if (config_.eval_batches < 0) return std::numeric_limits<double>::quiet_NaN();  // local evaluation off
  return evaluate_loss(experts_.model(), data_.validation, config_.batch, config_.eval_batches);
}

double LocalTrainer::evaluate(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter) {
  load(spec, adapter);
  return validation_loss();
}

LocalRound LocalTrainer::train(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter) {
  const auto t0 = std::chrono::steady_clock::now();
  load(spec, adapter);
  LocalRound r;
  r.val_loss_before = validation_loss();
  auto& model = experts_.model();
  model->train();
  auto named = experts_.named_parameters("local");
  std::vector<torch::Tensor> params;
  for (auto& [name, p] : named) params.push_back(p);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(config_.lr).weight_decay(0.0));
  // AdamW keys its per-parameter state by the tensor's implementation (as its step() looks it up).
  auto key = [](const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); };
  if (config_.keep_optimizer_state)
    for (auto& [name, p] : named) {
      auto it = moments_.find(name);
      if (it == moments_.end() || !it->second.exp_avg.sizes().equals(p.sizes())) continue;
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(it->second.step);
      st->exp_avg(it->second.exp_avg.clone());
      st->exp_avg_sq(it->second.exp_avg_sq.clone());
      opt.state()[key(p)] = std::move(st);
    }
  double loss_sum = 0, held_seconds = 0;
  for (int64_t step = 0; step < config_.steps; ++step) {
    if (config_.cancel && config_.cancel->load()) throw TrainingCancelled("local training cancelled");
    std::vector<size_t> idx;
    while (idx.size() < size_t(config_.batch)) {
      if (cursor_ == order_.size()) {  // a new epoch over the local data, reshuffled
        cursor_ = 0;
        shuffle_deterministic(order_, config_.seed + ++epoch_);
      }
      idx.push_back(order_[cursor_++]);
    }
    auto [ids, labels] = make_batch(data_.train, idx);
    struct Slot {  // held for the step, released on any exit
      ComputeSlots* slots;
      std::chrono::steady_clock::time_point since;
      double* held;
      explicit Slot(ComputeSlots* s, double* h) : slots(s), held(h) {
        if (slots) slots->acquire();
        since = std::chrono::steady_clock::now();
      }
      ~Slot() {
        *held += std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
        if (slots) slots->release();
      }
    } slot(config_.compute_slots.get(), &held_seconds);
    opt.zero_grad();
    auto loss = causal_lm_loss(model, ids, labels);
    loss.backward();
    if (config_.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(params, config_.max_grad_norm);
    opt.step();
    loss_sum += loss.item<double>();
    r.samples += idx.size();
  }
  if (config_.keep_optimizer_state)
    for (auto& [name, p] : named) {
      auto it = opt.state().find(key(p));
      if (it == opt.state().end()) continue;
      auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
      moments_[name] = {st.step(), st.exp_avg().detach().clone(), st.exp_avg_sq().detach().clone()};
    }
  r.steps = config_.steps;
  r.train_loss = loss_sum / double(config_.steps);
  r.val_loss_after = validation_loss();
  for (auto& [name, t] : experts_.adapter_state_dict("local"))
    r.delta.emplace(name, t - adapter.at(name).to(torch::kFloat32));
  r.compute_seconds = config_.compute_slots
                          ? held_seconds
                          : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace fedmoe::model
