// Tests of model/moe (the Qwen2-MoE sparse feed-forward) and the MoE fields of Qwen2Config:
// config.json parsing, HF parameter names, grouped dispatch against the per-expert dense loop
// (values and gradients), routing and norm_topk_prob against a per-token hand computation, the
// load-balancing loss on a hand-computed example, utilization counts, mixed dense/MoE models through
// state dicts and save_pretrained, KV-cache decoding, and parity with an independent PyTorch
// Qwen2-MoE (tests/reference/moe_reference.py, run with Debian's /usr/bin/python3).
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/moe.hpp"
#include "model/qwen2.hpp"
#include "model_test_util.hpp"

using namespace fedmoe::model;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

using namespace fedmoe::test;

// 3 layers, layer 1 dense (mlp_only_layers); 4 experts, top-2, shared expert, renormalized top-k.
Qwen2Config moe_tiny_config() {
  auto c = qwen2_preset("tiny");
  c.name = "tiny-moe";
  c.num_hidden_layers = 3;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 32;
  c.shared_expert_intermediate_size = 48;
  c.norm_topk_prob = true;
  c.router_aux_loss_coef = 0.01;
  c.mlp_only_layers = {1};
  return c;
}

// 4 layers, MoE on layers 1 and 3 (decoder_sparse_step 2); 6 experts, top-3, no shared expert, raw
// top-k probabilities; untied, head_dim 24 on one kv head.
Qwen2Config moe_step_config() {
  auto c = qwen2_preset("tiny");
  c.name = "tiny-moe-step";
  c.num_hidden_layers = 4;
  c.tie_word_embeddings = false;
  c.head_dim = 24;
  c.num_key_value_heads = 1;
  c.num_experts = 6;
  c.num_experts_per_tok = 3;
  c.moe_intermediate_size = 16;
  c.shared_expert_intermediate_size = 0;
  c.norm_topk_prob = false;
  c.decoder_sparse_step = 2;
  return c;
}

// A standalone block with O(1) weights.
Qwen2MoeSparseBlock moe_make_block(const Qwen2Config& cfg, uint64_t seed) {
  Qwen2MoeSparseBlock block(cfg, torch::kFloat32);
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& p : block->parameters()) p.copy_(torch::randn(p.sizes()) / std::sqrt(static_cast<double>(p.size(1))));
  return block;
}

// Gradients of every parameter (undefined grads as zeros) and of the input, after one backward.
TensorMap moe_grads(Qwen2MoeSparseBlock& block, const torch::Tensor& x) {
  TensorMap out;
  for (const auto& p : block->named_parameters())
    out.emplace(p.key(), p.value().grad().defined() ? p.value().grad().clone() : torch::zeros_like(p.value()));
  out.emplace("input", x.grad().clone());
  return out;
}

}  // namespace

