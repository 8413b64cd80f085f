#include "model/qwen2.hpp"

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include <torch/torch.h>

#include "model/lora.hpp"
#include "model/moe.hpp"

namespace fedmoe::model {

// HF's init draws in fp32; drawing in fp32 and converting keeps bf16 models' init the same values.
static torch::Tensor normal_init(torch::IntArrayRef shape, double std, torch::Dtype dtype) {
  return torch::empty(shape, torch::kFloat32).normal_(0.0, std).to(dtype);
}

Qwen2LinearImpl::Qwen2LinearImpl(int64_t in, int64_t out, bool with_bias, double init_std, torch::Dtype dtype)
    : in_features(in), out_features(out) {
  weight = register_parameter("weight", normal_init({out, in}, init_std, dtype));  // [out, in]
  if (with_bias) bias = register_parameter("bias", torch::zeros({out}, dtype));  // [out]
}

// x W^T (+ b). A decoding step multiplies a single row by each weight; torch::linear sends that
// through a general matrix-matrix product, which on CPU streams the weight at about half the speed
// of the matrix-vector kernel (measured on the 151936 x 512 LM head: 2.1-2.5x faster generation with
// mv). So single-row fp32 CPU inputs against large weights take torch::mv; everything else linear.
static torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const bool one_row = x.dim() >= 1 && x.numel() == x.size(-1);
  if (one_row && w.numel() >= (int64_t{1} << 19) && x.device().is_cpu() && x.scalar_type() == torch::kFloat32 &&
      w.scalar_type() == torch::kFloat32) {
    auto y = torch::mv(w, x.reshape({-1}));  // [out]
    if (b.defined()) y = y + b;
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return y.view(shape);  // [..., out]
  }
  return torch::linear(x, w, b);  // [..., out]
}

torch::Tensor Qwen2LinearImpl::forward(const torch::Tensor& x) {
  auto y = project(x, weight, bias);  // [..., out]
  if (lora) y = y + lora->forward(x, is_training()).to(y.scalar_type());
  return y;
}

Qwen2EmbeddingImpl::Qwen2EmbeddingImpl(int64_t vocab_size, int64_t hidden_size, double init_std, torch::Dtype dtype) {
  weight = register_parameter("weight", normal_init({vocab_size, hidden_size}, init_std, dtype));  // [V, H]
}

torch::Tensor Qwen2EmbeddingImpl::forward(const torch::Tensor& ids) { return torch::embedding(weight, ids); }

Qwen2RMSNormImpl::Qwen2RMSNormImpl(int64_t dim, double eps_, torch::Dtype dtype) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}, dtype));  // [dim]
}

torch::Tensor Qwen2RMSNormImpl::forward(const torch::Tensor& x) {
  auto h = x.to(torch::kFloat32);
  h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  // HF rounds to the input dtype before the weight multiply; matching it keeps bf16 results equal.
  return weight * h.to(x.scalar_type());
}

int64_t KVCache::length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }

// RoPE with HF's non-interleaved layout: dimension j pairs with j + D/2 (not 2j with 2j+1).
static torch::Tensor rotate_half(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}

static torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return x * cos + rotate_half(x) * sin;
}

Qwen2AttentionImpl::Qwen2AttentionImpl(const Qwen2Config& c, torch::Dtype dtype)
    : num_heads(c.num_attention_heads), num_kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  const double init = c.initializer_range;
  q_proj = register_module("q_proj", Qwen2Linear(c.hidden_size, num_heads * head_dim, c.attention_bias, init, dtype));
  k_proj = register_module("k_proj", Qwen2Linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias, init, dtype));
  v_proj = register_module("v_proj", Qwen2Linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias, init, dtype));
  o_proj = register_module("o_proj", Qwen2Linear(num_heads * head_dim, c.hidden_size, false, init, dtype));
}

