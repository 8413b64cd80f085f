// The real-time simulation of a federation (`fedmoe-node --role sim --clock real`): a coordinator,
// shards, workers and a router as actors in this one process, talking through the same transport as
// separate nodes do, with real LoRA training on a real (small) base. What is simulated is only the
// fleet: each worker gets a disjoint part of its expert's data, a speed factor S in
// [speed_min, speed_max] (worker_speeds: each expert's workers spread over the whole range, so every
// expert has its fastest and its slowest device), and a message latency with jitter. A worker with
// factor S behaves like a device whose rounds take S / speed_min x time_scale as long as on a core of
// this machine; time_scale is 1 unless the workers share compute slots (device_time_scale).
//
// Output: metrics JSON lines — one per finished worker round ("event": "round": expert, versions,
// staleness, verdict, losses, compute and delay seconds), then "event": "summary" (per expert:
// version, accepted and rejected by reason; the staleness histogram; wall seconds), then one
// "event": "ask" per expert: the router's choice for a held-out prompt of that expert's data, then
// one per configured prompt (up to max_experts experts each), then the "event": "eval" lines (t,
// expert, version, val_loss, val_ppl).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "model/aggregation.hpp"

namespace fedmoe::runtime {

struct RealSimConfig {
  std::vector<std::string> expert_data;  // EXPERT=FILE[,FILE...]: the experts and their domain data
  uint64_t workers = 4;                  // assigned to experts round-robin
  uint64_t shards = 3;
  uint64_t replication = 2;
  uint64_t rounds = 3;                   // pushes per worker (0 with duration_s: as many as fit)
  double duration_s = 0;                 // > 0: stop the workers this many seconds after they start
  std::string base_model;                // Hugging Face Qwen2 directory; "" = a fresh base of model_config
  std::string model_config = "examples/models/fedmoe-tiny.json";
  std::string tokenizer;                 // "" = the base's, else the one scripts/setup installs
  int64_t rank = 8;
  double alpha = 16;
  std::vector<std::string> targets{"q_proj", "v_proj"};
  int64_t local_steps = 4, batch = 4, seq_len = 64;
  int64_t local_eval_batches = 1;        // a round's local before/after loss (batches; < 0: off, NaN)
  bool keep_optimizer_state = false;     // workers carry AdamW's moments between rounds
  size_t compute_slots = 0;              // > 0: at most this many workers compute at once (model::ComputeSlots)
  double lr = 5e-3;
  double speed_min = 0.5, speed_max = 2.0;
  uint64_t latency_ms = 0, jitter_ms = 0;
  std::vector<std::string> rules;        // router rules (a learned router is trained on the expert data too)
  size_t router_texts = 400;             // the learned router's training texts per expert (an even sample)
  uint32_t max_new_tokens = 16;
  uint64_t seed = 1;
  model::PolicyConfig policy;
  // Validation loss over time: every eval_every_s the newest version of each expert is taken from its
  // primary (and once at the start and at the end); after the run, when the cores are free again,
  // each is evaluated on the expert's validation data (EXPERT=FILE, else its held-out tenth), at most
  // eval_examples examples, each on its own first seq_len tokens (as `fedmoe eval` scores them).
  // One "event": "eval" line per (time, expert).
  double eval_every_s = 0;               // 0: only the start and the end
  std::vector<std::string> validation_data;
  size_t eval_examples = 64;
  std::string out_dir;                   // when set: OUT/<expert>/ the final version as a PEFT adapter, and
                                         //   OUT/router.safetensors the learned router
  std::vector<std::string> prompts;      // asked of the router after the held-out ones ("event": "ask")
  uint32_t max_experts = 2;              // experts per prompt for `prompts` (held-out ones get 1)
  float temperature = 0;                 // sampling of the asks' answers (0: greedy), seeded with `seed`
  uint32_t top_k = 0;
  float top_p = 1;
};

struct RealSimResult {
  uint64_t updates = 0, accepted = 0;
  uint64_t routed_right = 0, asked = 0;  // held-out prompts the router sent to their own expert
  double wall_seconds = 0;
};

// Speed factor per worker (workers are dealt round-robin to `experts` experts): an expert with n > 1
// workers gets speed_min + (speed_max - speed_min) * k / (n - 1) for its k-th one, so that every
// expert sees the whole range; an expert with one worker gets the even global spread's value at
// that worker's index.
std::vector<double> worker_speeds(size_t experts, uint64_t workers, double speed_min, double speed_max);

// With compute slots, emulated devices share `slots` cores. A device of factor F is busy 1/F of
// its time, so the fleet needs sum(speed_min / S) cores; when that exceeds the slots, every device
// is made time_scale = sum / slots times slower (the same factor for every run with these speeds),
// so that each still gets the compute its factor promises and the speed ratios stay as configured.
// 1 without slots, or when the slots suffice.
double device_time_scale(const std::vector<double>& speeds, double speed_min, size_t slots);

// Runs the federation until every worker has made its rounds; writes metrics JSON lines. Throws
// std::runtime_error (naming the file, expert or node) when it cannot be set up.
RealSimResult run_real_sim(const RealSimConfig& config, std::ostream& metrics);

}  // namespace fedmoe::runtime