TEST_CASE("MoE config.json: qwen2_moe fields, HF defaults, layer rule, errors, round trip", "[moe][config]") {
  // Qwen1.5-MoE-A2.7B's config.json (published values).
  const std::string a27b = R"({
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
    "norm_topk_prob": false, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": false,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})";
  auto c = qwen2_config_from_json(a27b, "a2.7b/config.json");
  CHECK(c.num_experts == 60);
  CHECK(c.num_experts_per_tok == 4);
  CHECK(c.moe_intermediate_size == 1408);
  CHECK(c.shared_expert_intermediate_size == 5632);
  CHECK_FALSE(c.norm_topk_prob);
  CHECK(c.router_aux_loss_coef == 0.001);
  CHECK(c.decoder_sparse_step == 1);
  CHECK(c.mlp_only_layers.empty());
  CHECK(c.intermediate_size == 5632);
  for (int64_t i : {0, 7, 23}) CHECK(c.is_moe_layer(i));

  SECTION("defaults, decoder_sparse_step and mlp_only_layers") {
    auto d = qwen2_config_from_json(
        R"({"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "vocab_size": 512, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 0, "decoder_sparse_step": 2,
            "mlp_only_layers": [3], "norm_topk_prob": true})",
        "d.json");
    CHECK(d.norm_topk_prob);
    CHECK(d.router_aux_loss_coef == 0.001);
    CHECK(d.mlp_only_layers == std::vector<int64_t>{3});
    // HF: MoE iff not mlp-only and (i + 1) % step == 0 -> layers 1 and 5 (3 is mlp-only).
    std::vector<int64_t> sparse;
    for (int64_t i = 0; i < 6; ++i)
      if (d.is_moe_layer(i)) sparse.push_back(i);
    CHECK(sparse == std::vector<int64_t>{1, 5});
    // Dense configs have no MoE layer.
    CHECK_FALSE(qwen2_preset("tiny").is_moe_layer(0));
  }
  SECTION("errors name the file and the field") {
    const std::string base = R"("hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": 512)";
    CHECK_THAT(error_of([&] { qwen2_config_from_json(R"({"model_type": "qwen2_moe", )" + base + "}", "m.json"); }),
               Contains("m.json") && Contains("'num_experts'") && Contains("missing"));
    CHECK_THAT(error_of([&] {
                 qwen2_config_from_json(R"({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                            "shared_expert_intermediate_size": 0, )" + base + "}",
                                        "m.json");
               }),
               Contains("'moe_intermediate_size'"));
    CHECK_THAT(error_of([&] {
                 qwen2_config_from_json(R"({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 5,
                                            "moe_intermediate_size": 8, "shared_expert_intermediate_size": 0, )" +
                                            base + "}",
                                        "k.json");
               }),
               Contains("k.json") && Contains("num_experts_per_tok"));
    CHECK_THAT(error_of([&] {
                 qwen2_config_from_json(R"({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 8, "shared_expert_intermediate_size": 0,
                                            "mlp_only_layers": [2], )" + base + "}",
                                        "l.json");
               }),
               Contains("mlp_only_layers"));
    CHECK_THAT(error_of([&] {
                 qwen2_config_from_json(R"({"model_type": "qwen2", "num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 8, "shared_expert_intermediate_size": 0, )" +
                                            base + "}",
                                        "q.json");
               }),
               Contains("q.json") && Contains("num_experts") && Contains("qwen2_moe"));
    CHECK_THAT(error_of([&] { qwen2_config_from_json(R"({"model_type": "qwen3_moe"})", "x.json"); }),
               Contains("model_type") && Contains("qwen3_moe"));
    // A dense config with num_experts 0 stays a dense Qwen2.
    auto dense = qwen2_config_from_json(R"({"model_type": "qwen2", "num_experts": 0, )" + base + "}", "z.json");
    CHECK(dense.num_experts == 0);
  }
  SECTION("writer round trip") {
    auto m = moe_step_config();
    m.mlp_only_layers = {1};
    auto json_text = qwen2_config_to_json(m);
    CHECK_THAT(json_text, Contains("\"qwen2_moe\"") && Contains("Qwen2MoeForCausalLM"));
    auto r = qwen2_config_from_json(json_text, "rt.json");
    CHECK(r.num_experts == m.num_experts);
    CHECK(r.num_experts_per_tok == m.num_experts_per_tok);
    CHECK(r.moe_intermediate_size == m.moe_intermediate_size);
    CHECK(r.shared_expert_intermediate_size == m.shared_expert_intermediate_size);
    CHECK(r.norm_topk_prob == m.norm_topk_prob);
    CHECK(r.router_aux_loss_coef == m.router_aux_loss_coef);
    CHECK(r.decoder_sparse_step == m.decoder_sparse_step);
    CHECK(r.mlp_only_layers == m.mlp_only_layers);
    // A dense config still writes a plain qwen2 file.
    CHECK_THAT(qwen2_config_to_json(qwen2_preset("tiny")), !Contains("num_experts") && Contains("\"qwen2\""));
  }
}

