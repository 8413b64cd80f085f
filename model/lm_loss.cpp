#include "model/lm_loss.hpp"

#include <stdexcept>

#include <torch/torch.h>

#include "model/data.hpp"

namespace fedmoe::model {

namespace {

// Cross-entropy whose backward was already computed in forward (see model/lm_loss.hpp).
struct SoftmaxCrossEntropyFn : torch::autograd::Function<SoftmaxCrossEntropyFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& targets) {
    const int64_t n = logits.size(0);
    auto x = logits.to(torch::kFloat32);
    auto p = torch::softmax(x, 1);  // [N, V] fp32; becomes d loss / d logits in place below
    auto rows = torch::arange(n, targets.options());  // [N]
    auto p_target = p.index({rows, targets});  // [N]
    auto nll = -p_target.log();  // [N]
    // log(p) loses nothing while p is a normal float; where it underflowed (a logit gap past ~87),
    // take log-sum-exp - logit on just those rows.
    auto under = p_target < 1e-30;
    if (under.any().item<bool>()) {
      auto idx = under.nonzero().reshape({-1});  // [U]
      auto xs = x.index_select(0, idx);  // [U, V]
      auto exact = torch::logsumexp(xs, 1) - xs.gather(1, targets.index_select(0, idx).unsqueeze(1)).squeeze(1);
      nll.index_put_({idx}, exact);
    }
    p.index_put_({rows, targets}, p_target - 1);
    p.div_(static_cast<double>(n));
    ctx->save_for_backward({p});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    return nll.mean();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto p = ctx->get_saved_variables()[0];
    const auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    const auto& g = grads[0];
    // The common case (loss.backward() with no scaling) needs no [N, V] multiply at all.
    auto grad = g.numel() == 1 && g.item<double>() == 1.0 ? p : p * g;
    return {grad.to(dtype), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor softmax_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets) {
  if (logits.dim() != 2 || targets.dim() != 1 || targets.size(0) != logits.size(0))
    throw std::invalid_argument("softmax_cross_entropy: expected logits [N, V] and targets [N]");
  if (logits.size(0) == 0) return (logits.sum() * 0).to(torch::kFloat32);
  return SoftmaxCrossEntropyFn::apply(logits, targets);
}

torch::Tensor causal_lm_loss(Qwen2ForCausalLM& model, const torch::Tensor& input_ids, const torch::Tensor& labels,
                             const torch::Tensor& attention_mask) {
  auto h = model->model->forward(input_ids, attention_mask);  // [B, T, H]
  auto flat_labels = labels.reshape({-1}).to(h.device(), torch::kInt64);  // [B*T]
  auto scored = (flat_labels != kIgnoreLabel).nonzero().reshape({-1});  // [N] positions with a label
  auto hs = h.reshape({-1, h.size(-1)}).index_select(0, scored);  // [N, H]
  auto logits = model->head(hs);  // [N, V]
  auto loss = softmax_cross_entropy(logits, flat_labels.index_select(0, scored));
  if (auto aux = model->aux_loss(); aux.defined()) loss = loss + aux;
  return loss;
}

}  // namespace fedmoe::model
