#include "model/aggregation.hpp"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include <torch/torch.h>

namespace fedmoe::model {

// --- staleness --------------------------------------------------------------------------------------

double StalenessFunction::operator()(uint64_t staleness) const {
  const double tau = static_cast<double>(staleness);
  switch (kind) {
    case Kind::constant: return 1.0;
    case Kind::polynomial: return std::pow(1.0 + tau, -exponent);
    case Kind::hinge:
      return staleness <= hinge_start ? 1.0 : 1.0 / (decay * (tau - static_cast<double>(hinge_start)) + 1.0);
    case Kind::exponential: return std::exp(-decay * tau);
  }
  return 1.0;
}

StalenessFunction::Kind StalenessFunction::parse(const std::string& name) {
  if (name == "constant") return Kind::constant;
  if (name == "polynomial") return Kind::polynomial;
  if (name == "hinge") return Kind::hinge;
  if (name == "exponential") return Kind::exponential;
  throw std::invalid_argument("staleness_function '" + name + "': expected constant, polynomial, hinge or exponential");
}

const char* to_string(StalenessFunction::Kind k) {
  switch (k) {
    case StalenessFunction::Kind::constant: return "constant";
    case StalenessFunction::Kind::polynomial: return "polynomial";
    case StalenessFunction::Kind::hinge: return "hinge";
    case StalenessFunction::Kind::exponential: return "exponential";
  }
  return "?";
}

StalenessFunction PolicyConfig::staleness() const {
  StalenessFunction s;
  s.kind = staleness_function;
  s.decay = staleness_decay;
  s.exponent = staleness_exponent;
  s.hinge_start = hinge_start;
  return s;
}

const char* to_string(UpdateRejection r) {
  switch (r) {
    case UpdateRejection::none: return "none";
    case UpdateRejection::too_stale: return "too_stale";
    case UpdateRejection::non_finite: return "non_finite";
    case UpdateRejection::shape_mismatch: return "shape_mismatch";
    case UpdateRejection::bad_version: return "bad_version";
    case UpdateRejection::empty: return "empty";
  }
  return "?";
}

const char* to_string(Outcome::Verdict v) {
  switch (v) {
    case Outcome::Verdict::rejected: return "rejected";
    case Outcome::Verdict::buffered: return "buffered";
    case Outcome::Verdict::applied: return "applied";
  }
  return "?";
}

// --- common checks ----------------------------------------------------------------------------------

namespace {

std::string shape_str(torch::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

Outcome reject(UpdateRejection reason, std::string detail, uint64_t staleness, uint64_t version) {
  Outcome o;
  o.verdict = Outcome::Verdict::rejected;
  o.reason = reason;
  o.detail = std::move(detail);
  o.staleness = staleness;
  o.version = version;
  return o;
}

// Names and shapes must be exactly the expert's; values finite. Empty string = fine.
std::pair<UpdateRejection, std::string> check_delta(const TensorMap& weights, const TensorMap& delta) {
  if (delta.empty()) return {UpdateRejection::empty, "the update has no tensors"};
  for (const auto& [name, w] : weights)
    if (!delta.count(name)) return {UpdateRejection::shape_mismatch, "tensor '" + name + "' is missing from the update"};
  std::vector<torch::Tensor> sums;
  for (const auto& [name, d] : delta) {
    auto it = weights.find(name);
    if (it == weights.end()) return {UpdateRejection::shape_mismatch, "tensor '" + name + "' is not part of this expert"};
    if (!d.defined() || !d.is_floating_point())
      return {UpdateRejection::shape_mismatch, "tensor '" + name + "' is not a floating-point tensor"};
    if (d.sizes() != it->second.sizes())
      return {UpdateRejection::shape_mismatch, "tensor '" + name + "' has shape " + shape_str(d.sizes()) +
                                                   ", the expert's is " + shape_str(it->second.sizes())};
    sums.push_back(d.sum(torch::kFloat64).reshape({1}));
  }
  // NaN and Inf make a sum non-finite, so one reduction per tensor and one host sync clear the
  // common case; only then is the offending tensor looked for.
  if (torch::isfinite(torch::cat(sums)).all().item<bool>()) return {UpdateRejection::none, ""};
  for (const auto& [name, d] : delta)
    if (!torch::isfinite(d).all().item<bool>()) return {UpdateRejection::non_finite, "tensor '" + name + "' contains NaN or Inf"};
  return {UpdateRejection::none, ""};  // only the fp64 sum overflowed: the values are finite
}

double global_norm(const TensorMap& delta) {
  double sq = 0;
  for (const auto& [name, d] : delta) sq += d.to(torch::kFloat64).pow(2).sum().item<double>();
  return std::sqrt(sq);
}

}  // namespace

Outcome AggregationPolicy::submit(ExpertWeights& expert, const ClientUpdate& u, const TensorMap* base) {
  if (u.base_version > expert.version)
    return reject(UpdateRejection::bad_version,
                  "trained from version " + std::to_string(u.base_version) + ", but the expert is at version " +
                      std::to_string(expert.version),
                  0, expert.version);
  const uint64_t staleness = expert.version - u.base_version;
  if (staleness > config_.max_staleness)
    return reject(UpdateRejection::too_stale,
                  "staleness " + std::to_string(staleness) + " (trained from version " + std::to_string(u.base_version) +
                      ", expert at " + std::to_string(expert.version) + ") exceeds max_staleness " +
                      std::to_string(config_.max_staleness),
                  staleness, expert.version);
  if (auto [reason, detail] = check_delta(expert.weights, u.delta); reason != UpdateRejection::none)
    return reject(reason, detail, staleness, expert.version);

  // Work in fp32 on the expert's device, whatever the worker sent.
  TensorMap delta;
  // No copy when the update is already fp32 on the right device: policies never modify a delta in
  // place (it may point into a received message buffer).
  for (const auto& [name, d] : u.delta) delta[name] = d.to(expert.weights.at(name).device(), torch::kFloat32);
  Outcome out;
  out.staleness = staleness;
  if (config_.clip_norm > 0) {
    const double norm = global_norm(delta);
    if (norm > config_.clip_norm) {
      for (auto& [name, d] : delta) d = d * (config_.clip_norm / norm);
      out.clipped = true;
    }
  }
  fold(expert, u, std::move(delta), staleness, base, out);
  out.version = expert.version;
  return out;
}

Outcome AggregationPolicy::on_deadline(ExpertWeights& expert) {
  Outcome o;
  o.verdict = Outcome::Verdict::buffered;
  o.version = expert.version;
  return o;
}

void AggregationPolicy::apply_step(ExpertWeights& expert, const TensorMap& step, double scale) {
  torch::NoGradGuard no_grad;
  // Out of place: each version's tensors stay immutable, so a caller may keep and serve them (a
  // shard's published snapshot, FedAsync's history) without copying.
  for (auto& [name, w] : expert.weights) w = w.add(step.at(name).to(w.scalar_type()), scale);
  expert.version += 1;
}

// --- FedAvg -----------------------------------------------------------------------------------------

namespace {

class FedAvg final : public AggregationPolicy {
 public:
  using AggregationPolicy::AggregationPolicy;
  const char* name() const override { return "fedavg"; }