TEST_CASE("MoE named_parameters are Hugging Face's names and shapes", "[moe]") {
  auto cfg = moe_tiny_config();
  // Written out from HF's Qwen2MoeForCausalLM, not derived from the C++ modules.
  const int64_t H = 64, D = 16, I = 128, V = 512, E = 4, Im = 32, Is = 48;
  const int64_t q = 4 * D, kv = 2 * D;
  std::map<std::string, std::vector<int64_t>> expected{{"model.embed_tokens.weight", {V, H}}, {"model.norm.weight", {H}}};
  for (int i = 0; i < 3; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    expected[p + "self_attn.q_proj.weight"] = {q, H};
    expected[p + "self_attn.q_proj.bias"] = {q};
    expected[p + "self_attn.k_proj.weight"] = {kv, H};
    expected[p + "self_attn.k_proj.bias"] = {kv};
    expected[p + "self_attn.v_proj.weight"] = {kv, H};
    expected[p + "self_attn.v_proj.bias"] = {kv};
    expected[p + "self_attn.o_proj.weight"] = {H, q};
    expected[p + "input_layernorm.weight"] = {H};
    expected[p + "post_attention_layernorm.weight"] = {H};
    if (i == 1) {  // mlp_only_layers: the dense MLP
      expected[p + "mlp.gate_proj.weight"] = {I, H};
      expected[p + "mlp.up_proj.weight"] = {I, H};
      expected[p + "mlp.down_proj.weight"] = {H, I};
      continue;
    }
    expected[p + "mlp.gate.weight"] = {E, H};
    for (int j = 0; j < E; ++j) {
      std::string e = p + "mlp.experts." + std::to_string(j) + ".";
      expected[e + "gate_proj.weight"] = {Im, H};
      expected[e + "up_proj.weight"] = {Im, H};
      expected[e + "down_proj.weight"] = {H, Im};
    }
    expected[p + "mlp.shared_expert.gate_proj.weight"] = {Is, H};
    expected[p + "mlp.shared_expert.up_proj.weight"] = {Is, H};
    expected[p + "mlp.shared_expert.down_proj.weight"] = {H, Is};
    expected[p + "mlp.shared_expert_gate.weight"] = {1, H};
  }
  Qwen2ForCausalLM model(cfg);
  std::map<std::string, std::vector<int64_t>> actual;
  for (const auto& p : model->named_parameters()) actual[p.key()] = p.value().sizes().vec();
  CHECK(actual == expected);
  CHECK(moe_block(*model->model, 0) != nullptr);
  CHECK(moe_block(*model->model, 1) == nullptr);
  CHECK(model->model->layer(1).mlp);
  CHECK_FALSE(model->model->layer(0).mlp);

  // Without a shared expert there are no shared_expert* parameters.
  Qwen2ForCausalLM step(moe_step_config());
  int64_t sparse_layers = 0;
  for (const auto& p : step->named_parameters()) {
    CHECK(p.key().find("shared_expert") == std::string::npos);
    if (p.key().find("mlp.gate.weight") != std::string::npos) ++sparse_layers;
  }
  CHECK(sparse_layers == 2);
  CHECK(step->named_parameters().contains("model.layers.3.mlp.experts.5.down_proj.weight"));
  CHECK(step->named_parameters().contains("model.layers.2.mlp.gate_proj.weight"));
}

