#include "model/qwen2_config.hpp"

#include <stdexcept>

namespace fedmoe::model {

Qwen2Config qwen2_preset(const std::string& name) {
  Qwen2Config c;
  c.name = name;
  if (name == "qwen2-0.5b") return c;  // the struct's defaults are Qwen2-0.5B
  if (name == "qwen2-1.5b") {
    c.hidden_size = 1536, c.num_hidden_layers = 28, c.num_attention_heads = 12, c.num_key_value_heads = 2;
    c.head_dim = 128, c.intermediate_size = 8960;
    return c;
  }
  if (name == "qwen2-7b") {
    c.hidden_size = 3584, c.num_hidden_layers = 28, c.num_attention_heads = 28, c.num_key_value_heads = 4;
    c.head_dim = 128, c.intermediate_size = 18944, c.vocab_size = 152064, c.tie_word_embeddings = false;
    return c;
  }
  if (name == "tiny") {
    c.hidden_size = 64, c.num_hidden_layers = 2, c.num_attention_heads = 4, c.num_key_value_heads = 2;
    c.head_dim = 16, c.intermediate_size = 128, c.vocab_size = 512;
    return c;
  }
  throw std::invalid_argument("unknown Qwen2 preset '" + name + "' (known: qwen2-0.5b, qwen2-1.5b, qwen2-7b, tiny)");
}

}  // namespace fedmoe::model
