// Serving LoRA experts for generation: one frozen base, experts attached at exact versions, and the
// three ways a router combines them:
//   single      one expert generates;
//   stitch      each chosen expert answers in turn and the answers are joined, one section each;
//   consensus   several copies of one expert (its replicas' snapshots, TR-FMoE) generate together:
//               at every step their next-token log-probabilities are averaged before sampling.
// An attached version never changes: a generation that starts with "sql@3" reads version 3 to its
// end, whatever a shard publishes meanwhile. Old versions are detached least recently used first.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "model/generation.hpp"
#include "model/lora.hpp"
#include "model/tokenizer.hpp"

namespace fedmoe::model {

class ExpertServer {
 public:
  // Keeps at most `max_adapters` attached (never detaching ones a running generation uses).
  ExpertServer(Qwen2ForCausalLM base, Tokenizer tokenizer, size_t max_adapters = 8);

  // The adapter name of expert `id` at `version` as received from `source` (a shard id; "" when the
  // source does not matter). Attaches it from PEFT-named tensors unless it is attached already;
  // throws std::invalid_argument naming tensors that do not fit the base.
  std::string attach(const std::string& id, uint64_t version, const LoraSpec& spec,
                     const std::map<std::string, torch::Tensor>& tensors, const std::string& source = "");
  bool attached(const std::string& id, uint64_t version, const std::string& source = "") const;
  // The adapter name of an attached version, marked as just used; nullopt when it is not attached.
  std::optional<std::string> reuse(const std::string& id, uint64_t version, const std::string& source = "");

  // Generates an answer to `prompt` (Qwen chat template when `chat`) with the named adapters' outputs
  // averaged (one adapter: plain generation). Returns the decoded new text without stop tokens.
  std::string generate(const std::vector<std::string>& adapters, const std::string& prompt,
                       GenerationOptions options, bool chat = true);

  Qwen2ForCausalLM& base() { return experts_.model(); }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  size_t adapters() const { return lru_.size(); }

 private:
  static std::string key(const std::string& id, uint64_t version, const std::string& source);
  void touch(const std::string& name);

  LoraExperts experts_;
  Tokenizer tokenizer_;
  size_t max_adapters_;
  std::list<std::string> lru_;  // attached adapters, most recently used first
};

}  // namespace fedmoe::model
