// The Qwen2-MoE sparse feed-forward block (Hugging Face's Qwen2MoeSparseMoeBlock), used by the
// decoder (model/qwen2.hpp) in place of the dense MLP on the layers where
// Qwen2Config::is_moe_layer(i) holds. Parameter names are HF's, under `model.layers.{i}.`:
//   mlp.gate.weight                               [E, H]   router, no bias
//   mlp.experts.{j}.{gate,up}_proj.weight         [Im, H]  routed SwiGLU experts, j < E
//   mlp.experts.{j}.down_proj.weight              [H, Im]
//   mlp.shared_expert.{gate,up}_proj.weight       [Is, H]  only when shared_expert_intermediate_size > 0
//   mlp.shared_expert.down_proj.weight            [H, Is]
//   mlp.shared_expert_gate.weight                 [1, H]   sigmoid gate on the shared expert's output
// (E num_experts, k num_experts_per_tok, Im moe_intermediate_size, Is shared_expert_intermediate_size.)
//
// Routing (as HF): p = softmax(gate(x)) in fp32; the k largest p per token are its experts, their
// p (divided by their sum when norm_topk_prob) cast to the model dtype are the combine weights;
// y = sum_k w_k expert_k(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x).
//
// Load-balancing loss (HF's load_balancing_loss_func over all MoE layers of one forward, the
// router logits of the layers concatenated): E * sum_j f_j * P_j, where over the real tokens of all
// MoE layers together f_j = (top-k assignments to expert j) / tokens (so sum_j f_j = k) and
// P_j = mean router probability of expert j. Padding (attention_mask 0) is left out.
// After every forward, Qwen2ModelImpl::router_aux_loss (also Qwen2ForCausalLMImpl::aux_loss())
// holds router_aux_loss_coef times that loss as a differentiable fp32 scalar (undefined for a model
// without MoE layers): training adds it to the LM loss, `loss = lm_loss + model->aux_loss()`, before
// backward(). It describes only the latest forward call (not accumulated across calls).
//
// Utilization: each block counts, per expert, the top-k assignments of real tokens across forward
// calls until reset (moe_utilization / reset_moe_utilization for a whole model).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "model/qwen2.hpp"

namespace fedmoe::model {

// The router's decisions for N tokens.
struct MoeRouting {
  torch::Tensor logits;   // [N, E] model dtype: gate(x)
  torch::Tensor probs;    // [N, E] fp32 softmax of the logits
  torch::Tensor weights;  // [N, k] model dtype: combine weights of the chosen experts
  torch::Tensor experts;  // [N, k] int64: chosen experts, most probable first
};

// One block's router statistics over the real tokens of one forward call.
struct MoeRouterStats {
  torch::Tensor prob_sum;  // [E] fp32, sum of router probabilities (differentiable when grad is on)
  torch::Tensor counts;    // [E] int64, top-k assignments per expert
  torch::Tensor tokens;    // 0-dim int64, real tokens
};

class Qwen2MoeSparseBlockImpl : public torch::nn::Module {
 public:
  // Requires config.num_experts > 0 (validate()'s MoE checks).
  Qwen2MoeSparseBlockImpl(const Qwen2Config& config, torch::Dtype dtype);

  // x [B, T, H] (or [N, H]) -> same shape. token_mask: optional [B, T] (or [N]) nonzero = real
  // token; padding is still computed (as HF) but left out of the statistics. Every call replaces
  // last_stats and adds to expert_counts. forward() runs forward_grouped(), or forward_dense_loop()
  // while use_dense_loop is set.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& token_mask = {});

  // Tokens grouped by expert: the N*k (token, expert) pairs are sorted by expert, each expert runs
  // once on its contiguous batch of gathered tokens, and the weighted outputs are scattered back with
  // one index_add. Experts no token chose are skipped. One host sync (the per-expert counts).
  torch::Tensor forward_grouped(const torch::Tensor& x, const torch::Tensor& token_mask = {});

  // Reference: every expert on every token, multiplied by its (mostly zero) combine weight. E times
  // the expert FLOPs of forward_grouped; same values and gradients up to summation order. For tests
  // and benchmarks.
  torch::Tensor forward_dense_loop(const torch::Tensor& x, const torch::Tensor& token_mask = {});

  // x2d [N, H] -> the router's decisions (no statistics).
  MoeRouting route(const torch::Tensor& x2d);

  // router_aux_loss_coef * E * sum_j f_j P_j over last_stats alone (this block, latest call);
  // undefined before the first forward.
  torch::Tensor aux_loss() const;

  std::vector<int64_t> utilization() const;  // expert_counts as host integers ([E] zeros when none)
  void reset_utilization();

  int64_t num_experts, top_k;
  bool norm_topk_prob;
  double router_aux_loss_coef;
  bool use_dense_loop = false;

  Qwen2Linear gate{nullptr};                 // [E, H] router
  torch::nn::ModuleList experts{nullptr};    // E Qwen2MLP of moe_intermediate_size, named "0", "1", ...
  Qwen2MLP shared_expert{nullptr};           // null when shared_expert_intermediate_size == 0
  Qwen2Linear shared_expert_gate{nullptr};   // [1, H]; null with shared_expert

  MoeRouterStats last_stats;   // the latest forward call's statistics (undefined tensors before)
  torch::Tensor expert_counts; // [E] int64, assignments since construction or reset_utilization()

 private:
  torch::Tensor run(const torch::Tensor& x, const torch::Tensor& token_mask, bool dense);
  void record(const MoeRouting& r, const torch::Tensor& token_mask);
};
TORCH_MODULE(Qwen2MoeSparseBlock);

// HF's load_balancing_loss_func (without the coefficient) from the statistics of the MoE layers of
// one forward call: E * sum_j (sum_l counts_l[j] / T) * (sum_l prob_sum_l[j] / T), T = sum_l tokens_l.
// Zero when there are no tokens. `stats` must be non-empty.
torch::Tensor load_balancing_loss(const std::vector<MoeRouterStats>& stats, int64_t num_experts);

// router_aux_loss_coef * load_balancing_loss over the model's MoE layers' last_stats; undefined when
// the model has no MoE layer or none has run. Qwen2ModelImpl::forward stores it in router_aux_loss.
torch::Tensor moe_router_aux_loss(const Qwen2ModelImpl& model);

// The sparse block of layer i, or nullptr for a dense layer.
Qwen2MoeSparseBlockImpl* moe_block(const Qwen2ModelImpl& model, int64_t layer);

// Per MoE layer (in layer order): the tokens routed to each expert since the last reset.
struct MoeLayerUtilization {
  int64_t layer;
  std::vector<int64_t> tokens_per_expert;  // [E]; sums to real tokens seen * k
};
std::vector<MoeLayerUtilization> moe_utilization(const Qwen2ForCausalLM& model);
void reset_moe_utilization(Qwen2ForCausalLM& model);

// Switches every MoE layer of the model between forward_grouped (false, the default) and
// forward_dense_loop (true).
void set_moe_dense_loop(Qwen2ForCausalLM& model, bool dense);

}  // namespace fedmoe::model
