// The Qwen2 architecture's configuration: the fields of a Hugging Face config.json that change what
// the decoder computes, the published shape presets, and config.json reading and writing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fedmoe::model {

// The member defaults are Qwen2-0.5B. A parsed config.json starts from Hugging Face's
// Qwen2Config defaults instead (see qwen2_config_from_json), because that is what transformers
// assumes for a field the file leaves out.
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

  double rms_norm_eps = 1e-6;
  double rope_theta = 1e6;  // the published checkpoints' value; HF's class default is 1e4
  int64_t max_position_embeddings = 32768;
  bool attention_bias = true;  // q/k/v projections carry a bias (o_proj and the MLP never do)
  double initializer_range = 0.02;  // std of the normal init of linears and embeddings
  std::string torch_dtype = "bfloat16";  // the checkpoint's storage dtype; informational
  std::optional<int64_t> bos_token_id = 151643;
  std::vector<int64_t> eos_token_ids{151643};  // config.json holds one id or a list

  // Qwen2-MoE (model/moe.hpp): num_experts == 0 (the default) is the dense Qwen2 decoder and the
  // fields below are ignored. With num_experts > 0, a layer's feed-forward is the sparse block
  // (router + num_experts SwiGLU experts of moe_intermediate_size + optional shared expert) when
  // is_moe_layer(i), else the dense MLP of intermediate_size (HF's Qwen2MoeDecoderLayer rule).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;            // top-k
  int64_t moe_intermediate_size = 0;          // each routed expert's SwiGLU width
  int64_t shared_expert_intermediate_size = 0;  // 0 = no shared expert
  bool norm_topk_prob = false;                // renormalize the k chosen probabilities to sum to 1
  double router_aux_loss_coef = 0.001;        // scale of the load-balancing loss
  int64_t decoder_sparse_step = 1;            // MoE on layers with (i + 1) % step == 0
  std::vector<int64_t> mlp_only_layers;       // layers kept dense regardless of the step

  // num_experts > 0, i not in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0.
  bool is_moe_layer(int64_t layer_idx) const;

  // Throws std::invalid_argument naming the field for shapes the decoder cannot run: non-positive
  // sizes, num_attention_heads not a multiple of num_key_value_heads, an odd head_dim (RoPE
  // rotates pairs). With num_experts > 0 also: num_experts_per_tok in [1, num_experts],
  // moe_intermediate_size > 0, shared_expert_intermediate_size >= 0, decoder_sparse_step >= 1,
  // router_aux_loss_coef >= 0, mlp_only_layers within [0, num_hidden_layers).
  void validate() const;
};

// "qwen2-0.5b", "qwen2-1.5b", "qwen2-7b" (the published shapes) and "tiny" (tests). Throws
// std::invalid_argument naming the known presets for any other name.
Qwen2Config qwen2_preset(const std::string& name);

// Parses config.json text; `source` (usually the path) names the file in errors. Required:
// hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size. Defaults as
// transformers' Qwen2Config: num_key_value_heads = num_attention_heads (transformers' meaning of
// null; every published config sets it), head_dim = hidden_size /
// num_attention_heads, rms_norm_eps 1e-6, rope_theta 1e4 (read from `rope_theta` or
// `rope_parameters.rope_theta`), tie_word_embeddings false, max_position_embeddings 32768.
// Throws std::runtime_error "<source>: field '<name>': ..." for a missing or mistyped field, and
// for settings this decoder does not implement (model_type other than qwen2 / qwen2_moe, hidden_act
// other than silu, sliding-window attention, RoPE scaling).
// Qwen2-MoE: model_type "qwen2_moe" requires num_experts, num_experts_per_tok,
// moe_intermediate_size and shared_expert_intermediate_size; norm_topk_prob (false),
// router_aux_loss_coef (0.001), decoder_sparse_step (1) and mlp_only_layers ([]) default as HF's
// Qwen2MoeConfig. Without model_type, num_experts > 0 also selects MoE; model_type "qwen2" with
// num_experts > 0 is refused (transformers would build a dense model from that file).
Qwen2Config qwen2_config_from_json(const std::string& json_text, const std::string& source);

// Reads and parses a config.json file.
Qwen2Config load_qwen2_config(const std::string& path);

// config.json text transformers reads back as the same Qwen2Config (architectures
// ["Qwen2ForCausalLM"], model_type "qwen2"; with num_experts > 0 ["Qwen2MoeForCausalLM"],
// "qwen2_moe" and the MoE fields).
std::string qwen2_config_to_json(const Qwen2Config& config);

void save_qwen2_config(const Qwen2Config& config, const std::string& path);

}  // namespace fedmoe::model
