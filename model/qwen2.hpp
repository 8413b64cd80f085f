// The Qwen2 decoder (Hugging Face's Qwen2ForCausalLM) in LibTorch's C++ frontend. Parameter names
// are Hugging Face's, so `named_parameters()` lines up 1:1 with a checkpoint's safetensors keys:
// `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
// `model.layers.{i}.self_attn.{q,k,v}_proj.bias`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
// `model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`, and
// `lm_head.weight` only when the embeddings are untied. Qwen2-MoE configs (num_experts > 0) put the
// sparse block of model/moe.hpp under `model.layers.{i}.mlp.` on their MoE layers instead.
//
// Shapes below: B batch, T new tokens, P cached tokens, S = P + T keys, H hidden_size,
// Nh attention heads, Nkv key/value heads, D head_dim, I intermediate_size, V vocab_size.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "model/qwen2_config.hpp"

namespace fedmoe::model {

class LoraLayerImpl;  // model/lora.hpp
class Qwen2MoeSparseBlockImpl;  // model/moe.hpp

// y = x W^T (+ b): every projection of the decoder. While a LoRA expert is active (and not merged)
// `lora` holds its branch for this projection and the output gains the low-rank update.
class Qwen2LinearImpl : public torch::nn::Module {
 public:
  Qwen2LinearImpl(int64_t in_features, int64_t out_features, bool bias, double init_std, torch::Dtype dtype);
  torch::Tensor forward(const torch::Tensor& x);  // [..., in] -> [..., out]

  int64_t in_features, out_features;
  torch::Tensor weight;  // [out, in]
  torch::Tensor bias;    // [out]; undefined without bias
  std::shared_ptr<LoraLayerImpl> lora;  // managed by LoraExperts (model/lora.hpp); null = base layer only
};
TORCH_MODULE(Qwen2Linear);

class Qwen2EmbeddingImpl : public torch::nn::Module {
 public:
  Qwen2EmbeddingImpl(int64_t vocab_size, int64_t hidden_size, double init_std, torch::Dtype dtype);
  torch::Tensor forward(const torch::Tensor& ids);  // [B, T] int64 -> [B, T, H]

  torch::Tensor weight;  // [V, H]
};
TORCH_MODULE(Qwen2Embedding);

// weight * x / sqrt(mean(x^2) + eps), normalized in fp32 whatever the model dtype (as HF), so a
// bf16 model does not lose the small variances.
class Qwen2RMSNormImpl : public torch::nn::Module {
 public:
  Qwen2RMSNormImpl(int64_t dim, double eps, torch::Dtype dtype);
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim] -> same

  double eps;
  torch::Tensor weight;  // [dim]
};
TORCH_MODULE(Qwen2RMSNorm);

// The keys (after RoPE) and values of every token seen so far, per layer, so that decoding one
// more token costs one token's projections instead of the whole prefix's.
struct KVCache {
  std::vector<torch::Tensor> keys;    // per layer [B, Nkv, P, D]; empty before the first forward
  std::vector<torch::Tensor> values;  // per layer [B, Nkv, P, D]
  int64_t length() const;             // P
};

// What one forward pass shares across layers: RoPE tables and which keys each query may see.
struct AttentionInputs {
  torch::Tensor cos, sin;  // [B, T, D], model dtype
  torch::Tensor blocked;   // bool [B or 1, T, S]: key in the query's future, or padding
  torch::Tensor token_mask;  // bool [B, T]: real (non-padding) new tokens; undefined = all real (MoE statistics)
};

class Qwen2AttentionImpl : public torch::nn::Module {
 public:
  Qwen2AttentionImpl(const Qwen2Config& config, torch::Dtype dtype);
  // x [B, T, H] -> [B, T, H]. With a cache, appends this step's keys/values to `cached_k/v` first.
  torch::Tensor forward(const torch::Tensor& x, const AttentionInputs& in, torch::Tensor* cached_k,
                        torch::Tensor* cached_v);

  int64_t num_heads, num_kv_heads, head_dim;
  Qwen2Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(Qwen2Attention);

class Qwen2MLPImpl : public torch::nn::Module {
 public:
  Qwen2MLPImpl(const Qwen2Config& config, torch::Dtype dtype);
  torch::Tensor forward(const torch::Tensor& x);  // [B, T, H] -> [B, T, H]: down(silu(gate(x)) * up(x))

  Qwen2Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(Qwen2MLP);

class Qwen2DecoderLayerImpl : public torch::nn::Module {
 public:
  // layer_idx decides, with config.is_moe_layer(), whether the feed-forward is the MoE block.
  Qwen2DecoderLayerImpl(const Qwen2Config& config, torch::Dtype dtype, int64_t layer_idx = 0);
  // Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)). [B, T, H] -> [B, T, H].
  torch::Tensor forward(const torch::Tensor& x, const AttentionInputs& in, torch::Tensor* cached_k,
                        torch::Tensor* cached_v);