torch::Tensor Qwen2AttentionImpl::forward(const torch::Tensor& x, const AttentionInputs& in, torch::Tensor* cached_k,
                                          torch::Tensor* cached_v) {
  const int64_t B = x.size(0), T = x.size(1), G = num_heads / num_kv_heads;
  // Query head h uses key/value head h / G (HF's repeat_kv). Grouping the G query heads of each
  // key/value head, [B, Nkv, G, T, D], lets one matmul per kv head serve its whole group, so the
  // cached keys and values are never copied G times.
  auto q = q_proj(x).view({B, T, num_kv_heads, G, head_dim}).permute({0, 2, 3, 1, 4});  // [B, Nkv, G, T, D]
  auto k = k_proj(x).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);  // [B, Nkv, T, D]
  auto v = v_proj(x).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);  // [B, Nkv, T, D]
  q = apply_rope(q, in.cos.unsqueeze(1).unsqueeze(1), in.sin.unsqueeze(1).unsqueeze(1));  // tables [B, 1, 1, T, D]
  k = apply_rope(k, in.cos.unsqueeze(1), in.sin.unsqueeze(1));                             // tables [B, 1, T, D]
  if (cached_k) {
    if (cached_k->defined()) {
      k = torch::cat({*cached_k, k}, 2);  // [B, Nkv, S, D]
      v = torch::cat({*cached_v, v}, 2);  // [B, Nkv, S, D]
    }
    *cached_k = k;
    *cached_v = v;
  }
  const int64_t S = k.size(2);

  // Scores and softmax in fp32 (as HF's eager attention), whatever the model dtype. Blocked keys get
  // the lowest finite float rather than -inf: a query with every key blocked (a padding position
  // under left padding) then averages instead of producing NaN that could reach real tokens' gradients.
  auto scores = torch::matmul(q.reshape({B, num_kv_heads, G * T, head_dim}), k.transpose(-1, -2))
                    .to(torch::kFloat32)
                    .mul(1.0 / std::sqrt(static_cast<double>(head_dim)))
                    .view({B, num_kv_heads, G, T, S});  // [B, Nkv, G, T, S] fp32
  scores = scores.masked_fill(in.blocked.unsqueeze(1).unsqueeze(1), std::numeric_limits<float>::lowest());
  auto probs = torch::softmax(scores, -1).to(v.scalar_type()).view({B, num_kv_heads, G * T, S});  // [B, Nkv, G*T, S]
  auto out = torch::matmul(probs, v)                     // [B, Nkv, G*T, D]
                 .view({B, num_kv_heads, G, T, head_dim})  // back to query heads h = kv * G + g
                 .permute({0, 3, 1, 2, 4})                 // [B, T, Nkv, G, D]
                 .reshape({B, T, num_heads * head_dim});
  return o_proj(out);
}

Qwen2MLPImpl::Qwen2MLPImpl(const Qwen2Config& c, torch::Dtype dtype) {
  const double init = c.initializer_range;
  gate_proj = register_module("gate_proj", Qwen2Linear(c.hidden_size, c.intermediate_size, false, init, dtype));
  up_proj = register_module("up_proj", Qwen2Linear(c.hidden_size, c.intermediate_size, false, init, dtype));
  down_proj = register_module("down_proj", Qwen2Linear(c.intermediate_size, c.hidden_size, false, init, dtype));
}

torch::Tensor Qwen2MLPImpl::forward(const torch::Tensor& x) {
  return down_proj(torch::silu(gate_proj(x)) * up_proj(x));  // hidden [B, T, I]
}

Qwen2DecoderLayerImpl::Qwen2DecoderLayerImpl(const Qwen2Config& c, torch::Dtype dtype, int64_t layer_idx) {
  self_attn = register_module("self_attn", Qwen2Attention(c, dtype));
  if (c.is_moe_layer(layer_idx)) moe = register_module("mlp", std::make_shared<Qwen2MoeSparseBlockImpl>(c, dtype));
  else mlp = register_module("mlp", Qwen2MLP(c, dtype));
  input_layernorm = register_module("input_layernorm", Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps, dtype));
  post_attention_layernorm =
      register_module("post_attention_layernorm", Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps, dtype));
}