TEST_CASE("MoE grouped dispatch equals the per-expert dense loop: values and gradients", "[moe]") {
  for (bool shared : {true, false}) {
    auto cfg = shared ? moe_tiny_config() : moe_step_config();
    cfg.hidden_size = 64;
    INFO("config " << cfg.name);
    auto block = moe_make_block(cfg, 21);
    torch::manual_seed(22);
    auto x0 = torch::randn({3, 7, 64});
    auto probe = torch::randn({3, 7, 64});  // a random cotangent, so every output element matters
    auto mask = torch::ones({3, 7}, torch::kInt64);
    mask.index_put_({1, torch::indexing::Slice(0, 2)}, 0);

    auto run = [&](bool dense) {
      block->zero_grad();
      auto x = x0.clone().requires_grad_(true);
      auto y = dense ? block->forward_dense_loop(x, mask) : block->forward_grouped(x, mask);
      auto aux = block->aux_loss();
      ((y * probe).sum() + 100 * aux).backward();  // the aux term's gradient reaches the router too
      return std::make_pair(y.detach(), moe_grads(block, x));
    };
    auto [y_grouped, g_grouped] = run(false);
    auto [y_dense, g_dense] = run(true);
    CHECK(y_grouped.abs().max().item<double>() > 0.5);  // O(1) outputs: the tolerance means something
    CHECK(max_diff(y_grouped, y_dense) < 1e-5);
    REQUIRE(g_grouped.size() == g_dense.size());
    double grad_err = 0, gate_grad = 0;
    for (const auto& [name, g] : g_dense) {
      INFO(name);
      grad_err = std::max(grad_err, max_diff(g_grouped.at(name), g));
    }
    gate_grad = g_grouped.at("gate.weight").abs().max().item<double>();
    CHECK(grad_err < 1e-5);
    CHECK(gate_grad > 1e-3);  // the router is trained through the combine weights
    // use_dense_loop switches forward() to the reference path.
    block->use_dense_loop = true;
    CHECK(max_diff(block->forward(x0, mask), y_dense) < 1e-6);
    block->use_dense_loop = false;
    CHECK(max_diff(block->forward(x0, mask), y_grouped) < 1e-6);
  }

  SECTION("an expert no token chooses is never run by the grouped path") {
    auto cfg = moe_tiny_config();
    auto block = moe_make_block(cfg, 23);
    {
      torch::NoGradGuard no_grad;
      // Positive inputs; experts 0-2 have positive router rows, expert 3 a negative one: it is always
      // last, so top-2 never picks it.
      block->gate->weight.abs_();
      block->gate->weight[3].neg_();
    }
    auto x = torch::rand({2, 5, 64}) + 0.1;
    auto y = block->forward_grouped(x);
    y.sum().backward();
    CHECK(block->utilization()[3] == 0);
    for (const auto& p : block->experts[3]->parameters()) CHECK_FALSE(p.grad().defined());
    for (const auto& p : block->experts[0]->parameters()) CHECK(p.grad().defined());
    block->zero_grad();
    block->forward_dense_loop(x).sum().backward();
    for (const auto& p : block->experts[3]->parameters()) CHECK(p.grad().abs().max().item<double>() == 0);
  }
}

TEST_CASE("MoE routing and norm_topk_prob against a per-token hand computation", "[moe]") {
  for (bool norm : {true, false}) {
    auto cfg = moe_tiny_config();
    cfg.norm_topk_prob = norm;
    INFO("norm_topk_prob " << norm);
    auto block = moe_make_block(cfg, 31);
    block->eval();
    torch::NoGradGuard no_grad;
    torch::manual_seed(32);
    auto x = torch::randn({5, 64});
    auto y = block->forward(x);

    auto r = block->route(x);
    auto wsum = r.weights.sum(-1);
    if (norm) CHECK(max_diff(wsum, torch::ones({5})) < 1e-6);
    else CHECK(wsum.max().item<double>() < 0.999);  // raw top-2 of 4 probabilities

    auto gate_w = block->gate->weight;
    for (int64_t n = 0; n < 5; ++n) {
      // Softmax over the router logits and the two largest, computed in double per token.
      std::vector<double> logit(4), prob(4);
      for (int64_t j = 0; j < 4; ++j) logit[j] = torch::dot(gate_w[j], x[n]).item<double>();
      double mx = *std::max_element(logit.begin(), logit.end()), z = 0;
      for (int64_t j = 0; j < 4; ++j) z += std::exp(logit[j] - mx);
      for (int64_t j = 0; j < 4; ++j) prob[j] = std::exp(logit[j] - mx) / z;
      std::vector<int64_t> order{0, 1, 2, 3};
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return prob[a] > prob[b]; });
      double w0 = prob[order[0]], w1 = prob[order[1]];
      if (norm) {
        double s = w0 + w1;
        w0 /= s;
        w1 /= s;
      }
      CHECK(r.experts[n][0].item<int64_t>() == order[0]);
      CHECK(r.experts[n][1].item<int64_t>() == order[1]);
      auto xn = x[n].unsqueeze(0);
      auto shared = torch::sigmoid(block->shared_expert_gate->forward(xn)) * block->shared_expert->forward(xn);
      auto expect = w0 * block->experts[order[0]]->as<Qwen2MLPImpl>()->forward(xn) +
                    w1 * block->experts[order[1]]->as<Qwen2MLPImpl>()->forward(xn) + shared;
      CHECK(max_diff(y[n].unsqueeze(0), expect) < 1e-5);
    }
  }
}

