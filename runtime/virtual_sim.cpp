#include "runtime/virtual_sim.hpp"

#include <chrono>
#include <cmath>
#include <deque>
#include <map>
#include <queue>
#include <random>
#include <stdexcept>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

namespace fedmoe::runtime {

namespace {

struct Event {
  double t;
  uint64_t seq;  // ties broken by creation order: the run is deterministic for a seed
  enum class Kind : uint8_t { pull_served, train_done, push_arrives, ack_arrives } kind;
  uint32_t worker;
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};

struct SimExpert {
  model::ExpertWeights weights;  // {"x": [dim]}
  std::unique_ptr<model::AggregationPolicy> policy;
  std::deque<std::pair<uint64_t, model::TensorMap>> history;  // recent versions, for FedAsync's base
  torch::Tensor optimum_mean;  // mean of its workers' targets [dim]
  double spread_term = 0;      // mean ||c_w - optimum_mean||^2 / 2
  double busy_until = 0;       // the shard serves one update at a time
};

struct SimWorker {
  uint32_t expert;
  torch::Tensor target;  // c_w [dim]
  double speed;          // round time multiplier
  uint64_t done = 0;
  uint64_t base_version = 0;
  torch::Tensor start;   // the version it trains from
  torch::Tensor delta;
};

double expert_loss(const SimExpert& e) {
  return 0.5 * (e.weights.weights.at("x") - e.optimum_mean).pow(2).sum().item<double>() + e.spread_term;
}

}  // namespace

VirtualSimResult run_virtual_sim(const VirtualSimConfig& c, std::ostream& metrics) {
  if (c.workers == 0 || c.experts == 0 || c.dim <= 0) throw std::invalid_argument("sim: workers, experts and dim must be positive");
  if (!(c.speed_min > 0 && c.speed_max >= c.speed_min)) throw std::invalid_argument("sim: need 0 < speed_min <= speed_max");
  const auto wall0 = std::chrono::steady_clock::now();
  torch::manual_seed(c.seed);
  std::mt19937_64 rng(c.seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  auto latency = [&] { return std::max(0.0, (c.latency_ms + c.jitter_ms * (2 * unit(rng) - 1)) / 1000.0); };

  std::vector<SimExpert> experts(c.experts);
  std::vector<torch::Tensor> optimum(c.experts);
  for (uint64_t e = 0; e < c.experts; ++e) {
    optimum[e] = 3.0 * torch::randn({c.dim});  // [dim]
    experts[e].weights.weights["x"] = torch::zeros({c.dim});  // [dim], every expert starts at 0
    experts[e].policy = model::make_policy(c.policy);
    experts[e].history.emplace_back(0, experts[e].weights.weights);
  }
  std::vector<SimWorker> workers(c.workers);
  std::vector<std::vector<torch::Tensor>> targets_of(c.experts);
  for (uint64_t w = 0; w < c.workers; ++w) {
    auto& s = workers[w];
    s.expert = static_cast<uint32_t>(w % c.experts);
    s.target = optimum[s.expert] + c.data_spread * torch::randn({c.dim});  // [dim]: its private data
    s.speed = c.speed_min + (c.speed_max - c.speed_min) * unit(rng);
    targets_of[s.expert].push_back(s.target);
  }
  for (uint64_t e = 0; e < c.experts; ++e) {
    auto all = torch::stack(targets_of[e]);  // [workers of e, dim]
    experts[e].optimum_mean = all.mean(0);
    experts[e].spread_term = 0.5 * (all - experts[e].optimum_mean).pow(2).sum(1).mean().item<double>();
  }

  VirtualSimResult result;
  for (const auto& e : experts) result.initial_loss.push_back(expert_loss(e));
  std::priority_queue<Event, std::vector<Event>, std::greater<>> queue;
  uint64_t seq = 0;
  auto schedule = [&](double t, Event::Kind k, uint32_t w) { queue.push({t, seq++, k, w}); };
  for (uint32_t w = 0; w < c.workers; ++w) schedule(unit(rng) * c.compute_seconds + latency(), Event::Kind::pull_served, w);

  std::map<uint64_t, uint64_t> staleness_histogram;
  std::map<std::string, uint64_t> rejected;
  const double shrink = 1.0 - std::pow(1.0 - c.lr, double(c.local_steps));  // K gradient steps, closed form
  double next_metrics = 0;
  double now = 0;
  auto emit_losses = [&](double t) {
    for (uint64_t e = 0; e < c.experts; ++e)
      metrics << nlohmann::json{{"t", t}, {"expert", e}, {"version", experts[e].weights.version},
                                {"loss", expert_loss(experts[e])}}.dump()
              << "\n";
  };
  while (!queue.empty()) {
    const Event ev = queue.top();
    queue.pop();
    now = ev.t;
    while (now >= next_metrics) {
      emit_losses(next_metrics);
      next_metrics += c.metrics_every_s;
    }
    auto& w = workers[ev.worker];
    auto& ex = experts[w.expert];
    switch (ev.kind) {
      case Event::Kind::pull_served:  // the shard hands out its current version
        w.base_version = ex.weights.version;
        w.start = ex.weights.weights.at("x");
        schedule(now + latency() + c.compute_seconds * w.speed, Event::Kind::train_done, ev.worker);
        break;
      case Event::Kind::train_done:  // K local steps on ||x - c_w||^2 / 2
        w.delta = shrink * (w.target - w.start);  // [dim]
        schedule(now + latency(), Event::Kind::push_arrives, ev.worker);
        break;
      case Event::Kind::push_arrives: {
        const double served = std::max(now, ex.busy_until) + c.serve_ms / 1000.0;
        ex.busy_until = served;
        model::ClientUpdate u;
        u.update_id = std::to_string(ev.worker) + "/" + std::to_string(w.done);
        u.worker_id = std::to_string(ev.worker);
        u.base_version = w.base_version;
        u.sample_count = 1;
        u.delta["x"] = w.delta;
        const model::TensorMap* base = nullptr;
        for (const auto& [v, weights] : ex.history)
          if (v == w.base_version) base = &weights;
        auto out = ex.policy->submit(ex.weights, u, base);
        ++result.updates;
        if (out.accepted()) {
          ++result.accepted;
          ++staleness_histogram[out.staleness];
        } else {
          ++result.rejected;
          ++rejected[model::to_string(out.reason)];
        }
        if (out.verdict == model::Outcome::Verdict::applied) {
          ex.history.emplace_back(ex.weights.version, ex.weights.weights);
          // As a shard: a few recent versions (FedAsync mixes with x_base when it still has it).
          while (ex.history.size() > std::min<uint64_t>(c.policy.max_staleness + 1, c.history_versions))
            ex.history.pop_front();
        }
        schedule(served + latency(), Event::Kind::ack_arrives, ev.worker);
        break;
      }
      case Event::Kind::ack_arrives:
        if (++w.done < c.updates_per_worker) schedule(now + 2 * latency(), Event::Kind::pull_served, ev.worker);
        break;
    }
  }
  emit_losses(now);
  result.virtual_seconds = now;
  result.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  for (const auto& e : experts) result.final_loss.push_back(expert_loss(e));
  // Exact below 16, then power-of-two buckets ("16-31", "32-63", ...): a 10,000-worker fleet has
  // thousands of distinct staleness values.
  std::map<uint64_t, std::pair<std::string, uint64_t>> buckets;  // lower bound -> (label, count)
  for (const auto& [s, n] : staleness_histogram) {
    uint64_t lo = s, hi = s;
    if (s >= 16) {
      lo = uint64_t{1} << (63 - __builtin_clzll(s));
      hi = 2 * lo - 1;
    }
    auto& b = buckets[lo];
    b.first = lo == hi ? std::to_string(lo) : std::to_string(lo) + "-" + std::to_string(hi);
    b.second += n;
  }
  nlohmann::json hist = nlohmann::json::array();
  uint64_t staleness_sum = 0, count = 0;
  for (const auto& [s, n] : staleness_histogram) staleness_sum += s * n, count += n;
  for (const auto& [lo, b] : buckets) hist.push_back({{"staleness", b.first}, {"updates", b.second}});
  metrics << nlohmann::json{{"summary", true},
                            {"clock", "virtual"},
                            {"policy", c.policy.name},
                            {"workers", c.workers},
                            {"experts", c.experts},
                            {"updates", result.updates},
                            {"accepted", result.accepted},
                            {"rejected", rejected},
                            {"staleness_histogram", hist},
                            {"mean_staleness", count ? double(staleness_sum) / double(count) : 0.0},
                            {"virtual_seconds", result.virtual_seconds},
                            {"wall_seconds", result.wall_seconds},
                            {"initial_loss", result.initial_loss},
                            {"final_loss", result.final_loss}}.dump()
          << "\n";
  return result;
}

}  // namespace fedmoe::runtime
