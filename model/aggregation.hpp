// Aggregation policies: how an expert shard folds workers' LoRA updates into the expert's weights.
// Small pure classes in the manner of Flower's Strategy: no actors, no network, no clock; the shard
// (actors/expert_shard) calls them, tests call them with hand-computed numbers.
//
// A worker trains from version b of an expert and sends delta = (its weights - the weights of
// version b), with its sample count. When the update arrives the expert is at version v; its
// staleness is tau = v - b. Every policy
//   - rejects updates staler than max_staleness, with non-finite values, with tensor names or shapes
//     that do not match the expert, or from a version the expert has not reached (reason + detail);
//   - optionally clips the delta's global L2 norm to clip_norm;
//   - scales what it applies by server_lr (1.0 = the plain algorithm);
//   - bumps the version by one each time it changes the weights.
//
//   FedAvg   synchronous rounds: collects updates trained from the current version (tau = 0) until
//            clients_per_round arrived, or until the caller's round deadline passes with at least
//            min_updates (on_deadline); applies x += server_lr * sum(n_i d_i) / sum(n_i).
//            Updates from an earlier round (tau > 0: stragglers after the deadline) are too stale.
//   FedAsync applies each update at once: x <- (1 - a_t) x + a_t x_new, x_new = x_b + d (the
//            worker's model, from the base version's weights when the caller still has them, else
//            x + d), a_t = alpha * s(tau); s is constant, polynomial, hinge or exponential.
//   FedBuff  buffers K deltas, each weighted by 1 / sqrt(1 + tau) at arrival, and applies their mean:
//            x += server_lr * sum(w_i d_i) / K.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

namespace fedmoe::model {

using TensorMap = std::map<std::string, torch::Tensor>;

// s(tau), the weight of an update of staleness tau in FedAsync.
struct StalenessFunction {
  enum class Kind { constant, polynomial, hinge, exponential };
  Kind kind = Kind::exponential;
  double decay = 0.1;        // exponential: exp(-decay * tau); hinge: slope after the knee
  double exponent = 0.5;     // polynomial: (1 + tau)^-exponent
  uint64_t hinge_start = 4;  // hinge: 1 up to this staleness, then 1 / (decay * (tau - start) + 1)

  double operator()(uint64_t staleness) const;
  static Kind parse(const std::string& name);  // "constant", "polynomial", "hinge", "exponential"
};
const char* to_string(StalenessFunction::Kind k);

struct PolicyConfig {
  std::string name = "fedasync";  // "fedavg", "fedasync", "fedbuff"
  double server_lr = 1.0;
  double staleness_decay = 0.1;   // the staleness function's decay (original FedMoE configuration)
  uint64_t max_staleness = 16;    // staler updates are rejected
  double clip_norm = 0;           // > 0: a delta whose global L2 norm exceeds it is scaled down to it
  // FedAsync
  double alpha = 0.6;
  StalenessFunction::Kind staleness_function = StalenessFunction::Kind::exponential;
  double staleness_exponent = 0.5;
  uint64_t hinge_start = 4;
  // FedAvg
  uint64_t clients_per_round = 3;
  uint64_t min_updates = 1;  // a round that reaches its deadline aggregates if it has at least this many
  uint64_t round_deadline_ms = 0;  // the caller's clock: close a round this long after its first update (0: never)
  // FedBuff
  uint64_t buffer_size = 4;

  StalenessFunction staleness() const;
};

struct ClientUpdate {
  std::string update_id;
  std::string worker_id;
  uint64_t base_version = 0;
  uint64_t sample_count = 0;
  double train_loss = 0;
  TensorMap delta;  // worker weights - weights of base_version, by tensor name
};

// The weights and version of one expert on the server side; policies change them when they apply.
struct ExpertWeights {
  uint64_t version = 0;
  TensorMap weights;
};

enum class UpdateRejection { none, too_stale, non_finite, shape_mismatch, bad_version, empty };
const char* to_string(UpdateRejection r);

struct Outcome {
  enum class Verdict { rejected, buffered, applied } verdict = Verdict::rejected;
  UpdateRejection reason = UpdateRejection::none;
  std::string detail;       // why it was rejected, in words naming the tensor / versions
  uint64_t staleness = 0;
  double weight = 0;        // this update's weight: FedAvg n_i / sum(n), FedAsync a_t, FedBuff 1/sqrt(1+tau)
  bool clipped = false;
  uint64_t version = 0;     // the expert's version after this call
  std::vector<std::string> folded;  // when applied: ids of the updates in the new version, in order

  bool accepted() const { return verdict != Verdict::rejected; }
};
const char* to_string(Outcome::Verdict v);

class AggregationPolicy {
 public:
  explicit AggregationPolicy(PolicyConfig config) : config_(std::move(config)) {}
  virtual ~AggregationPolicy() = default;

  const PolicyConfig& config() const { return config_; }
  virtual const char* name() const = 0;

  // Checks `update` against `expert`, clips it, and folds it in (or buffers it). `base` is the
  // expert's weights at update.base_version if the caller kept them (FedAsync mixes with them).
  // Never throws on bad updates: they come back rejected with a reason.
  Outcome submit(ExpertWeights& expert, const ClientUpdate& update, const TensorMap* base = nullptr);

  // Time-driven closing (FedAvg's round deadline); other policies change nothing.
  virtual Outcome on_deadline(ExpertWeights& expert);

  // Updates accepted but not yet in the weights (FedAvg's round, FedBuff's buffer).
  virtual std::vector<std::string> pending() const { return {}; }

 protected:
  // `delta` is validated and clipped. Fills verdict, weight, folded; submit() fills the rest.
  virtual void fold(ExpertWeights& expert, const ClientUpdate& update, TensorMap delta, uint64_t staleness,
                    const TensorMap* base, Outcome& out) = 0;
  // x += scale * step for every tensor; version + 1.
  static void apply_step(ExpertWeights& expert, const TensorMap& step, double scale);

  PolicyConfig config_;
};

// "fedavg", "fedasync" or "fedbuff"; std::invalid_argument naming the field for anything else.
std::unique_ptr<AggregationPolicy> make_policy(const PolicyConfig& config);

}  // namespace fedmoe::model
