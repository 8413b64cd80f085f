// Tests of model/lm_loss: the softmax cross-entropy whose gradient is made in forward, and the causal
// LM loss that sends only labelled positions through the LM head, against LibTorch's cross_entropy
// on the full logits (values and gradients, ignored labels, bf16, scaled and accumulated gradients,
// underflowing probabilities, MoE aux loss).
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include "model/data.hpp"
#include "model/lm_loss.hpp"
#include "model/lora.hpp"
#include "model/qwen2.hpp"
#include "model_test_util.hpp"

using namespace fedmoe::model;
using namespace fedmoe::test;
namespace F = torch::nn::functional;

namespace {

torch::Tensor reference_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  return F::cross_entropy(logits.reshape({-1, logits.size(-1)}).to(torch::kFloat32), labels.reshape({-1}),
                          F::CrossEntropyFuncOptions().ignore_index(kIgnoreLabel));
}

}  // namespace

TEST_CASE("softmax_cross_entropy equals cross_entropy: values and gradients", "[lm_loss]") {
  torch::manual_seed(1);
  auto logits = (3 * torch::randn({37, 1000})).requires_grad_(true);  // [37, 1000]
  auto targets = torch::randint(1000, {37}, torch::kInt64);           // [37]
  auto ours = softmax_cross_entropy(logits, targets);
  ours.backward();
  auto our_grad = logits.grad().clone();
  logits.mutable_grad().zero_();
  auto ref = F::cross_entropy(logits, targets);
  ref.backward();
  CHECK(std::abs(ours.item<double>() - ref.item<double>()) < 1e-5);
  CHECK(max_diff(our_grad, logits.grad()) < 1e-7);
  CHECK(logits.grad().abs().max().item<double>() > 1e-3);

  SECTION("a scaled loss scales the gradient, and gradients accumulate") {
    logits.mutable_grad().zero_();
    (softmax_cross_entropy(logits, targets) * 0.25).backward();
    (softmax_cross_entropy(logits, targets) * 0.75).backward();
    CHECK(max_diff(logits.grad(), our_grad) < 1e-7);
  }
  SECTION("probabilities that underflow still give the exact loss") {
    auto far = torch::zeros({2, 50});
    far.index_put_({0, 3}, 200.0);  // target 7 of row 0 sits 200 below the max: p underflows to 0
    far.index_put_({1, 7}, 5.0);
    far.requires_grad_(true);
    auto t = torch::tensor({7, 7}, torch::kInt64);
    auto l = softmax_cross_entropy(far, t);
    auto r = F::cross_entropy(far, t);
    CHECK(std::isfinite(l.item<double>()));
    CHECK(std::abs(l.item<double>() - r.item<double>()) < 1e-4);
  }
  SECTION("bf16 logits get a bf16 gradient computed in fp32") {
    auto lb = logits.detach().to(torch::kBFloat16).requires_grad_(true);
    auto l = softmax_cross_entropy(lb, targets);
    l.backward();
    CHECK(lb.grad().scalar_type() == torch::kBFloat16);
    CHECK(std::abs(l.item<double>() - ref.item<double>()) < 0.05);
  }
  SECTION("shapes are checked") {
    CHECK_THROWS_AS(softmax_cross_entropy(logits, targets.slice(0, 0, 5)), std::invalid_argument);
    CHECK(softmax_cross_entropy(torch::zeros({0, 10}), torch::zeros({0}, torch::kInt64)).item<double>() == 0.0);
  }
}

TEST_CASE("causal_lm_loss equals cross_entropy over the full logits, LoRA gradients too", "[lm_loss]") {
  for (bool moe : {false, true}) {
    INFO((moe ? "Qwen2-MoE" : "dense"));
    auto cfg = qwen2_preset("tiny");
    if (moe) cfg.num_experts = 4, cfg.num_experts_per_tok = 2, cfg.moe_intermediate_size = 32, cfg.router_aux_loss_coef = 0.01;
    auto model = make_model(cfg, 21);
    LoraExperts experts(model);
    LoraSpec spec;
    spec.rank = 4, spec.alpha = 8, spec.target_modules = {"q_proj", "v_proj", "o_proj"};
    experts.attach("e", spec, LoraInit::random, 22);
    experts.activate("e");

    auto ids = random_ids(cfg, 3, 10, 23);  // [3, 10]
    auto labels = random_ids(cfg, 3, 10, 24);
    labels.index_put_({0, torch::indexing::Slice(0, 4)}, kIgnoreLabel);  // an SFT prompt
    labels.index_put_({2, torch::indexing::Slice(7, 10)}, kIgnoreLabel);  // padding

    auto ours = causal_lm_loss(model, ids, labels);
    ours.backward();
    std::map<std::string, torch::Tensor> our_grads;
    for (auto& [name, p] : experts.named_parameters("e")) our_grads[name] = p.grad().clone(), p.mutable_grad().zero_();

    auto ref = reference_loss(model->forward(ids), labels);
    if (moe) {
      REQUIRE(model->aux_loss().defined());
      ref = ref + model->aux_loss();
    }
    ref.backward();
    CHECK(std::abs(ours.item<double>() - ref.item<double>()) < 1e-5);
    double worst = 0;
    for (auto& [name, p] : experts.named_parameters("e")) worst = std::max(worst, max_diff(our_grads.at(name), p.grad()));
    CHECK(worst < 1e-6);
    CHECK(our_grads.begin()->second.abs().max().item<double>() > 1e-4);
  }
}