TEST_CASE("MoE load-balancing loss on a hand-computed example - utilization counts", "[moe]") {
  // H = E = 4, router = identity: the logits are the inputs.
  Qwen2Config cfg = qwen2_preset("tiny");
  cfg.hidden_size = 4;
  cfg.num_experts = 4;
  cfg.num_experts_per_tok = 2;
  cfg.moe_intermediate_size = 2;
  cfg.shared_expert_intermediate_size = 0;
  cfg.router_aux_loss_coef = 0.25;
  Qwen2MoeSparseBlock block(cfg, torch::kFloat32);
  {
    torch::NoGradGuard no_grad;
    block->gate->weight.copy_(torch::eye(4));
  }
  const std::vector<std::vector<double>> logits{{2, 1, 0, 0}, {0, 0, 1, 3}, {1, 0, 2, 0}};
  auto x = torch::tensor({2.f, 1.f, 0.f, 0.f, 0.f, 0.f, 1.f, 3.f, 1.f, 0.f, 2.f, 0.f}).view({1, 3, 4});
  auto softmax = [](const std::vector<double>& l) {
    double z = 0;
    for (double v : l) z += std::exp(v);
    std::vector<double> p;
    for (double v : l) p.push_back(std::exp(v) / z);
    return p;
  };
  // Top-2 by hand: token 0 -> {0, 1}, token 1 -> {3, 2}, token 2 -> {2, 0}.
  auto expected_loss = [&](const std::vector<int>& tokens, const std::vector<double>& assignments) {
    std::vector<double> mean_p(4, 0);
    for (int t : tokens) {
      auto p = softmax(logits[t]);
      for (int j = 0; j < 4; ++j) mean_p[j] += p[j] / double(tokens.size());
    }
    double s = 0;
    for (int j = 0; j < 4; ++j) s += assignments[j] / double(tokens.size()) * mean_p[j];
    return 4 * s;
  };

  block->forward(x);
  const double all = expected_loss({0, 1, 2}, {2, 1, 2, 1});
  CHECK(std::abs(load_balancing_loss({block->last_stats}, 4).item<double>() - all) < 1e-6);
  CHECK(std::abs(block->aux_loss().item<double>() - 0.25 * all) < 1e-6);
  CHECK(block->utilization() == std::vector<int64_t>{2, 1, 2, 1});
  CHECK(block->last_stats.tokens.item<int64_t>() == 3);

  // Token 2 is padding: out of the loss and the counts.
  block->forward(x, torch::tensor({1, 1, 0}).view({1, 3}));
  const double masked = expected_loss({0, 1}, {1, 1, 1, 1});
  CHECK(std::abs(block->aux_loss().item<double>() - 0.25 * masked) < 1e-6);
  CHECK(std::abs(masked - all) > 1e-3);  // the mask changes the value
  CHECK(block->utilization() == std::vector<int64_t>{3, 2, 3, 2});  // accumulated over both calls
  block->reset_utilization();
  CHECK(block->utilization() == std::vector<int64_t>{0, 0, 0, 0});

  // Perfectly balanced routing gives the minimum E * sum (k/E)(1/E) = k.
  auto uniform = torch::zeros({1, 6, 4});
  block->forward(uniform);
  CHECK(std::abs(load_balancing_loss({block->last_stats}, 4).item<double>() - 2.0) < 1e-6);
}

