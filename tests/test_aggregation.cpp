// Tests of model/aggregation: FedAvg, FedAsync and FedBuff against hand-computed values, the
// staleness functions, server_lr, clipping, and every rejection reason. No actors, no network.
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <cmath>

#include "model/aggregation.hpp"

using namespace fedmoe::model;
using Catch::Matchers::Contains;

namespace {

ExpertWeights expert(std::vector<float> w, uint64_t version = 0) {
  ExpertWeights e;
  e.version = version;
  e.weights["w"] = torch::tensor(w);
  return e;
}

ClientUpdate update(const std::string& id, uint64_t base, std::vector<float> d, uint64_t samples = 1) {
  ClientUpdate u;
  u.update_id = id;
  u.worker_id = "worker-" + id;
  u.base_version = base;
  u.sample_count = samples;
  u.delta["w"] = torch::tensor(d);
  return u;
}

std::vector<float> values(const ExpertWeights& e) {
  auto t = e.weights.at("w").contiguous();
  return {t.data_ptr<float>(), t.data_ptr<float>() + t.numel()};
}

PolicyConfig config(const std::string& name) {
  PolicyConfig c;
  c.name = name;
  return c;
}

}  // namespace

TEST_CASE("staleness functions: constant, polynomial, hinge, exponential", "[aggregation]") {
  StalenessFunction s;
  s.kind = StalenessFunction::Kind::constant;
  CHECK(s(0) == 1.0);
  CHECK(s(100) == 1.0);
  s.kind = StalenessFunction::Kind::polynomial, s.exponent = 0.5;
  CHECK(s(0) == Approx(1.0));
  CHECK(s(3) == Approx(0.5));  // (1 + 3)^-0.5
  s.kind = StalenessFunction::Kind::hinge, s.decay = 0.1, s.hinge_start = 4;
  CHECK(s(4) == 1.0);
  CHECK(s(14) == Approx(0.5));  // 1 / (0.1 * (14 - 4) + 1)
  s.kind = StalenessFunction::Kind::exponential, s.decay = 0.1;
  CHECK(s(10) == Approx(std::exp(-1.0)));
  CHECK(StalenessFunction::parse("hinge") == StalenessFunction::Kind::hinge);
  CHECK_THROWS_WITH(StalenessFunction::parse("linear"), Contains("staleness_function 'linear'"));
}

TEST_CASE("FedAvg: rounds weighted by sample count, server_lr, deadline, stragglers", "[aggregation]") {
  auto c = config("fedavg");
  c.clients_per_round = 2;
  auto policy = make_policy(c);
  auto e = expert({1, 2});
  auto first = policy->submit(e, update("a", 0, {1, 0}, 1));
  CHECK(first.verdict == Outcome::Verdict::buffered);
  CHECK(e.version == 0);
  CHECK(policy->pending() == std::vector<std::string>{"a"});
  auto second = policy->submit(e, update("b", 0, {0, 4}, 3));
  REQUIRE(second.verdict == Outcome::Verdict::applied);
  // (1 * [1, 0] + 3 * [0, 4]) / 4 = [0.25, 3]
  CHECK(values(e) == std::vector<float>{1.25f, 5.0f});
  CHECK(e.version == 1);
  CHECK(second.version == 1);
  CHECK(second.weight == Approx(0.75));
  CHECK(second.folded == std::vector<std::string>{"a", "b"});
  CHECK(policy->pending().empty());

  SECTION("a straggler from the closed round is too stale") {
    auto late = policy->submit(e, update("c", 0, {1, 1}, 5));
    CHECK(late.verdict == Outcome::Verdict::rejected);
    CHECK(late.reason == UpdateRejection::too_stale);
    CHECK_THAT(late.detail, Contains("round has closed"));
    CHECK(values(e) == std::vector<float>{1.25f, 5.0f});
  }
  SECTION("server_lr scales the averaged step") {
    c.server_lr = 0.5;
    auto p = make_policy(c);
    auto e2 = expert({1, 2});
    p->submit(e2, update("a", 0, {1, 0}, 1));
    p->submit(e2, update("b", 0, {0, 4}, 3));
    CHECK(values(e2) == std::vector<float>{1.125f, 3.5f});
  }
  SECTION("the round deadline aggregates what arrived, if at least min_updates") {
    c.clients_per_round = 3;
    c.min_updates = 2;
    auto p = make_policy(c);
    auto e2 = expert({0, 0});
    p->submit(e2, update("a", 0, {2, 2}, 2));
    CHECK(p->on_deadline(e2).verdict == Outcome::Verdict::buffered);  // 1 < min_updates: keep waiting
    CHECK(e2.version == 0);
    p->submit(e2, update("b", 0, {4, 0}, 2));
    auto closed = p->on_deadline(e2);
    CHECK(closed.verdict == Outcome::Verdict::applied);
    CHECK(values(e2) == std::vector<float>{3.0f, 1.0f});
    CHECK(closed.folded.size() == 2);
  }
  SECTION("no samples, no weight") {
    auto none = policy->submit(e, update("z", 1, {1, 1}, 0));
    CHECK(none.reason == UpdateRejection::empty);
  }
}

