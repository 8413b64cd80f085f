// The training loss of a causal LM: next-token cross-entropy over the labelled positions (labels as
// model/data.hpp packs them: labels[t] is the token after inputs[0..t], kIgnoreLabel elsewhere),
// plus the MoE router's load-balancing loss on Qwen2-MoE models.
//
// Why not torch::nn::functional::cross_entropy(model->forward(ids)): with Qwen's 151936-token
// vocabulary the [tokens, V] logits dominate a small model's training step, and on a CPU that step
// is bound by memory bandwidth, not FLOPs. cross_entropy makes five passes over [tokens, V]
// (log_softmax; in backward a dense zero-filled nll gradient, then log_softmax's backward with a
// second exp). Here:
//   - only positions with a label go through the LM head (prompt tokens of SFT data cost nothing);
//   - softmax runs once, and its output is turned into the gradient in place during the forward
//     pass (softmax - onehot) / n, so backward is a single multiply (none at all when the incoming
//     gradient is 1, as in an optimizer step without accumulation).
// Values and gradients equal cross_entropy's to fp32 rounding (tests/test_lm_loss.cpp).
#pragma once

#include <torch/types.h>

#include "model/qwen2.hpp"

namespace fedmoe::model {

// Mean of -log softmax(logits)[target] over rows. logits [N, V] (any floating dtype; computed in
// fp32), targets [N] int64 in [0, V). Differentiable in logits. N = 0 gives 0.
torch::Tensor softmax_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets);

// input_ids [B, T], labels [B, T] (kIgnoreLabel = not scored), attention_mask optional [B, T].
// Returns the mean next-token loss over labelled positions, plus model.aux_loss() when defined.
torch::Tensor causal_lm_loss(Qwen2ForCausalLM& model, const torch::Tensor& input_ids, const torch::Tensor& labels,
                             const torch::Tensor& attention_mask = {});

}  // namespace fedmoe::model