TEST_CASE("MoE model: utilization per layer, aux loss over all layers, dense-loop switch", "[moe]") {
  auto cfg = moe_tiny_config();
  auto model = make_model(cfg, 41);
  torch::manual_seed(42);
  auto ids = torch::randint(cfg.vocab_size, {2, 9}, torch::kInt64);
  auto mask = torch::ones({2, 9}, torch::kInt64);
  mask.index_put_({0, torch::indexing::Slice(0, 3)}, 0);  // 15 real tokens
  const int64_t real = 15;

  auto logits = model->forward(ids, mask);
  auto util = moe_utilization(model);
  REQUIRE(util.size() == 2);
  CHECK(util[0].layer == 0);
  CHECK(util[1].layer == 2);
  for (const auto& u : util) {
    INFO("layer " << u.layer);
    REQUIRE(u.tokens_per_expert.size() == 4);
    CHECK(std::accumulate(u.tokens_per_expert.begin(), u.tokens_per_expert.end(), int64_t{0}) == real * 2);
  }
  // The same counts from the router's own decisions on layer 0's recorded statistics.
  CHECK(moe_block(*model->model, 0)->last_stats.counts.sum().item<int64_t>() == real * 2);

  // The model's aux loss is HF's: f and P over both layers' tokens together, times the coefficient.
  auto aux = model->aux_loss();
  REQUIRE(aux.defined());
  auto expect = 0.01 * load_balancing_loss({moe_block(*model->model, 0)->last_stats, moe_block(*model->model, 2)->last_stats}, 4);
  CHECK(std::abs(aux.item<double>() - expect.item<double>()) < 1e-9);

  // The aux loss trains the routers of every MoE layer.
  model->zero_grad();
  aux.backward();
  for (int64_t l : {0, 2}) CHECK(moe_block(*model->model, l)->gate->weight.grad().abs().max().item<double>() > 0);

  model->forward(ids);  // no mask: all 18 tokens count
  util = moe_utilization(model);
  for (const auto& u : util)
    CHECK(std::accumulate(u.tokens_per_expert.begin(), u.tokens_per_expert.end(), int64_t{0}) == real * 2 + 18 * 2);
  reset_moe_utilization(model);
  for (const auto& u : moe_utilization(model))
    CHECK(std::accumulate(u.tokens_per_expert.begin(), u.tokens_per_expert.end(), int64_t{0}) == 0);

  torch::NoGradGuard no_grad;
  set_moe_dense_loop(model, true);
  auto dense_logits = model->forward(ids, mask);
  set_moe_dense_loop(model, false);
  CHECK(max_diff(dense_logits, logits) < 1e-5);

  // A dense model has no aux loss.
  Qwen2ForCausalLM dense(qwen2_preset("tiny"));
  dense->forward(ids);
  CHECK_FALSE(dense->aux_loss().defined());
  CHECK(moe_utilization(dense).empty());
}

TEST_CASE("MoE model: KV-cache decoding equals the full forward pass", "[moe]") {
  auto cfg = moe_step_config();
  auto model = make_model(cfg, 51);
  torch::NoGradGuard no_grad;
  torch::manual_seed(52);
  auto ids = torch::randint(cfg.vocab_size, {2, 8}, torch::kInt64);
  auto mask = torch::ones({2, 8}, torch::kInt64);
  mask.index_put_({1, torch::indexing::Slice(0, 2)}, 0);
  auto full = model->forward(ids, mask);
  KVCache cache;
  std::vector<torch::Tensor> steps{model->forward(ids.slice(1, 0, 4), mask.slice(1, 0, 4), {}, &cache)};
  for (int64_t t = 4; t < 8; ++t) steps.push_back(model->forward(ids.slice(1, t, t + 1), mask.slice(1, 0, t + 1), {}, &cache));
  auto real = mask.to(torch::kBool);
  CHECK(max_diff(torch::cat(steps, 1).index({real}), full.index({real})) < 1e-5);
  // The last decode step's statistics cover its 2 tokens.
  CHECK(moe_block(*model->model, 1)->last_stats.tokens.item<int64_t>() == 2);
}

