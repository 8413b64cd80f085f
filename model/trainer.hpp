// The training loop: AdamW, gradient clipping, linear warmup then cosine decay, gradient
// accumulation weighted by supervised tokens, evaluation every N steps (loss and perplexity),
// checkpoints every N steps plus a copy of the best-validation one, and resume that continues the
// identical trajectory (parameters, optimizer moments, RNG state and data position are all restored).
//
// It trains whatever TrainTarget describes, so the same loop serves LoRA experts, a full
// pretraining run, or a test's toy module.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "model/data.hpp"

namespace fedmoe::model {

struct TrainConfig {
  double lr = 2e-4;
  double min_lr_ratio = 0.1;  // the cosine decays to lr * min_lr_ratio
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double max_grad_norm = 1.0;  // 0 = no clipping
  int64_t warmup_steps = 0;
  int64_t total_steps = 100;
  int64_t batch_size = 4;      // sequences per micro-batch
  int64_t grad_accum = 1;      // micro-batches per optimizer step
  int64_t eval_every = 0;      // 0 = only at the end
  int64_t save_every = 0;      // 0 = only at the end (when out_dir is set)
  int64_t log_every = 10;      // plain log lines (the terminal bar redraws every step)
  uint64_t seed = 0;           // data order
  std::string out_dir;         // checkpoint-last/, best/, metrics.jsonl; "" = keep nothing
  enum class Progress { automatic, bar, lines, none } progress = Progress::automatic;
};

// Learning rate at optimizer step `step` (0-based): linear warmup to lr, then cosine to the floor.
double lr_at(const TrainConfig& cfg, int64_t step);

struct TrainTarget {
  // The parameters the optimizer updates, named (the names key the checkpoint).
  std::vector<std::pair<std::string, torch::Tensor>> params;
  // Mean cross-entropy over the labels that are not kIgnoreLabel. input_ids, labels: [B, T] int64.
  std::function<torch::Tensor(const torch::Tensor& input_ids, const torch::Tensor& labels)> loss;
  // Switches dropout and the like between training and evaluation.
  std::function<void(bool training)> set_training;
};

struct EvalResult {
  double loss = 0;
  double perplexity = 0;
  int64_t tokens = 0;
};

struct TrainResult {
  int64_t steps = 0;
  double last_loss = 0;
  std::optional<EvalResult> last_eval;
  double best_val_loss = std::numeric_limits<double>::infinity();
  double tokens_per_second = 0;
};

class Trainer {
 public:
  Trainer(TrainTarget target, TrainConfig cfg);
  ~Trainer();

  // Restores everything a checkpoint holds; throws std::runtime_error naming the directory and the
  // problem (missing file, a parameter absent or of another shape). Returns the step it resumes at.
  int64_t resume(const std::string& checkpoint_dir);
  // Writes a checkpoint atomically (a temporary directory renamed into place).
  void save_checkpoint(const std::string& dir) const;

  // Trains from the current step to cfg.total_steps, or only up to `stop_at` when given (a run cut
  // short on purpose; the schedule still follows total_steps).
  TrainResult run(const std::vector<PackedSequence>& train, const std::vector<PackedSequence>& validation,
                  int64_t stop_at = -1);
  EvalResult evaluate(const std::vector<PackedSequence>& validation) const;

  int64_t step() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// [B, T] int64 tensors from packed sequences.
std::pair<torch::Tensor, torch::Tensor> make_batch(const std::vector<PackedSequence>& data,
                                                   const std::vector<size_t>& indices);

}  // namespace fedmoe::model