  std::vector<std::string> pending() const override { return ids_; }

  Outcome on_deadline(ExpertWeights& expert) override {
    Outcome o;
    o.version = expert.version;
    o.verdict = Outcome::Verdict::buffered;
    if (!ids_.empty() && ids_.size() >= config_.min_updates) close_round(expert, o);
    return o;
  }

 protected:
  void fold(ExpertWeights& expert, const ClientUpdate& u, TensorMap delta, uint64_t staleness, const TensorMap*,
            Outcome& out) override {
    if (staleness > 0) {
      out.verdict = Outcome::Verdict::rejected;
      out.reason = UpdateRejection::too_stale;
      out.detail = "synchronous FedAvg: trained from version " + std::to_string(u.base_version) +
                   ", whose round has closed (the round is at version " + std::to_string(expert.version) + ")";
      return;
    }
    if (u.sample_count == 0) {
      out.verdict = Outcome::Verdict::rejected;
      out.reason = UpdateRejection::empty;
      out.detail = "FedAvg weighs updates by sample count, and this one has 0 samples";
      return;
    }
    const double n = static_cast<double>(u.sample_count);
    for (auto& [name, d] : delta) {
      auto& acc = sum_[name];
      acc = acc.defined() ? acc.add_(d, n) : d * n;
    }
    samples_ += n;
    ids_.push_back(u.update_id);
    out.verdict = Outcome::Verdict::buffered;
    out.weight = n;
    if (ids_.size() >= config_.clients_per_round) {
      out.weight = n / samples_;  // this update's share of the round it closes
      close_round(expert, out);
    }
  }