torch::Tensor Qwen2DecoderLayerImpl::forward(const torch::Tensor& x, const AttentionInputs& in,
                                             torch::Tensor* cached_k, torch::Tensor* cached_v) {
  auto h = x + self_attn->forward(input_layernorm(x), in, cached_k, cached_v);
  if (moe) return h + moe->forward(post_attention_layernorm(h), in.token_mask);
  return h + mlp(post_attention_layernorm(h));
}

Qwen2ModelImpl::Qwen2ModelImpl(const Qwen2Config& c, torch::Dtype dtype) : config(c) {
  config.validate();
  embed_tokens = register_module("embed_tokens", Qwen2Embedding(c.vocab_size, c.hidden_size, c.initializer_range, dtype));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(Qwen2DecoderLayer(c, dtype, i));
  norm = register_module("norm", Qwen2RMSNorm(c.hidden_size, c.rms_norm_eps, dtype));
  // theta^(-2j/D), j < D/2, computed as HF does (int64 arange, then fp32).
  inv_freq = 1.0 / torch::pow(c.rope_theta, torch::arange(0, c.head_dim, 2, torch::kInt64).to(torch::kFloat32) /
                                                static_cast<double>(c.head_dim));  // [D/2]
}

Qwen2DecoderLayerImpl& Qwen2ModelImpl::layer(int64_t i) const {
  return *layers->ptr<Qwen2DecoderLayerImpl>(i);
}

static std::string shape_str(torch::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

torch::Tensor Qwen2ModelImpl::forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                      const torch::Tensor& position_ids, KVCache* cache) {
  if (input_ids.dim() != 2) throw std::invalid_argument("Qwen2: input_ids must be [B, T], got " + shape_str(input_ids.sizes()));
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t P = cache ? cache->length() : 0, S = P + T;
  if (cache && !cache->keys.empty() && static_cast<int64_t>(cache->keys.size()) != config.num_hidden_layers)
    throw std::invalid_argument("Qwen2: KV cache has " + std::to_string(cache->keys.size()) + " layers, model " +
                                std::to_string(config.num_hidden_layers));
  if (attention_mask.defined() && attention_mask.sizes() != torch::IntArrayRef{B, S})
    throw std::invalid_argument("Qwen2: attention_mask must be [B, cached + new tokens] = [" + std::to_string(B) +
                                ", " + std::to_string(S) + "], got " + shape_str(attention_mask.sizes()));
  if (position_ids.defined() && position_ids.sizes() != input_ids.sizes())
    throw std::invalid_argument("Qwen2: position_ids must be shaped like input_ids " + shape_str(input_ids.sizes()) +
                                ", got " + shape_str(position_ids.sizes()));
  const auto device = input_ids.device();

  torch::Tensor pos = position_ids;  // [B, T]
  if (!pos.defined()) {
    pos = attention_mask.defined()
              ? (attention_mask.to(torch::kInt64).cumsum(-1) - 1).clamp_min(0).slice(1, P, S)
              : torch::arange(P, S, torch::TensorOptions(torch::kInt64).device(device)).unsqueeze(0).expand({B, T});
  }
  AttentionInputs in;
  // Angles in fp32 even for bf16 models: positions in the thousands times inv_freq need the mantissa.
  auto angles = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq.to(device);  // [B, T, D/2]
  auto table = torch::cat({angles, angles}, -1);                                // [B, T, D]
  const auto dtype = embed_tokens->weight.scalar_type();
  in.cos = table.cos().to(dtype);
  in.sin = table.sin().to(dtype);
  // Query t (absolute P + t) may see key s iff s <= P + t, and key s is not padding.
  auto opts = torch::TensorOptions(torch::kInt64).device(device);
  in.blocked = (torch::arange(S, opts).unsqueeze(0) > torch::arange(P, S, opts).unsqueeze(1)).unsqueeze(0);  // [1, T, S]
  if (attention_mask.defined()) {
    in.blocked = in.blocked.logical_or((attention_mask == 0).unsqueeze(1));  // [B, T, S]
    in.token_mask = attention_mask.slice(1, P, S) != 0;                       // [B, T]
  }

  if (cache && cache->keys.empty()) {
    cache->keys.resize(config.num_hidden_layers);
    cache->values.resize(config.num_hidden_layers);
  }
  auto h = embed_tokens(input_ids);  // [B, T, H]
  for (int64_t i = 0; i < config.num_hidden_layers; ++i)
    h = layer(i).forward(h, in, cache ? &cache->keys[i] : nullptr, cache ? &cache->values[i] : nullptr);
  router_aux_loss = config.num_experts > 0 ? moe_router_aux_loss(*this) : torch::Tensor();
  return norm(h);
}

