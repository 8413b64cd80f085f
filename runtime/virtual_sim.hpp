// The virtual-time simulation of a federation (`fedmoe-node --role sim` with clock = "virtual"):
// thousands of workers as discrete events, no threads, no network, no base model. What is real is
// the aggregation: every update goes through the same model::AggregationPolicy a shard runs, with its
// staleness, weights and rejections. What is modelled:
//   - each expert is a parameter vector x (dimension `dim`); each worker's private data is a target
//     c_w near its expert's optimum (spread `data_spread`), its local loss ||x - c_w||^2 / 2;
//   - a round: the worker takes the expert version current when its pull arrives, runs K gradient
//     steps (lr) on its own loss, and pushes the delta;
//   - costs: a round takes compute_seconds * speed_factor (speed factors uniform in
//     [speed_min, speed_max]), every message latency_ms +- jitter_ms, the shard serve_ms per update.
// Output: metrics JSON lines (per expert: loss over all its workers' data against virtual time;
// at the end: staleness histogram, accepted/rejected counts by reason, wall time).
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>

#include "model/aggregation.hpp"

namespace fedmoe::runtime {

struct VirtualSimConfig {
  uint64_t workers = 100;
  uint64_t experts = 3;
  uint64_t updates_per_worker = 20;
  int64_t dim = 16;
  int64_t local_steps = 5;
  double lr = 0.1;
  double data_spread = 1.0;
  double compute_seconds = 1.0;
  double speed_min = 0.5, speed_max = 2.0;
  double latency_ms = 20, jitter_ms = 5;
  double serve_ms = 1;
  double metrics_every_s = 10;  // virtual seconds between loss lines
  uint64_t seed = 1;
  uint64_t history_versions = 8;  // versions an expert keeps for FedAsync's base weights (as a shard)
  model::PolicyConfig policy;
};

struct VirtualSimResult {
  double virtual_seconds = 0;
  double wall_seconds = 0;
  uint64_t updates = 0, accepted = 0, rejected = 0;
  std::vector<double> initial_loss, final_loss;  // per expert
};

// Runs the whole simulation, writing metrics JSON lines to `metrics`.
VirtualSimResult run_virtual_sim(const VirtualSimConfig& config, std::ostream& metrics);

}  // namespace fedmoe::runtime
