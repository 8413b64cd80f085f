// Text generation: sampling (greedy, temperature, top-k, top-p, repetition penalty), stop tokens and
// streaming. The model is reached through a step function (feed new tokens, get the next-token
// logits), so a KV-cached decoder, a routed mixture of experts or a test's toy all plug in.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/types.h>

namespace fedmoe::model {

struct SamplingOptions {
  double temperature = 0.0;         // 0 = greedy
  int64_t top_k = 0;                // 0 = off
  double top_p = 1.0;               // 1 = off
  double repetition_penalty = 1.0;  // 1 = off; > 1 discourages tokens already in the context (CTRL)
  uint64_t seed = 0;
};

struct GenerationOptions {
  SamplingOptions sampling;
  int64_t max_new_tokens = 64;
  std::vector<int64_t> stop_tokens;  // generation ends after emitting one of these (it is kept)
};

struct GenerationResult {
  std::vector<int64_t> tokens;  // the new tokens only
  enum class Stop { stop_token, max_tokens, stopped_by_caller } stop = Stop::max_tokens;
};

// Given the tokens not yet seen by the model (the whole prompt first, then one token at a time),
// returns the logits [V] for the position after the last of them.
using StepFn = std::function<torch::Tensor(const std::vector<int64_t>& new_tokens)>;
// Called with each new token as soon as it is chosen; return false to stop.
using TokenSink = std::function<bool(int64_t token)>;

// Picks the next token from `logits` [V] given the context so far (for the repetition penalty).
class Sampler {
 public:
  explicit Sampler(SamplingOptions options);
  int64_t next(torch::Tensor logits, const std::vector<int64_t>& context);

 private:
  SamplingOptions options_;
  torch::Generator generator_;
};

GenerationResult generate(const StepFn& step, const std::vector<int64_t>& prompt, const GenerationOptions& options,
                          const TokenSink& on_token = {});

}  // namespace fedmoe::model