TEST_CASE("MoE mixed model: state dicts and save_pretrained/load_pretrained", "[moe]") {
  auto cfg = moe_tiny_config();
  auto weights = random_weights(cfg, 61);
  Qwen2ForCausalLM a(cfg);
  auto report = load_state_dict(a, weights);
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());
  a->eval();
  torch::manual_seed(62);
  auto ids = torch::randint(cfg.vocab_size, {2, 6}, torch::kInt64);
  torch::NoGradGuard no_grad;
  auto logits = a->forward(ids);

  SECTION("state_dict -> load_state_dict is bit-exact") {
    Qwen2ForCausalLM b(cfg);
    load_state_dict(b, state_dict(a));
    auto sd = state_dict(b);
    REQUIRE(sd.size() == weights.size());
    for (const auto& [name, t] : weights) {
      INFO(name);
      CHECK(torch::equal(sd.at(name), t));
    }
    b->eval();
    CHECK(torch::equal(b->forward(ids), logits));
  }
  SECTION("a dense checkpoint does not load into the MoE model, and the errors name the tensors") {
    auto dense = moe_tiny_config();
    dense.num_experts = 0;
    Qwen2ForCausalLM d(dense);
    Qwen2ForCausalLM b(cfg);
    auto err = error_of([&] { load_state_dict(b, state_dict(d)); });
    CHECK_THAT(err, Contains("missing") && Contains("model.layers.0.mlp.experts.0.down_proj.weight") &&
                        Contains("unexpected") && Contains("model.layers.0.mlp.gate_proj.weight"));
    auto misshaped = weights;
    misshaped["model.layers.2.mlp.gate.weight"] = torch::zeros({5, 64});
    CHECK_THAT(error_of([&] { load_state_dict(b, misshaped); }),
               Contains("model.layers.2.mlp.gate.weight") && Contains("[4, 64]") && Contains("[5, 64]"));
  }
  SECTION("bf16: the router still softmaxes in fp32 and the model stays close to fp32") {
    Qwen2ForCausalLM half(cfg, torch::kBFloat16);
    load_state_dict(half, weights);
    half->eval();
    auto out = half->forward(ids);
    CHECK(out.scalar_type() == torch::kBFloat16);
    // On average, not at the maximum: where two experts' router logits are within bf16 rounding, top-k
    // may pick the other one, and that token's logits then differ by more (seen on AMD EPYC, whose
    // bf16 kernels round differently from the Intel machines the test was written on).
    const double mean_diff = (out.to(torch::kFloat32) - logits).abs().mean().item<double>();
    INFO("max diff " << max_diff(out, logits) << ", mean diff " << mean_diff);
    CHECK(mean_diff < 0.05 * logits.abs().mean().item<double>());
    auto r = moe_block(*half->model, 0)->route(torch::randn({3, 64}).to(torch::kBFloat16));
    CHECK(r.probs.scalar_type() == torch::kFloat32);
    CHECK(r.weights.scalar_type() == torch::kBFloat16);
  }
  SECTION("save_pretrained -> load_pretrained keeps config and weights") {
    TempDir dir;
    save_pretrained(a, dir.path.string());
    auto b = load_pretrained(dir.path.string());
    CHECK(b->config().num_experts == 4);
    CHECK(b->config().mlp_only_layers == std::vector<int64_t>{1});
    CHECK(b->config().norm_topk_prob);
    CHECK(moe_block(*b->model, 1) == nullptr);
    REQUIRE(moe_block(*b->model, 2) != nullptr);
    b->eval();
    CHECK(torch::equal(b->forward(ids), logits));
  }
}

