// Choosing experts for a prompt. Two routers, usable alone or together:
//
//   RuleRouter         regex and keyword rules from configuration, the original FedMoE behaviour:
//                      "sql:\b(select|join)\b" (a case-insensitive ECMAScript regex) or
//                      "python=def,import,lambda" (whole words, case-insensitive). An expert scores
//                      the number of its rules' matches in the prompt.
//   HiddenStateRouter  a learned router: a softmax classifier over the experts on the base model's
//                      hidden states (final-norm output, mean over the prompt's tokens), trained on
//                      the experts' domain data. Saved as safetensors beside its expert names.
//
// Both return the experts ranked best first; choose() picks the ones a prompt goes to.
#pragma once

#include <cstdint>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include <torch/types.h>

#include "model/data.hpp"
#include "model/qwen2.hpp"
#include "model/tokenizer.hpp"

namespace fedmoe::model {

struct ExpertScore {
  std::string expert;
  double score = 0;     // rules: matches; learned: probability
  std::string reason;   // "rule sql:\bselect\b", "learned p=0.93"
};

class RuleRouter {
 public:
  struct Rule {
    std::string expert;
    std::string text;  // as configured, for reasons and status
    std::regex pattern;
  };
  // "EXPERT:REGEX" or "EXPERT=WORD,WORD,...". Throws std::invalid_argument naming the rule and the
  // problem (no expert, empty pattern, a regex that does not compile).
  static Rule parse(const std::string& text);

  RuleRouter() = default;
  explicit RuleRouter(const std::vector<std::string>& rules);

  // Experts with at least one match, most matches first (ties: configuration order).
  std::vector<ExpertScore> route(const std::string& prompt) const;
  bool empty() const { return rules_.empty(); }
  const std::vector<Rule>& rules() const { return rules_; }

 private:
  std::vector<Rule> rules_;
};

struct RouterTrainingConfig {
  int64_t max_tokens = 128;      // per text (its first tokens)
  size_t max_texts = 0;          // per expert: an even sample of this many texts (0 = all)
  int64_t steps = 300;           // full-batch AdamW steps
  double lr = 0.05;
  double weight_decay = 1e-3;
  double validation_fraction = 0.2;
  uint64_t seed = 0;
};

struct RouterTrainingReport {
  size_t train_examples = 0, validation_examples = 0;  // texts (each also trains as its 8- and 32-token prefixes)
  double train_accuracy = 0, validation_accuracy = 0;  // validation: NaN when there is none
  double seconds = 0;
};

class HiddenStateRouter {
 public:
  HiddenStateRouter() = default;

  // Trains on texts per expert (at least two experts, each with at least one text). Deterministic
  // for config.seed. Throws std::invalid_argument naming what is missing.
  static HiddenStateRouter train(Qwen2ForCausalLM& base, const Tokenizer& tok,
                                 const std::map<std::string, std::vector<std::string>>& texts,
                                 const RouterTrainingConfig& config, RouterTrainingReport* report = nullptr);

  // Probabilities of every expert for `prompt`, best first.
  std::vector<ExpertScore> route(Qwen2ForCausalLM& base, const Tokenizer& tok, const std::string& prompt) const;

  // The routing feature of `ids` ([T] token ids), fp32: the mean of the token embeddings (what the
  // prompt is made of) beside the mean of the final hidden states (what the model makes of it),
  // [2H]; with_embeddings = false: the final hidden states only, [H] (routers saved before the
  // embedding half existed). On a weakly trained base the embedding half carries most of the domain:
  // on fedmoe-small after 80 pretraining steps the final states alone separated python, sql and man
  // pages with 82% held-out accuracy.
  static torch::Tensor features(Qwen2ForCausalLM& base, const std::vector<int32_t>& ids, bool with_embeddings = true);

  // PATH (safetensors): weight [E, F], bias [E], feature_mean [F], feature_std [F]; the expert names
  // and the feature kind ("features": "embedding_mean+final_mean", F = 2H, or "final_mean", F = H,
  // the default of files without it) in the metadata. load() checks shapes against each other and
  // against `hidden_size` when given.
  void save(const std::string& path) const;
  static HiddenStateRouter load(const std::string& path, int64_t hidden_size = 0);

  bool trained() const { return weight_.defined(); }
  const std::vector<std::string>& experts() const { return experts_; }

 private:
  torch::Tensor logits(const torch::Tensor& features) const;  // [N, F] -> [N, E]
  // Features of the prefixes of `ids` of each length (clipped to its size), from one forward: [K, F].
  static torch::Tensor prefix_features(Qwen2ForCausalLM& base, const std::vector<int32_t>& ids, bool with_embeddings,
                                       const std::vector<int64_t>& lengths);

  std::vector<std::string> experts_;
  bool with_embeddings_ = true;        // see features()
  int64_t max_tokens_ = 128;           // a prompt's first tokens routed on (as trained; metadata "max_tokens")
  torch::Tensor weight_, bias_;        // [E, F], [E]
  torch::Tensor mean_, std_;           // [F], [F]: feature standardization
};

// The text a router learns from and is asked about: a text example's text, a prompt/completion's
// prompt, a chat's user turns.
std::string routing_text(const Example& ex);

// The experts a prompt goes to from ranked scores: the best one, then the next ones while they
// score at least `min_share` of the best, up to `max_experts`.
std::vector<ExpertScore> choose(const std::vector<ExpertScore>& ranked, size_t max_experts, double min_share);

}  // namespace fedmoe::model