TEST_CASE("FedAsync: x <- (1 - a_t) x + a_t x_new with a_t = alpha * s(staleness)", "[aggregation]") {
  auto c = config("fedasync");
  c.alpha = 0.5;
  c.staleness_function = StalenessFunction::Kind::exponential;
  c.staleness_decay = 0.1;
  auto policy = make_policy(c);
  auto e = expert({1, 2});
  const TensorMap v0 = {{"w", torch::tensor({1.0f, 2.0f})}};
  auto fresh = policy->submit(e, update("a", 0, {2, 2}));
  REQUIRE(fresh.verdict == Outcome::Verdict::applied);
  CHECK(fresh.weight == Approx(0.5));
  CHECK(values(e) == std::vector<float>{2.0f, 3.0f});  // 0.5 * [1, 2] + 0.5 * [3, 4]
  CHECK(e.version == 1);

  const double a = 0.5 * std::exp(-0.1);  // staleness 1
  SECTION("a stale update mixes the worker's model x_base + d") {
    auto stale = policy->submit(e, update("b", 0, {4, 0}), &v0);  // x_new = [5, 2]
    CHECK(stale.staleness == 1);
    CHECK(stale.weight == Approx(a));
    auto v = values(e);
    CHECK(v[0] == Approx((1 - a) * 2 + a * 5));
    CHECK(v[1] == Approx((1 - a) * 3 + a * 2));
    CHECK(e.version == 2);
  }
  SECTION("without the base version's weights, x_new = x + d") {
    policy->submit(e, update("b", 0, {4, 0}));
    auto v = values(e);
    CHECK(v[0] == Approx(2 + 4 * a));
    CHECK(v[1] == Approx(3.0));
  }
  SECTION("server_lr scales the mixing step") {
    c.server_lr = 0.5;
    auto p = make_policy(c);
    auto e2 = expert({1, 2});
    p->submit(e2, update("a", 0, {2, 2}));
    CHECK(values(e2) == std::vector<float>{1.5f, 2.5f});
  }
}

TEST_CASE("FedBuff: K deltas weighted by 1/sqrt(1 + staleness), their mean applied", "[aggregation]") {
  auto c = config("fedbuff");
  c.buffer_size = 2;
  auto policy = make_policy(c);
  auto e = expert({0, 0}, 3);
  auto first = policy->submit(e, update("a", 3, {2, 0}));
  CHECK(first.verdict == Outcome::Verdict::buffered);
  CHECK(first.weight == Approx(1.0));
  auto second = policy->submit(e, update("b", 0, {0, 4}));  // staleness 3: weight 0.5
  REQUIRE(second.verdict == Outcome::Verdict::applied);
  CHECK(second.weight == Approx(0.5));
  CHECK(values(e) == std::vector<float>{1.0f, 1.0f});  // (1 * [2, 0] + 0.5 * [0, 4]) / 2
  CHECK(e.version == 4);
  CHECK(second.folded == std::vector<std::string>{"a", "b"});
}

TEST_CASE("every policy rejects bad updates with a reason and leaves the weights alone", "[aggregation]") {
  for (const char* name : {"fedavg", "fedasync", "fedbuff"}) {
    INFO(name);
    auto c = config(name);
    c.max_staleness = 2;
    c.clients_per_round = 1;
    c.buffer_size = 1;
    auto policy = make_policy(c);
    auto e = expert({1, 2}, 5);
    auto rejected = [&](ClientUpdate u, UpdateRejection reason, const std::string& words) {
      auto o = policy->submit(e, u);
      CHECK(o.verdict == Outcome::Verdict::rejected);
      CHECK(o.reason == reason);
      CHECK_THAT(o.detail, Contains(words));
      CHECK(values(e) == std::vector<float>{1.0f, 2.0f});
      CHECK(e.version == 5);
    };
    rejected(update("stale", 2, {1, 1}), UpdateRejection::too_stale, "staleness 3");
    rejected(update("future", 6, {1, 1}), UpdateRejection::bad_version, "expert is at version 5");
    rejected(update("nan", 5, {NAN, 1}), UpdateRejection::non_finite, "NaN or Inf");
    rejected(update("inf", 5, {1, INFINITY}), UpdateRejection::non_finite, "'w'");
    rejected(update("shape", 5, {1, 1, 1}), UpdateRejection::shape_mismatch, "has shape [3]");
    auto extra = update("extra", 5, {1, 1});
    extra.delta["v"] = torch::zeros({2});
    rejected(extra, UpdateRejection::shape_mismatch, "'v' is not part of this expert");
    auto missing = update("missing", 5, {1, 1});
    missing.delta.clear();
    missing.delta["v"] = torch::zeros({2});
    rejected(missing, UpdateRejection::shape_mismatch, "'w' is missing");
    ClientUpdate empty = update("empty", 5, {1, 1});
    empty.delta.clear();
    rejected(empty, UpdateRejection::empty, "no tensors");
    CHECK(policy->pending().empty());
  }
}

TEST_CASE("clipping scales a delta to clip_norm, and bad configurations are refused", "[aggregation]") {
  auto c = config("fedasync");
  c.alpha = 1.0;
  c.staleness_function = StalenessFunction::Kind::constant;
  c.clip_norm = 1.0;
  auto policy = make_policy(c);
  auto e = expert({0, 0});
  auto o = policy->submit(e, update("a", 0, {3, 4}));  // norm 5 -> [0.6, 0.8]
  CHECK(o.clipped);
  auto v = values(e);
  CHECK(v[0] == Approx(0.6));
  CHECK(v[1] == Approx(0.8));
  auto small = policy->submit(e, update("b", 1, {0.3f, 0.4f}));  // norm 0.5: untouched
  CHECK_FALSE(small.clipped);

  c = config("fedsgd");
  CHECK_THROWS_WITH(make_policy(c), Contains("policy 'fedsgd'"));
  c = config("fedasync");
  c.alpha = 1.5;
  CHECK_THROWS_WITH(make_policy(c), Contains("alpha"));
  c = config("fedbuff");
  c.server_lr = 0;
  CHECK_THROWS_WITH(make_policy(c), Contains("server_lr"));
}