TEST_CASE("MoE parity with an independent PyTorch Qwen2-MoE (tests/reference/moe_reference.py)", "[moe][reference]") {
  for (bool first : {true, false}) {
    auto cfg = first ? moe_tiny_config() : moe_step_config();
    INFO("config " << cfg.name);
    auto weights = random_weights(cfg, 71);
    Qwen2ForCausalLM model(cfg);
    load_state_dict(model, weights);
    model->train();  // no dropout anywhere; the aux loss is computed either way

    // Row 0 full, row 1 left-padded, row 2 right-padded.
    torch::manual_seed(72);
    auto ids = torch::randint(cfg.vocab_size, {3, 9}, torch::kInt64);
    auto mask = torch::ones({3, 9}, torch::kInt64);
    mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);
    mask.index_put_({2, torch::indexing::Slice(6, 9)}, 0);

    TempDir dir;
    save_qwen2_config(cfg, (dir.path / "config.json").string());
    save_tensors(dir.path / "weights.pt", weights);
    save_tensors(dir.path / "inputs.pt", {{"input_ids", ids}, {"attention_mask", mask}});
    std::string cmd = "/usr/bin/python3 " FEDMOE_SOURCE_DIR "/tests/reference/moe_reference.py " + dir.path.string();
    REQUIRE(std::system(cmd.c_str()) == 0);
    auto ref = load_tensors(dir.path / "out.pt");

    auto real = mask.to(torch::kBool);
    auto logits = model->forward(ids, mask);
    double logit_err = max_diff(logits.index({real}).detach(), ref.at("logits").index({real}));
    CHECK(logit_err < 1e-4);
    CHECK(ref.at("logits").abs().max().item<double>() > 1.0);

    const double coef = cfg.router_aux_loss_coef;
    auto aux = model->aux_loss();
    REQUIRE(aux.defined());
    double aux_err = std::abs(aux.item<double>() / coef - ref.at("aux_loss").item<double>());
    CHECK(aux_err < 1e-6);
    CHECK(std::abs(ref.at("aux_loss").item<double>() - ref.at("aux_loss_nomask").item<double>()) > 1e-5);

    auto total = next_token_loss(logits, ids, mask) + aux;
    CHECK(std::abs(total.item<double>() - ref.at("total_loss").item<double>()) < 1e-5);
    total.backward();
    double grad_err = 0, grad_max = 0;
    int64_t compared = 0;
    for (const auto& p : model->named_parameters()) {
      if (p.key().find(".mlp.") == std::string::npos) continue;
      INFO(p.key());
      REQUIRE(ref.count("grad/" + p.key()));
      auto g = p.value().grad().defined() ? p.value().grad() : torch::zeros_like(p.value());
      grad_err = std::max(grad_err, max_diff(g, ref.at("grad/" + p.key())));
      grad_max = std::max(grad_max, ref.at("grad/" + p.key()).abs().max().item<double>());
      ++compared;
    }
    CHECK(compared > 20);
    CHECK(grad_err < 1e-4);
    CHECK(grad_max > 1e-3);

    // Without a mask every position is a token: the aux loss counts all 27 positions.
    torch::NoGradGuard no_grad;
    model->forward(ids);
    double nomask_err = std::abs(model->aux_loss().item<double>() / coef - ref.at("aux_loss_nomask").item<double>());
    CHECK(nomask_err < 1e-6);
    std::printf(
        "MoE reference parity (%s): logits max |err| %.3g (max |logit| %.3g), aux loss |err| %.3g (aux %.6f, "
        "unmasked |err| %.3g), loss+aux grads of mlp.* %.3g (max |grad| %.3g)\n",
        cfg.name.c_str(), logit_err, ref.at("logits").abs().max().item<double>(), aux_err,
        ref.at("aux_loss").item<double>(), nomask_err, grad_err, grad_max);
  }
}