Qwen2ForCausalLMImpl::Qwen2ForCausalLMImpl(const Qwen2Config& c, torch::Dtype dtype) {
  model = register_module("model", Qwen2Model(c, dtype));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", Qwen2Linear(c.hidden_size, c.vocab_size, false, c.initializer_range, dtype));
}

torch::Tensor Qwen2ForCausalLMImpl::forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                            const torch::Tensor& position_ids, KVCache* cache, int64_t logits_to_keep) {
  auto h = model->forward(input_ids, attention_mask, position_ids, cache);  // [B, T, H]
  if (logits_to_keep > 0 && logits_to_keep < h.size(1)) h = h.slice(1, h.size(1) - logits_to_keep);
  return head(h);  // [B, T or kept, V]
}

torch::Tensor Qwen2ForCausalLMImpl::head(const torch::Tensor& hidden) {
  return lm_head ? lm_head(hidden) : project(hidden, model->embed_tokens->weight, {});  // [..., V]
}

// At most `limit` names, then how many more: errors on a 300-tensor checkpoint stay readable.
static std::string name_list(const std::vector<std::string>& names, size_t limit = 8) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < limit; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > limit) out += ", ... (" + std::to_string(names.size() - limit) + " more)";
  return out;
}

LoadReport load_state_dict(Qwen2ForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors,
                           bool strict) {
  auto params = model->named_parameters();
  LoadReport report;
  std::vector<std::string> bad;  // shape or dtype problems: fatal even when not strict
  for (const auto& p : params) {
    auto it = tensors.find(p.key());
    if (it == tensors.end()) {
      report.missing.push_back(p.key());
      continue;
    }
    const auto& t = it->second;
    if (!t.defined() || !t.is_floating_point())
      bad.push_back(p.key() + " has dtype " + (t.defined() ? std::string(c10::toString(t.scalar_type())) : "undefined") +
                    ", expected a floating dtype");
    else if (t.sizes() != p.value().sizes())
      bad.push_back(p.key() + " expected shape " + shape_str(p.value().sizes()) + ", got " + shape_str(t.sizes()));
  }
  for (const auto& [name, t] : tensors)
    if (!params.contains(name) && !(name == "lm_head.weight" && model->config().tie_word_embeddings))
      report.unexpected.push_back(name);

  std::string error;
  if (!bad.empty()) error += "; " + std::to_string(bad.size()) + " mismatched: " + name_list(bad);
  if (strict && !report.missing.empty())
    error += "; " + std::to_string(report.missing.size()) + " missing: " + name_list(report.missing);
  if (strict && !report.unexpected.empty())
    error += "; " + std::to_string(report.unexpected.size()) + " unexpected: " + name_list(report.unexpected);
  if (!error.empty()) throw std::runtime_error("Qwen2 load_state_dict: nothing loaded" + error);

  torch::NoGradGuard no_grad;
  for (auto& p : params) {
    auto it = tensors.find(p.key());
    if (it != tensors.end()) p.value().copy_(it->second);
  }
  return report;
}

std::map<std::string, torch::Tensor> state_dict(const Qwen2ForCausalLM& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters()) out.emplace(p.key(), p.value().detach());
  return out;
}

}  // namespace fedmoe::model
