// Held-out evaluation of experts: every model (the base, then each LoRA expert) on every domain's
// validation examples, scored per example so that any mixture can be scored from the same numbers —
// the perplexity matrix (model x domain), each model on the mixed set of all domains, and routed
// inference on that mixed set (each example scored by the expert the learned router picks for it).
//
// Per example, not packed: an example is scored on its own first `seq_len` predicted tokens, so a
// domain's perplexity does not depend on which examples happened to share a packed window, and the
// routed score takes exactly the per-example losses the matrix took.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/data.hpp"
#include "model/lora.hpp"
#include "model/routing.hpp"
#include "model/tokenizer.hpp"

namespace fedmoe::model {

struct ExampleLoss {
  double loss_sum = 0;  // summed next-token negative log-likelihood (nats)
  int64_t tokens = 0;   // predicted tokens
};

// One sequence per example: its first `seq_len` predicted tokens (shorter ones padded with ignored
// labels). Examples with fewer than 2 tokens are skipped; `kept` (optional) receives the indices kept.
std::vector<PackedSequence> example_windows(const std::vector<Example>& examples, const TextEncoder& enc,
                                            size_t seq_len, std::vector<size_t>* kept = nullptr);

// Summed loss and token count of each sequence under `model` (eval mode, no gradients), `batch` at
// a time. One entry per sequence, in order.
std::vector<ExampleLoss> example_losses(Qwen2ForCausalLM& model, const std::vector<PackedSequence>& sequences,
                                        int64_t batch);

struct LossSummary {
  double loss = 0;        // token-weighted mean (nats); NaN without tokens
  double perplexity = 0;  // exp(loss)
  int64_t tokens = 0;
  size_t examples = 0;
};
LossSummary summarize(const std::vector<ExampleLoss>& losses);

struct ExpertEvalConfig {
  size_t seq_len = 256;
  int64_t batch = 4;
  size_t max_examples = 0;        // per domain, the first ones (0 = all)
  size_t router_prompt_chars = 512;  // the router sees an example's routing text cut to this many bytes
};

struct RouterEval {
  std::vector<std::string> experts;                                 // the router's, its order
  std::map<std::string, std::map<std::string, size_t>> confusion;   // true domain -> routed expert -> examples
  size_t examples = 0, correct = 0;                                 // over domains that are router experts
  double accuracy = 0;                                              // correct / examples (NaN for none)
  LossSummary routed;                                               // the mixed set, each example by its top-1 expert
};

struct ExpertEvalReport {
  std::vector<std::string> models;   // "base", then the adapters in the order given
  std::vector<std::string> domains;  // in the order given
  std::map<std::string, std::map<std::string, LossSummary>> cells;  // model -> domain
  std::map<std::string, LossSummary> mixed;                         // model -> all domains together
  bool has_router = false;
  RouterEval router;
  double seconds = 0;
};

// `experts` must hold every adapter named in `adapters` (each is activated in turn; the base row
// runs with none active). `domains`: name -> examples. With a router, each example's routing text
// goes to it (no adapter active: routing reads the base's hidden states) and the routed loss takes
// that example's loss under the top-1 expert, which must be one of `adapters` (std::invalid_argument
// otherwise, naming it). `progress` (optional) is told each finished model.
ExpertEvalReport evaluate_experts(LoraExperts& experts, const std::vector<std::string>& adapters,
                                  const std::vector<std::pair<std::string, std::vector<Example>>>& domains,
                                  const Tokenizer& tok, const HiddenStateRouter* router, const ExpertEvalConfig& config,
                                  const std::function<void(const std::string&)>& progress = {});

}  // namespace fedmoe::model
