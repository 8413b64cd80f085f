#include "model/moe.hpp"

#include <stdexcept>
#include <string>

#include <torch/torch.h>

namespace fedmoe::model {

namespace {

// The config with intermediate_size replaced: Qwen2MLP then builds an expert of that width.
Qwen2Config with_width(const Qwen2Config& c, int64_t intermediate) {
  Qwen2Config out = c;
  out.intermediate_size = intermediate;
  return out;
}

}  // namespace

Qwen2MoeSparseBlockImpl::Qwen2MoeSparseBlockImpl(const Qwen2Config& c, torch::Dtype dtype)
    : num_experts(c.num_experts),
      top_k(c.num_experts_per_tok),
      norm_topk_prob(c.norm_topk_prob),
      router_aux_loss_coef(c.router_aux_loss_coef) {
  if (num_experts <= 0 || top_k < 1 || top_k > num_experts || c.moe_intermediate_size <= 0)
    throw std::invalid_argument("Qwen2MoeSparseBlock: needs num_experts > 0, 1 <= num_experts_per_tok <= "
                                "num_experts and moe_intermediate_size > 0 (got " + std::to_string(num_experts) +
                                ", " + std::to_string(top_k) + ", " + std::to_string(c.moe_intermediate_size) + ")");
  const double init = c.initializer_range;
  // Registration order is HF's module order: gate, experts, shared_expert, shared_expert_gate.
  gate = register_module("gate", Qwen2Linear(c.hidden_size, num_experts, false, init, dtype));
  experts = register_module("experts", torch::nn::ModuleList());
  const auto expert_cfg = with_width(c, c.moe_intermediate_size);
  for (int64_t j = 0; j < num_experts; ++j) experts->push_back(Qwen2MLP(expert_cfg, dtype));
  if (c.shared_expert_intermediate_size > 0) {
    shared_expert = register_module("shared_expert", Qwen2MLP(with_width(c, c.shared_expert_intermediate_size), dtype));
    shared_expert_gate = register_module("shared_expert_gate", Qwen2Linear(c.hidden_size, 1, false, init, dtype));
  }
}

MoeRouting Qwen2MoeSparseBlockImpl::route(const torch::Tensor& x2d) {
  MoeRouting r;
  r.logits = gate(x2d);                                            // [N, E]
  r.probs = torch::softmax(r.logits, -1, torch::kFloat32);         // [N, E] fp32
  auto [w, idx] = r.probs.topk(top_k, -1, /*largest=*/true, /*sorted=*/true);  // [N, k]
  if (norm_topk_prob) w = w / w.sum(-1, /*keepdim=*/true);
  r.weights = w.to(x2d.scalar_type());
  r.experts = idx;
  return r;
}

void Qwen2MoeSparseBlockImpl::record(const MoeRouting& r, const torch::Tensor& token_mask) {
  const int64_t N = r.probs.size(0);
  auto flat = r.experts.reshape({-1});  // [N*k]
  MoeRouterStats s;
  if (token_mask.defined()) {
    if (token_mask.numel() != N)
      throw std::invalid_argument("Qwen2MoeSparseBlock: token_mask has " + std::to_string(token_mask.numel()) +
                                  " entries for " + std::to_string(N) + " tokens");
    auto real = token_mask.reshape({-1}).to(r.probs.device()).ne(0);  // [N] bool
    s.prob_sum = (r.probs * real.unsqueeze(1).to(torch::kFloat32)).sum(0);  // [E]
    auto per_pair = real.unsqueeze(1).expand({N, top_k}).reshape({-1}).to(torch::kInt64);  // [N*k]
    s.counts = torch::zeros({num_experts}, flat.options()).index_add_(0, flat, per_pair);
    s.tokens = real.sum().to(torch::kInt64);
  } else {
    s.prob_sum = r.probs.sum(0);
    s.counts = torch::bincount(flat, {}, num_experts).to(torch::kInt64);
    s.tokens = torch::tensor(N, flat.options());
  }
  {
    torch::NoGradGuard no_grad;
    if (!expert_counts.defined() || expert_counts.device() != s.counts.device())
      expert_counts = expert_counts.defined() ? expert_counts.to(s.counts.device())
                                              : torch::zeros({num_experts}, s.counts.options());
    expert_counts.add_(s.counts);
  }
  last_stats = std::move(s);
}

torch::Tensor Qwen2MoeSparseBlockImpl::run(const torch::Tensor& x, const torch::Tensor& token_mask, bool dense) {
  const int64_t H = x.size(-1);
  auto x2 = x.reshape({-1, H});  // [N, H]
  auto r = route(x2);
  record(r, token_mask);

  torch::Tensor out;  // [N, H]
  if (dense) {
    out = torch::zeros_like(x2);
    for (int64_t j = 0; j < num_experts; ++j) {
      auto w = (r.weights * r.experts.eq(j).to(r.weights.scalar_type())).sum(-1, /*keepdim=*/true);  // [N, 1]
      out = out + experts->ptr<Qwen2MLPImpl>(j)->forward(x2) * w;
    }
  } else {
    // Pair p = n * k + slot. Sorting the pairs by expert (stable: tokens stay in order within an
    // expert) makes each expert's tokens one contiguous slice of the gathered input.
    auto flat = r.experts.reshape({-1});                                          // [N*k]
    auto order = std::get<1>(torch::sort(flat, /*stable=*/true, 0, /*descending=*/false));  // [N*k]
    auto token_of = order.div(top_k, "floor");                                    // [N*k] token index
    auto w_sorted = r.weights.reshape({-1}).index_select(0, order).unsqueeze(1);  // [N*k, 1]
    auto xs = x2.index_select(0, token_of);                                       // [N*k, H]
    auto counts = torch::bincount(flat, {}, num_experts).to(torch::kCPU).to(torch::kInt64);  // the host sync
    const int64_t* c = counts.data_ptr<int64_t>();
    std::vector<torch::Tensor> ys;
    int64_t offset = 0;
    for (int64_t j = 0; j < num_experts; ++j) {
      if (c[j] == 0) continue;
      ys.push_back(experts->ptr<Qwen2MLPImpl>(j)->forward(xs.narrow(0, offset, c[j])));  // [c_j, H]
      offset += c[j];
    }
    auto y = torch::cat(ys, 0) * w_sorted;  // [N*k, H], expert order
    out = torch::zeros_like(x2).index_add(0, token_of, y);
  }
  if (shared_expert) out = out + torch::sigmoid(shared_expert_gate(x2)) * shared_expert->forward(x2);
  return out.view(x.sizes());
}

torch::Tensor Qwen2MoeSparseBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& token_mask) {
  return run(x, token_mask, use_dense_loop);
}

