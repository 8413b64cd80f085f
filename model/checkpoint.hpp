// Hugging Face directories on disk <-> models in memory: a base model directory (config.json +
// model.safetensors or shards), and PEFT adapter directories (adapter_config.json +
// adapter_model.safetensors). What a real user brings with --base-model DIR loads through here.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <torch/types.h>

#include "model/lora.hpp"
#include "model/qwen2.hpp"
#include "model/safetensors.hpp"

namespace fedmoe::model {

// Tensors of a safetensors file or checkpoint directory by name. Aligned tensors borrow the file's
// mapping (no copy; the tensor keeps the file open); others are copied. Read-only: clone() to modify.
std::map<std::string, torch::Tensor> read_safetensors(const std::string& path);

// Writes tensors (f32, f16, bf16, i64, i32, u8, bool; contiguous copies are made as needed).
void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Loads config.json and the weights of a Hugging Face Qwen2 directory into a new model of `dtype`.
// Errors name the directory and the file/tensor at fault.
Qwen2ForCausalLM load_pretrained(const std::string& dir, torch::Dtype dtype = torch::kFloat32);

// Writes config.json and the weights (sharded past max_shard_bytes, as save_pretrained does) in the
// model's dtype, so load -> save -> load is bit-exact.
void save_pretrained(const Qwen2ForCausalLM& model, const std::string& dir,
                     uint64_t max_shard_bytes = uint64_t{5} << 30);

// PEFT adapter directories for adapter `name` of `experts`.
void save_peft_adapter(const LoraExperts& experts, const std::string& name, const std::string& dir,
                       const std::string& base_model_name_or_path);
// Attaches the adapter in `dir` as `name`; refused with a message naming tensor and shapes when it
// does not fit the base.
void load_peft_adapter(LoraExperts& experts, const std::string& name, const std::string& dir);

}  // namespace fedmoe::model