 private:
  void close_round(ExpertWeights& expert, Outcome& out) {
    for (auto& [name, acc] : sum_) acc.div_(samples_);  // sum(n_i d_i) / sum(n_i)
    apply_step(expert, sum_, config_.server_lr);
    out.verdict = Outcome::Verdict::applied;
    out.folded = std::move(ids_);
    out.version = expert.version;
    sum_.clear();
    ids_.clear();
    samples_ = 0;
  }

  TensorMap sum_;  // sum of n_i * d_i over this round's updates
  double samples_ = 0;
  std::vector<std::string> ids_;
};

// --- FedAsync ---------------------------------------------------------------------------------------

class FedAsync final : public AggregationPolicy {
 public:
  using AggregationPolicy::AggregationPolicy;
  const char* name() const override { return "fedasync"; }

 protected:
  void fold(ExpertWeights& expert, const ClientUpdate& u, TensorMap delta, uint64_t staleness, const TensorMap* base,
            Outcome& out) override {
    const double a = config_.alpha * config_.staleness()(staleness);
    // x_new - x = (x_base + d) - x; without the base's weights, x_base = x.
    if (base != nullptr && staleness > 0) {
      torch::NoGradGuard no_grad;
      for (auto& [name, d] : delta) {
        auto b = base->find(name);
        if (b == base->end()) continue;  // the caller's history lacks it: treat as x_base = x
        d = d + b->second.to(d.device(), torch::kFloat32) - expert.weights.at(name).to(torch::kFloat32);
      }
    }
    apply_step(expert, delta, config_.server_lr * a);
    out.verdict = Outcome::Verdict::applied;
    out.weight = a;
    out.folded = {u.update_id};
  }
};

// --- FedBuff ----------------------------------------------------------------------------------------

class FedBuff final : public AggregationPolicy {
 public:
  using AggregationPolicy::AggregationPolicy;
  const char* name() const override { return "fedbuff"; }
  std::vector<std::string> pending() const override { return ids_; }

 protected:
  void fold(ExpertWeights& expert, const ClientUpdate& u, TensorMap delta, uint64_t staleness, const TensorMap*,
            Outcome& out) override {
    const double w = 1.0 / std::sqrt(1.0 + static_cast<double>(staleness));
    for (auto& [name, d] : delta) {
      auto& acc = sum_[name];
      acc = acc.defined() ? acc.add_(d, w) : d * w;
    }
    ids_.push_back(u.update_id);
    out.weight = w;
    out.verdict = Outcome::Verdict::buffered;
    if (ids_.size() >= std::max<uint64_t>(config_.buffer_size, 1)) {
      const double k = static_cast<double>(ids_.size());
      apply_step(expert, sum_, config_.server_lr / k);  // the mean of the K weighted deltas
      out.verdict = Outcome::Verdict::applied;
      out.folded = std::move(ids_);
      ids_.clear();
      sum_.clear();
    }
  }

 private:
  TensorMap sum_;  // sum of w_i * d_i
  std::vector<std::string> ids_;
};

}  // namespace

std::unique_ptr<AggregationPolicy> make_policy(const PolicyConfig& c) {
  if (!(c.server_lr > 0) || !std::isfinite(c.server_lr))
    throw std::invalid_argument("server_lr must be a positive number, got " + std::to_string(c.server_lr));
  if (!(c.staleness_decay >= 0)) throw std::invalid_argument("staleness_decay must be >= 0");
  if (!(c.clip_norm >= 0)) throw std::invalid_argument("clip_norm must be >= 0 (0 = off)");
  if (c.name == "fedavg") {
    if (c.clients_per_round == 0) throw std::invalid_argument("fedavg: clients_per_round must be at least 1");
    return std::make_unique<FedAvg>(c);
  }
  if (c.name == "fedasync") {
    if (!(c.alpha > 0 && c.alpha <= 1)) throw std::invalid_argument("fedasync: alpha must be in (0, 1]");
    return std::make_unique<FedAsync>(c);
  }
  if (c.name == "fedbuff") {
    if (c.buffer_size == 0) throw std::invalid_argument("fedbuff: buffer_size must be at least 1");
    return std::make_unique<FedBuff>(c);
  }
  throw std::invalid_argument("policy '" + c.name + "': expected fedavg, fedasync or fedbuff");
}

}  // namespace fedmoe::model
