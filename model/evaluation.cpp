#include "model/evaluation.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>

#include <torch/torch.h>

#include "model/dataset.hpp"
#include "model/trainer.hpp"

namespace fedmoe::model {

std::vector<PackedSequence> example_windows(const std::vector<Example>& examples, const TextEncoder& enc,
                                            size_t seq_len, std::vector<size_t>* kept) {
  std::vector<PackedSequence> out;
  for (size_t i = 0; i < examples.size(); ++i) {
    auto t = tokenize(examples[i], enc);
    if (t.ids.size() < 2) continue;
    auto windows = pack({t}, seq_len, enc.eos >= 0 ? enc.eos : 0);
    bool scored = false;
    for (auto l : windows.front().labels) scored = scored || l != kIgnoreLabel;
    if (!scored) continue;  // e.g. a prompt/completion whose completion lies beyond seq_len
    out.push_back(std::move(windows.front()));
    if (kept) kept->push_back(i);
  }
  return out;
}

std::vector<ExampleLoss> example_losses(Qwen2ForCausalLM& model, const std::vector<PackedSequence>& sequences,
                                        int64_t batch) {
  if (batch < 1) throw std::invalid_argument("example_losses: batch must be >= 1");
  torch::NoGradGuard no_grad;
  model->eval();
  std::vector<ExampleLoss> out;
  out.reserve(sequences.size());
  for (size_t start = 0; start < sequences.size(); start += size_t(batch)) {
    std::vector<size_t> idx;
    for (size_t i = start; i < std::min(sequences.size(), start + size_t(batch)); ++i) idx.push_back(i);
    auto [ids, labels] = make_batch(sequences, idx);                          // [B, T], [B, T] int64
    auto logp = torch::log_softmax(model->forward(ids).to(torch::kFloat32), -1);  // [B, T, V]
    auto scored = labels.ne(kIgnoreLabel);                                    // [B, T]
    auto nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1);  // [B, T]
    auto sums = (nll * scored).sum(1);                                        // [B]
    auto counts = scored.sum(1);                                              // [B]
    for (int64_t b = 0; b < sums.size(0); ++b)
      out.push_back({sums[b].item<double>(), counts[b].item<int64_t>()});
  }
  return out;
}

LossSummary summarize(const std::vector<ExampleLoss>& losses) {
  LossSummary s;
  double sum = 0;
  for (const auto& l : losses) sum += l.loss_sum, s.tokens += l.tokens;
  s.examples = losses.size();
  s.loss = s.tokens > 0 ? sum / double(s.tokens) : std::numeric_limits<double>::quiet_NaN();
  s.perplexity = std::exp(s.loss);
  return s;
}

ExpertEvalReport evaluate_experts(LoraExperts& experts, const std::vector<std::string>& adapters,
                                  const std::vector<std::pair<std::string, std::vector<Example>>>& domains,
                                  const Tokenizer& tok, const HiddenStateRouter* router, const ExpertEvalConfig& config,
                                  const std::function<void(const std::string&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& a : adapters)
    if (!experts.contains(a)) throw std::invalid_argument("evaluate_experts: adapter '" + a + "' is not loaded");
  if (domains.empty()) throw std::invalid_argument("evaluate_experts: no domain data");
  const auto enc = encoder_for(tok);

  ExpertEvalReport r;
  r.models.push_back("base");
  r.models.insert(r.models.end(), adapters.begin(), adapters.end());

  // The examples of every domain, windowed once; `owner[i]` is the domain of mixed-set example i.
  std::vector<PackedSequence> all;
  std::vector<size_t> owner;
  std::vector<const Example*> source;
  for (size_t d = 0; d < domains.size(); ++d) {
    const auto& [name, examples] = domains[d];
    r.domains.push_back(name);
    std::vector<Example> used(examples.begin(),
                              examples.begin() + std::ptrdiff_t(config.max_examples > 0
                                                                    ? std::min(config.max_examples, examples.size())
                                                                    : examples.size()));
    std::vector<size_t> kept;
    auto windows = example_windows(used, enc, config.seq_len, &kept);
    if (windows.empty()) throw std::invalid_argument("domain '" + name + "' has no example with tokens to score");
    for (size_t k = 0; k < windows.size(); ++k) {
      all.push_back(std::move(windows[k]));
      owner.push_back(d);
      source.push_back(&examples[kept[k]]);
    }
  }

  // Routing first, on the base alone.
  std::vector<std::string> routed_to;
  if (router) {
    experts.deactivate();
    r.has_router = true;
    r.router.experts = router->experts();
    for (const auto& e : r.router.experts)
      if (std::find(adapters.begin(), adapters.end(), e) == adapters.end())
        throw std::invalid_argument("the router routes to expert '" + e + "', which has no adapter to evaluate");
    for (size_t i = 0; i < all.size(); ++i) {
      auto text = routing_text(*source[i]);
      if (text.size() > config.router_prompt_chars) text.resize(config.router_prompt_chars);
      auto ranked = router->route(experts.model(), tok, text);
      const std::string top = ranked.empty() ? r.router.experts.front() : ranked.front().expert;
      routed_to.push_back(top);
      const auto& truth = r.domains[owner[i]];
      ++r.router.confusion[truth][top];
      if (std::find(r.router.experts.begin(), r.router.experts.end(), truth) != r.router.experts.end()) {
        ++r.router.examples;
        if (top == truth) ++r.router.correct;
      }
    }
    r.router.accuracy = r.router.examples ? double(r.router.correct) / double(r.router.examples)
                                          : std::numeric_limits<double>::quiet_NaN();
  }

  std::map<std::string, std::vector<ExampleLoss>> losses;  // model -> per mixed-set example
  for (const auto& m : r.models) {
    if (m == "base") experts.deactivate();
    else experts.activate(m);
    losses[m] = example_losses(experts.model(), all, config.batch);
    std::map<size_t, std::vector<ExampleLoss>> per_domain;
    for (size_t i = 0; i < all.size(); ++i) per_domain[owner[i]].push_back(losses[m][i]);
    for (auto& [d, l] : per_domain) r.cells[m][r.domains[d]] = summarize(l);
    r.mixed[m] = summarize(losses[m]);
    if (progress) progress(m);
  }
  experts.deactivate();

  if (router) {
    std::vector<ExampleLoss> routed;
    for (size_t i = 0; i < all.size(); ++i) routed.push_back(losses[routed_to[i]][i]);
    r.router.routed = summarize(routed);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace fedmoe::model
