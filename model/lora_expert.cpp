#include "model/lora_expert.hpp"

#include <cmath>
#include <stdexcept>

#include <torch/torch.h>

namespace fedmoe::model {

double LoraSpec::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

[[noreturn]] static void unknown_module(const std::string& module) {
  throw std::invalid_argument("unknown LoRA target module '" + module +
                              "' (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
}

std::pair<int64_t, int64_t> module_in_out(const Qwen2Config& cfg, const std::string& module) {
  const int64_t q_out = cfg.num_attention_heads * cfg.head_dim;
  const int64_t kv_out = cfg.num_key_value_heads * cfg.head_dim;
  if (module == "q_proj") return {cfg.hidden_size, q_out};
  if (module == "k_proj" || module == "v_proj") return {cfg.hidden_size, kv_out};
  if (module == "o_proj") return {q_out, cfg.hidden_size};
  if (module == "gate_proj" || module == "up_proj") return {cfg.hidden_size, cfg.intermediate_size};
  if (module == "down_proj") return {cfg.intermediate_size, cfg.hidden_size};
  unknown_module(module);
}

std::string peft_lora_prefix(int64_t layer, const std::string& module) {
  bool attention = module == "q_proj" || module == "k_proj" || module == "v_proj" || module == "o_proj";
  bool mlp = module == "gate_proj" || module == "up_proj" || module == "down_proj";
  if (!attention && !mlp) unknown_module(module);
  return "base_model.model.model.layers." + std::to_string(layer) + (attention ? ".self_attn." : ".mlp.") + module +
         ".";
}

std::vector<NamedTensor> make_lora_tensors(const Qwen2Config& cfg, const LoraSpec& spec, LoraInit init,
                                           uint64_t seed, torch::Dtype dtype) {
  if (spec.rank <= 0) throw std::invalid_argument("LoRA rank must be positive, got " + std::to_string(spec.rank));
  torch::manual_seed(seed);
  std::vector<NamedTensor> out;
  out.reserve(cfg.num_hidden_layers * spec.target_modules.size() * 2);
  for (int64_t layer = 0; layer < cfg.num_hidden_layers; ++layer) {
    for (const auto& module : spec.target_modules) {
      auto [in, outf] = module_in_out(cfg, module);
      std::string prefix = peft_lora_prefix(layer, module);
      // A: [rank, in]. nn.Linear's default init, kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in)).
      double bound = 1.0 / std::sqrt(static_cast<double>(in));
      auto a = torch::empty({spec.rank, in}, torch::kFloat32).uniform_(-bound, bound);
      // B: [out, rank]. Zeros, so a fresh adapter leaves the base model's output unchanged.
      auto b = init == LoraInit::peft ? torch::zeros({outf, spec.rank}, torch::kFloat32)
                                      : torch::empty({outf, spec.rank}, torch::kFloat32).uniform_(-bound, bound);
      out.push_back({prefix + "lora_A.weight", a.to(dtype)});
      out.push_back({prefix + "lora_B.weight", b.to(dtype)});
    }
  }
  return out;
}

int64_t lora_parameter_count(const Qwen2Config& cfg, const LoraSpec& spec) {
  int64_t per_layer = 0;
  for (const auto& module : spec.target_modules) {
    auto [in, out] = module_in_out(cfg, module);
    per_layer += spec.rank * (in + out);
  }
  return per_layer * cfg.num_hidden_layers;
}

}  // namespace fedmoe::model