  Qwen2Attention self_attn{nullptr};
  Qwen2MLP mlp{nullptr};  // the dense feed-forward; null on an MoE layer
  // The sparse block (model/moe.hpp), registered under the name "mlp" (HF's `mlp.gate.weight`,
  // `mlp.experts.{j}...`) on MoE layers; null on dense layers.
  std::shared_ptr<Qwen2MoeSparseBlockImpl> moe;
  Qwen2RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(Qwen2DecoderLayer);

// The decoder stack without the LM head (HF's Qwen2Model).
class Qwen2ModelImpl : public torch::nn::Module {
 public:
  Qwen2ModelImpl(const Qwen2Config& config, torch::Dtype dtype);

  // input_ids [B, T] -> final hidden states [B, T, H].
  // attention_mask: optional [B, S] of 1 (token) / 0 (padding), covering the cached tokens too;
  //   left or right padding. Without it every token is real.
  // position_ids: optional [B, T]. Default: the number of real tokens before each position
  //   (cumsum(attention_mask) - 1, as HF's generate() derives them), so a left-padded sequence gets
  //   the positions it would have alone; without a mask P, P+1, ..., P+T-1.
  // cache: optional; read (P = cache->length()) and extended by this call's T tokens.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& position_ids = {}, KVCache* cache = nullptr);

  Qwen2DecoderLayerImpl& layer(int64_t i) const;  // typed access to layers[i]

  Qwen2Config config;
  Qwen2Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};  // num_hidden_layers Qwen2DecoderLayer, named "0", "1", ...
  Qwen2RMSNorm norm{nullptr};
  torch::Tensor inv_freq;  // [D/2] fp32 RoPE frequencies; not a parameter, so to(bf16) cannot round it
  // After each forward of a model with MoE layers: router_aux_loss_coef * the load-balancing loss of
  // that forward (fp32 scalar, differentiable; see model/moe.hpp). Undefined for a dense model.
  torch::Tensor router_aux_loss;
};
TORCH_MODULE(Qwen2Model);

// Qwen2Model plus the LM head (HF's Qwen2ForCausalLM). Weights start as HF initializes them
// (normal(0, initializer_range) linears and embeddings, zero biases, unit norms) in `dtype`;
// load_state_dict() replaces them. `to(torch::kBFloat16)` converts a built model.
class Qwen2ForCausalLMImpl : public torch::nn::Module {
 public:
  explicit Qwen2ForCausalLMImpl(const Qwen2Config& config, torch::Dtype dtype = torch::kFloat32);

  // Logits [B, T, V] in the model dtype (arguments as Qwen2Model::forward). logits_to_keep > 0
  // computes only the last that many positions ([B, logits_to_keep, V]): generation needs just the
  // last one, and the LM head is the largest matmul of a decoding step.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& position_ids = {}, KVCache* cache = nullptr,
                        int64_t logits_to_keep = 0);

  // The LM head alone: hidden states [..., H] -> logits [..., V] (the tied embedding or lm_head).
  torch::Tensor head(const torch::Tensor& hidden);

  const Qwen2Config& config() const { return model->config; }
  // The latest forward's MoE load-balancing loss, already scaled by router_aux_loss_coef: add it to
  // the LM loss when training an MoE model. Undefined (check defined()) for a dense model.
  const torch::Tensor& aux_loss() const { return model->router_aux_loss; }

  Qwen2Model model{nullptr};
  Qwen2Linear lm_head{nullptr};  // null when tie_word_embeddings: the head is embed_tokens.weight
};
TORCH_MODULE(Qwen2ForCausalLM);

// What a non-strict load left out.
struct LoadReport {
  std::vector<std::string> missing;     // model parameters the map did not have (left unchanged)
  std::vector<std::string> unexpected;  // map entries the model has no parameter for (ignored)
};

// Copies HF-named tensors into the model's parameters, converting between floating dtypes
// (bf16 checkpoint into fp32 model and back). Everything is checked before anything is copied:
// a shape mismatch or a non-floating tensor always throws std::runtime_error naming the tensor with
// the expected and actual shape/dtype; with `strict`, missing or unexpected names throw as well,
// listed by name. A tied model ignores `lm_head.weight` (some exporters save the tied copy).
LoadReport load_state_dict(Qwen2ForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors,
                           bool strict = true);

// The model's parameters by HF name. The tensors share storage with the model (no copy; a merged
// LoRA expert is included in the weights): clone() them for a snapshot that later training leaves alone.
std::map<std::string, torch::Tensor> state_dict(const Qwen2ForCausalLM& model);

}  // namespace fedmoe::model
