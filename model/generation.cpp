#include "model/generation.hpp"

#include <algorithm>
#include <stdexcept>

#include <torch/torch.h>

namespace fedmoe::model {

Sampler::Sampler(SamplingOptions options)
    : options_(options), generator_(at::detail::createCPUGenerator(options.seed)) {
  if (options_.temperature < 0) throw std::invalid_argument("temperature must be >= 0");
  if (options_.top_p <= 0 || options_.top_p > 1) throw std::invalid_argument("top_p must be in (0, 1]");
  if (options_.repetition_penalty <= 0) throw std::invalid_argument("repetition_penalty must be > 0");
}

int64_t Sampler::next(torch::Tensor logits, const std::vector<int64_t>& context) {
  logits = logits.detach().to(torch::kFloat32).reshape({-1}).clone();  // [V]
  const int64_t vocab = logits.size(0);
  if (options_.repetition_penalty != 1.0 && !context.empty()) {
    // CTRL / Hugging Face: divide positive logits, multiply negative ones, once per distinct token.
    std::vector<int64_t> seen(context.begin(), context.end());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    seen.erase(std::remove_if(seen.begin(), seen.end(), [&](int64_t t) { return t < 0 || t >= vocab; }), seen.end());
    auto idx = torch::tensor(seen, torch::kInt64);
    auto picked = logits.index_select(0, idx);
    picked = torch::where(picked > 0, picked / options_.repetition_penalty, picked * options_.repetition_penalty);
    logits.index_copy_(0, idx, picked);
  }
  if (options_.temperature == 0.0) return logits.argmax().item<int64_t>();
  logits = logits / options_.temperature;
  if (options_.top_k > 0 && options_.top_k < vocab) {
    auto kth = std::get<0>(logits.topk(options_.top_k)).index({-1});
    logits.masked_fill_(logits < kth, -std::numeric_limits<float>::infinity());
  }
  if (options_.top_p < 1.0) {
    auto [sorted, order] = logits.sort(/*dim=*/0, /*descending=*/true);
    auto cumulative = sorted.softmax(0).cumsum(0);
    // Drop a token when the tokens before it already reach top_p; the most likely one always stays.
    auto drop = (cumulative - sorted.softmax(0)) >= options_.top_p;
    logits.index_put_({order.masked_select(drop)}, -std::numeric_limits<float>::infinity());
  }
  auto probs = logits.softmax(0);
  return torch::multinomial(probs, 1, /*replacement=*/false, generator_).item<int64_t>();
}

GenerationResult generate(const StepFn& step, const std::vector<int64_t>& prompt, const GenerationOptions& options,
                          const TokenSink& on_token) {
  if (prompt.empty()) throw std::invalid_argument("generate: empty prompt");
  GenerationResult result;
  Sampler sampler(options.sampling);
  std::vector<int64_t> context = prompt;
  std::vector<int64_t> feed = prompt;
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    torch::Tensor logits;
    {
      torch::NoGradGuard no_grad;
      logits = step(feed);
    }
    int64_t token = sampler.next(logits, context);
    result.tokens.push_back(token);
    context.push_back(token);
    feed.assign(1, token);
    if (on_token && !on_token(token)) {
      result.stop = GenerationResult::Stop::stopped_by_caller;
      return result;
    }
    if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), token) != options.stop_tokens.end()) {
      result.stop = GenerationResult::Stop::stop_token;
      return result;
    }
  }
  result.stop = GenerationResult::Stop::max_tokens;
  return result;
}

}  // namespace fedmoe::model
