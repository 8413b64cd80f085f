#include "model/expert_server.hpp"

#include <algorithm>
#include <stdexcept>

#include <torch/torch.h>

#include "model/dataset.hpp"

namespace fedmoe::model {

ExpertServer::ExpertServer(Qwen2ForCausalLM base, Tokenizer tokenizer, size_t max_adapters)
    : experts_(base), tokenizer_(std::move(tokenizer)), max_adapters_(std::max<size_t>(max_adapters, 1)) {
  experts_.model()->eval();
}

std::string ExpertServer::key(const std::string& id, uint64_t version, const std::string& source) {
  return id + "@" + std::to_string(version) + (source.empty() ? "" : "@" + source);
}

void ExpertServer::touch(const std::string& name) {
  lru_.remove(name);
  lru_.push_front(name);
}

bool ExpertServer::attached(const std::string& id, uint64_t version, const std::string& source) const {
  return experts_.contains(key(id, version, source));
}

std::optional<std::string> ExpertServer::reuse(const std::string& id, uint64_t version, const std::string& source) {
  const auto name = key(id, version, source);
  if (!experts_.contains(name)) return std::nullopt;
  touch(name);
  return name;
}

std::string ExpertServer::attach(const std::string& id, uint64_t version, const LoraSpec& spec,
                                 const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  const auto name = key(id, version, source);
  if (!experts_.contains(name)) {
    experts_.import_adapter(name, spec, tensors);
    while (lru_.size() >= max_adapters_) {  // the least recently used goes; it is not in use (we are)
      experts_.detach(lru_.back());
      lru_.pop_back();
    }
  }
  touch(name);
  return name;
}

std::string ExpertServer::generate(const std::vector<std::string>& adapters, const std::string& prompt,
                                   GenerationOptions options, bool chat) {
  if (adapters.empty()) throw std::invalid_argument("generate: no expert adapter given");
  for (const auto& a : adapters)
    if (!experts_.contains(a)) throw std::invalid_argument("generate: adapter '" + a + "' is not attached");
  for (const auto& a : adapters) touch(a);
  auto base = experts_.model();
  const auto enc = encoder_for(tokenizer_);
  std::vector<int64_t> ids;
  for (auto id : tokenizer_.encode(chat ? render_chat({{"user", prompt}}, true) : prompt)) ids.push_back(id);
  if (ids.empty()) throw std::invalid_argument("generate: empty prompt");
  if (chat && enc.im_end >= 0) options.stop_tokens.push_back(enc.im_end);
  for (auto id : base->config().eos_token_ids) options.stop_tokens.push_back(id);

  torch::NoGradGuard no_grad;
  std::vector<KVCache> caches(adapters.size());  // one per adapter: their keys and values differ
  StepFn step = [&](const std::vector<int64_t>& toks) {
    auto input = torch::tensor(toks, torch::kInt64).unsqueeze(0);  // [1, T]
    torch::Tensor sum;                                              // [V] summed log-probabilities
    for (size_t i = 0; i < adapters.size(); ++i) {
      experts_.activate(adapters[i]);
      auto logits = base->forward(input, {}, {}, &caches[i], /*logits_to_keep=*/1).reshape({-1});  // [V]
      if (adapters.size() == 1) return logits.to(torch::kFloat32);
      auto logp = torch::log_softmax(logits.to(torch::kFloat32), 0);
      sum = sum.defined() ? sum + logp : logp;
    }
    return sum / double(adapters.size());  // the sampler's softmax of the mean: a normalized geometric mean
  };
  auto r = model::generate(step, ids, options);
  experts_.deactivate();
  std::vector<int32_t> out;
  for (auto t : r.tokens)
    if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), t) == options.stop_tokens.end())
      out.push_back(static_cast<int32_t>(t));
  return tokenizer_.decode(out, /*skip_special_tokens=*/true);
}

}  // namespace fedmoe::model