torch::Tensor Qwen2MoeSparseBlockImpl::forward_grouped(const torch::Tensor& x, const torch::Tensor& token_mask) {
  return run(x, token_mask, false);
}

torch::Tensor Qwen2MoeSparseBlockImpl::forward_dense_loop(const torch::Tensor& x, const torch::Tensor& token_mask) {
  return run(x, token_mask, true);
}

torch::Tensor Qwen2MoeSparseBlockImpl::aux_loss() const {
  if (!last_stats.prob_sum.defined()) return {};
  return router_aux_loss_coef * load_balancing_loss({last_stats}, num_experts);
}

std::vector<int64_t> Qwen2MoeSparseBlockImpl::utilization() const {
  std::vector<int64_t> out(static_cast<size_t>(num_experts), 0);
  if (!expert_counts.defined()) return out;
  auto host = expert_counts.to(torch::kCPU).contiguous();
  std::copy(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + num_experts, out.begin());
  return out;
}

void Qwen2MoeSparseBlockImpl::reset_utilization() { expert_counts = torch::Tensor(); }

torch::Tensor load_balancing_loss(const std::vector<MoeRouterStats>& stats, int64_t num_experts) {
  if (stats.empty()) throw std::invalid_argument("load_balancing_loss: no router statistics");
  auto counts = stats[0].counts.to(torch::kFloat32);
  auto probs = stats[0].prob_sum;
  auto tokens = stats[0].tokens;
  for (size_t i = 1; i < stats.size(); ++i) {
    counts = counts + stats[i].counts.to(torch::kFloat32);
    probs = probs + stats[i].prob_sum;
    tokens = tokens + stats[i].tokens;
  }
  auto t = tokens.to(torch::kFloat32).clamp_min(1);  // no tokens: f = P = 0, loss 0
  return static_cast<double>(num_experts) * ((counts / t) * (probs / t)).sum();
}

Qwen2MoeSparseBlockImpl* moe_block(const Qwen2ModelImpl& model, int64_t layer) {
  return model.layer(layer).moe.get();
}

torch::Tensor moe_router_aux_loss(const Qwen2ModelImpl& model) {
  std::vector<MoeRouterStats> stats;
  double coef = 0;
  for (int64_t i = 0; i < model.config.num_hidden_layers; ++i)
    if (auto* b = moe_block(model, i); b && b->last_stats.prob_sum.defined()) {
      stats.push_back(b->last_stats);
      coef = b->router_aux_loss_coef;
    }
  if (stats.empty()) return {};
  return coef * load_balancing_loss(stats, model.config.num_experts);
}

std::vector<MoeLayerUtilization> moe_utilization(const Qwen2ForCausalLM& model) {
  std::vector<MoeLayerUtilization> out;
  for (int64_t i = 0; i < model->config().num_hidden_layers; ++i)
    if (auto* b = moe_block(*model->model, i)) out.push_back({i, b->utilization()});
  return out;
}

void reset_moe_utilization(Qwen2ForCausalLM& model) {
  for (int64_t i = 0; i < model->config().num_hidden_layers; ++i)
    if (auto* b = moe_block(*model->model, i)) b->reset_utilization();
}

void set_moe_dense_loop(Qwen2ForCausalLM& model, bool dense) {
  for (int64_t i = 0; i < model->config().num_hidden_layers; ++i)
    if (auto* b = moe_block(*model->model, i)) b->use_dense_loop = dense;
}

}  // namespace fedmoe::model
