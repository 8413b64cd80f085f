// The Qwen2 architecture's shape parameters (the fields of a Hugging Face config.json that size
// tensors), with the published presets. Loading config.json itself comes with the decoder.
#pragma once

#include <cstdint>
#include <string>

namespace fedmoe::model {

struct Qwen2Config {
  std::string name;
  int64_t hidden_size = 896;
  int64_t num_hidden_layers = 24;
  int64_t num_attention_heads = 14;
  int64_t num_key_value_heads = 2;
  int64_t head_dim = 64;  // hidden_size / num_attention_heads unless the config says otherwise
  int64_t intermediate_size = 4864;
  int64_t vocab_size = 151936;
  bool tie_word_embeddings = true;
};

// "qwen2-0.5b", "qwen2-1.5b", "qwen2-7b" (the published shapes) and "tiny" (tests). Throws
// std::invalid_argument naming the known presets for any other name.
Qwen2Config qwen2_preset(const std::string& name);

}  // namespace fedmoe::model
