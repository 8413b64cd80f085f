// Sampling and the generation loop, on a toy "model" whose next-token logits are a fixed table
// indexed by the last token, so every expectation can be worked out by hand.

#include <cmath>
#include <map>

#include <torch/torch.h>
// glog (via LibTorch) defines CHECK too; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "model/generation.hpp"

using namespace fedmoe::model;

namespace {

// Next-token logits [V=6]: token t mostly leads to (t + 1) % 6.
torch::Tensor table_logits(int64_t last) {
  auto l = torch::full({6}, -4.0f);
  l[(last + 1) % 6] = 4.0f;
  return l;
}

}  // namespace

TEST_CASE("generation: greedy follows the argmax, feeds the prompt once, then one token at a time", "[generation]") {
  std::vector<std::vector<int64_t>> fed;
  StepFn step = [&](const std::vector<int64_t>& toks) {
    fed.push_back(toks);
    return table_logits(toks.back());
  };
  GenerationOptions o;
  o.max_new_tokens = 4;
  auto r = generate(step, {3, 0}, o);
  CHECK(r.tokens == std::vector<int64_t>{1, 2, 3, 4});
  CHECK(r.stop == GenerationResult::Stop::max_tokens);
  REQUIRE(fed.size() == 4);
  CHECK(fed[0] == std::vector<int64_t>{3, 0});
  CHECK(fed[1] == std::vector<int64_t>{1});
  CHECK(fed[3] == std::vector<int64_t>{3});

  o.stop_tokens = {3};
  o.max_new_tokens = 10;
  r = generate(step, {0}, o);
  CHECK(r.tokens == std::vector<int64_t>{1, 2, 3});
  CHECK(r.stop == GenerationResult::Stop::stop_token);

  std::vector<int64_t> streamed;
  r = generate(step, {0}, o, [&](int64_t t) {
    streamed.push_back(t);
    return streamed.size() < 2;
  });
  CHECK(streamed == std::vector<int64_t>{1, 2});
  CHECK(r.tokens == streamed);
  CHECK(r.stop == GenerationResult::Stop::stopped_by_caller);
  CHECK_THROWS_AS(generate(step, {}, o), std::invalid_argument);
}

TEST_CASE("sampling: temperature draws follow the softmax and are reproducible by seed", "[generation]") {
  auto logits = torch::tensor({std::log(0.8f), std::log(0.2f)});
  SamplingOptions s;
  s.temperature = 1.0;
  s.seed = 11;
  Sampler a(s), b(s);
  int zeros = 0;
  std::vector<int64_t> seq_a, seq_b;
  for (int i = 0; i < 4000; ++i) {
    seq_a.push_back(a.next(logits, {}));
    seq_b.push_back(b.next(logits, {}));
    zeros += seq_a.back() == 0;
  }
  CHECK(seq_a == seq_b);
  CHECK(zeros > 3040);  // 0.8 * 4000 = 3200, 5 sigma = 126
  CHECK(zeros < 3360);
  s.seed = 12;
  Sampler c(s);
  std::vector<int64_t> seq_c;
  for (int i = 0; i < 4000; ++i) seq_c.push_back(c.next(logits, {}));
  CHECK(seq_c != seq_a);

  // A high temperature flattens the distribution.
  s.temperature = 100.0;
  Sampler hot(s);
  int hot_zeros = 0;
  for (int i = 0; i < 4000; ++i) hot_zeros += hot.next(logits, {}) == 0;
  CHECK(hot_zeros < 2200);
}

TEST_CASE("sampling: top-k and top-p keep only the head of the distribution", "[generation]") {
  auto logits = torch::tensor({std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)});
  SamplingOptions s;
  s.temperature = 1.0;
  s.top_k = 1;
  Sampler k1(s);
  for (int i = 0; i < 200; ++i) CHECK(k1.next(logits, {}) == 0);

  s.top_k = 0;
  s.top_p = 0.7;  // 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it: tokens 0 and 1 only
  Sampler p(s);
  std::map<int64_t, int> counts;
  for (int i = 0; i < 3000; ++i) counts[p.next(logits, {})]++;
  CHECK(counts.count(2) == 0);
  CHECK(counts.count(3) == 0);
  CHECK(counts[0] > 1700);  // renormalized: 0.625 * 3000 = 1875
  CHECK(counts[1] > 950);   // 0.375 * 3000 = 1125
}

TEST_CASE("sampling: the repetition penalty discourages tokens already in the context", "[generation]") {
  SamplingOptions s;  // greedy
  s.repetition_penalty = 1.2;
  Sampler greedy(s);
  auto logits = torch::tensor({2.0f, 1.9f, -1.0f});
  CHECK(greedy.next(logits, {}) == 0);
  CHECK(greedy.next(logits, {0, 0, 0}) == 1);  // 2.0 / 1.2 < 1.9, applied once per distinct token
  auto negative = torch::tensor({-1.0f, -1.1f});
  CHECK(greedy.next(negative, {}) == 0);
  CHECK(greedy.next(negative, {0}) == 1);      // -1.0 * 1.2 < -1.1
  s.repetition_penalty = 0;
  CHECK_THROWS_AS(Sampler(s), std::invalid_argument);
}
