// A LoRA expert's adapter tensors for a Qwen2 base, named and shaped exactly as PEFT saves them
// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in], `...lora_B.weight`
// [out, r]), so an expert maps 1:1 onto adapter_model.safetensors.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "model/qwen2_config.hpp"

namespace fedmoe::model {

struct LoraSpec {
  int64_t rank = 16;
  double alpha = 32;
  double dropout = 0.0;
  std::vector<std::string> target_modules{"q_proj", "v_proj"};  // PEFT's default for Qwen2
  bool use_rslora = false;

  // alpha / r, or alpha / sqrt(r) with rsLoRA.
  double scale() const;
};

// in/out features of a target module ("q_proj", ..., "down_proj"); throws std::invalid_argument for
// an unknown module name.
std::pair<int64_t, int64_t> module_in_out(const Qwen2Config& cfg, const std::string& module);

// "base_model.model.model.layers.{layer}.self_attn.q_proj." (or "...mlp.gate_proj."): the prefix of
// PEFT's names for the module's "lora_A.weight" and "lora_B.weight". Throws std::invalid_argument
// for an unknown module name.
std::string peft_lora_prefix(int64_t layer, const std::string& module);

enum class LoraInit {
  peft,    // A kaiming-uniform(a=sqrt(5)) as nn.Linear, B zeros: the adapter starts as a no-op
  random,  // A and B both random: for transfer tests and benchmarks, where zeros would hide errors
};

struct NamedTensor {
  std::string name;
  torch::Tensor tensor;
};

// All adapter tensors, layer by layer, module by module, A before B. Deterministic for a seed.
std::vector<NamedTensor> make_lora_tensors(const Qwen2Config& cfg, const LoraSpec& spec, LoraInit init,
                                           uint64_t seed, torch::Dtype dtype = torch::kFloat32);

int64_t lora_parameter_count(const Qwen2Config& cfg, const LoraSpec& spec);

}  // namespace fedmoe::model
