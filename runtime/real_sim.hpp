// The real-time simulation of a federation (`fedmoe-node --role sim --clock real`): a coordinator,
// shards, workers and a router as actors in this one process, talking through the same transport as
// separate nodes do, with real LoRA training on a real (small) base. What is simulated is only the
// fleet: each worker gets a disjoint part of its expert's data, a speed factor spread evenly over
// [speed_min, speed_max] (the fastest runs at this machine's speed, a worker with factor F waits so
// that its rounds take F / speed_min as long; each expert gets fast and slow ones), and a message
// latency with jitter.
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
  // eval_examples examples. One "event": "eval" line per (time, expert).
  double eval_every_s = 0;               // 0: only the start and the end
  std::vector<std::string> validation_data;
  size_t eval_examples = 64;
  std::string out_dir;                   // when set: OUT/<expert>/ the final version as a PEFT adapter, and
                                         //   OUT/router.safetensors the learned router
  std::vector<std::string> prompts;      // asked of the router after the held-out ones ("event": "ask")
  uint32_t max_experts = 2;              // experts per prompt for `prompts` (held-out ones get 1)
};

struct RealSimResult {
  uint64_t updates = 0, accepted = 0;
  uint64_t routed_right = 0, asked = 0;  // held-out prompts the router sent to their own expert
  double wall_seconds = 0;
};

// Runs the federation until every worker has made its rounds; writes metrics JSON lines. Throws
// std::runtime_error (naming the file, expert or node) when it cannot be set up.
RealSimResult run_real_sim(const RealSimConfig& config, std::ostream& metrics);

}  // namespace fedmoe::runtime
