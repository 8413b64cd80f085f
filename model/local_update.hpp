// One round of a federated client (what a worker computes between a pull and a push): start from an
// expert version's adapter, train K local steps on private data, and return the delta to that
// version, with the figures a shard weighs it by and a worker reports (sample count, losses,
// compute time). The frozen base is loaded once and shared by every round.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <map>
#include <string>

#include <torch/types.h>

#include "model/dataset.hpp"
#include "model/lora.hpp"

namespace fedmoe::model {

// Trainers that emulate separate devices on fewer cores share one of these: at most `slots` of them
// compute at a time, granted in arrival order (a ticket queue), so that a worker that never waits
// cannot take the cores from the others. A round's compute_seconds then counts only the time it held
// a slot — what the step costs on a core of its own — and a speed-factor delay scales that.
class ComputeSlots {
 public:
  explicit ComputeSlots(size_t slots);
  void acquire();
  void release();
  size_t slots() const { return slots_; }
  size_t waiting() const;  // callers queued in acquire() (the tickets not yet served)

 private:
  const size_t slots_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  size_t free_;
  uint64_t next_ticket_ = 0, serving_ = 0;
};

struct LocalTrainingConfig {
  int64_t steps = 8;          // optimizer steps per round (K)
  int64_t batch = 4;          // sequences per step
  double lr = 1e-3;           // AdamW, fresh each round (local SGD)
  double max_grad_norm = 1.0;
  int64_t eval_batches = 4;   // validation batches per evaluation (0 = the whole split, < 0 = none: NaN)
  uint64_t seed = 0;          // data order
  // Carry AdamW's moments (and step count) from one round to the next, by parameter name: the
  // adapter values are each round's new version, the gradient statistics stay this worker's. Without
  // it every round starts a fresh AdamW, whose first steps move every parameter by about lr
  // (sign-like) — noisy when rounds are a few steps long.
  bool keep_optimizer_state = false;
  // When set, each optimizer step (forward, backward, update) holds one of these slots.
  std::shared_ptr<ComputeSlots> compute_slots;
  // Checked before every step: when it turns true, train() throws TrainingCancelled (a federation
  // that is being stopped does not wait for whole rounds).
  std::shared_ptr<const std::atomic<bool>> cancel;
};

struct TrainingCancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct LocalRound {
  std::map<std::string, torch::Tensor> delta;  // trained - given adapter, fp32, PEFT names
  double train_loss = 0;        // mean over the round's steps
  double val_loss_before = 0;   // on the local validation split, before and after training
  double val_loss_after = 0;    //   (NaN without validation data)
  uint64_t samples = 0;         // sequences trained on
  int64_t steps = 0;
  double compute_seconds = 0;   // wall time of the round, or with compute_slots the time it held a slot
};

// Mean next-token loss of `model` (evaluation mode, no gradients) over `sequences`, `batch` at a time:
// the mean of the batches' mean losses, over the first max_batches batches (0 = all). NaN for none.
double evaluate_loss(Qwen2ForCausalLM& model, const std::vector<PackedSequence>& sequences, int64_t batch,
                     int64_t max_batches = 0);

class LocalTrainer {
 public:
  LocalTrainer(Qwen2ForCausalLM base, DataSplit data, LocalTrainingConfig config);

  // K steps from `adapter` (an expert version's tensors by PEFT name, shapes checked against the base:
  // std::invalid_argument names any that do not fit). The data position carries over between rounds.
  LocalRound train(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter);

  // Mean loss of `adapter` on the local validation split (NaN when there is none).
  double evaluate(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter);

  const DataSplit& data() const { return data_; }

 private:
  void load(const LoraSpec& spec, const std::map<std::string, torch::Tensor>& adapter);
  double validation_loss();

  struct Moments {
    int64_t step = 0;
    torch::Tensor exp_avg, exp_avg_sq;
  };
  std::map<std::string, Moments> moments_;  // keep_optimizer_state: by PEFT parameter name

  LoraExperts experts_;
  DataSplit data_;
  LocalTrainingConfig config_;
  std::vector<size_t> order_;
  size_t cursor_ = 0;
  uint64_t epoch_ = 0;
};

}  // namespace fedmoe::model
