// Tests of model/qwen2 and model/lora: config.json, HF parameter names, state-dict loading and its
// errors, KV-cache decoding, padding masks, LoRA experts (freezing, switching, merging, import
// checks, dropout), and parity with an independent PyTorch implementation
// (tests/reference/qwen2_reference.py, run with Debian's /usr/bin/python3).
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
#include <stdexcept>
#include <string>
#include <vector>

#include "model/lora.hpp"
#include "model/qwen2.hpp"
#include "model_test_util.hpp"

using namespace fedmoe::model;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

using namespace fedmoe::test;

// Tied, head_dim = hidden / heads, 4 query heads on 2 kv heads.
Qwen2Config tied_config() { return qwen2_preset("tiny"); }

// Untied, head_dim 24 != 64 / 4, all 4 query heads on one kv head.
Qwen2Config untied_config() {
  auto c = qwen2_preset("tiny");
  c.name = "tiny-untied";
  c.tie_word_embeddings = false;
  c.head_dim = 24;
  c.num_key_value_heads = 1;
  c.rope_theta = 10000;
  return c;
}

// LoRA on every projection kind, so a wrong path, shape or scale anywhere shows up.
LoraSpec all_targets_spec(int64_t rank = 4, bool rslora = false) {
  LoraSpec s;
  s.rank = rank;
  s.alpha = 8;
  s.use_rslora = rslora;
  s.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return s;
}

TensorMap to_map(const std::vector<NamedTensor>& tensors) {
  TensorMap out;
  for (const auto& t : tensors) out.emplace(t.name, t.tensor);
  return out;
}

}  // namespace

TEST_CASE("config.json: fields, HF defaults, errors naming file and field, round trip", "[qwen2][config]") {
  const std::string qwen2_05b = R"({
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 131072, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "use_sliding_window": false, "vocab_size": 151936, "rope_scaling": null})";
  auto c = qwen2_config_from_json(qwen2_05b, "0.5b/config.json");
  CHECK(c.hidden_size == 896);
  CHECK(c.head_dim == 64);  // absent: hidden / heads
  CHECK(c.num_key_value_heads == 2);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.tie_word_embeddings);
  CHECK(c.max_position_embeddings == 131072);
  CHECK(c.torch_dtype == "bfloat16");
  CHECK(c.bos_token_id == 151643);
  CHECK(c.eos_token_ids == std::vector<int64_t>{151643});
  CHECK(c.attention_bias);

  SECTION("HF defaults for absent fields; rope_parameters; eos list") {
    auto d = qwen2_config_from_json(
        R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 512, "eos_token_id": [7, 8]})",
        "min.json");
    CHECK(d.rope_theta == 10000.0);  // HF Qwen2Config's default, not the checkpoints' 1e6
    CHECK_FALSE(d.tie_word_embeddings);
    CHECK(d.num_key_value_heads == 4);
    CHECK(d.head_dim == 16);
    CHECK_FALSE(d.bos_token_id.has_value());
    CHECK(d.eos_token_ids == std::vector<int64_t>{7, 8});
    auto e = qwen2_config_from_json(
        R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 512, "head_dim": 24, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})",
        "v5.json");
    CHECK(e.rope_theta == 5e5);
    CHECK(e.head_dim == 24);
  }
  SECTION("errors name the file and the field") {
    auto no_hidden = error_of([] { qwen2_config_from_json(R"({"vocab_size": 5})", "a/config.json"); });
    CHECK_THAT(no_hidden, Contains("a/config.json") && Contains("'hidden_size'") && Contains("missing"));
    auto mistyped = error_of([] {
      qwen2_config_from_json(R"({"hidden_size": 64, "intermediate_size": "big", "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "vocab_size": 512})",
                             "b.json");
    });
    CHECK_THAT(mistyped, Contains("b.json") && Contains("'intermediate_size'") && Contains("\"big\""));
    auto qwen3 = error_of([&] {
      qwen2_config_from_json(R"({"model_type": "qwen3", "hidden_size": 64})", "c.json");
    });
    CHECK_THAT(qwen3, Contains("model_type") && Contains("qwen3"));
    auto yarn = error_of([] {
      qwen2_config_from_json(R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "yarn"}})",
                             "d.json");
    });
    CHECK_THAT(yarn, Contains("rope_scaling") && Contains("yarn"));
    auto gqa = error_of([] {
      qwen2_config_from_json(R"({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 512})",
                             "e.json");
    });
    CHECK_THAT(gqa, Contains("e.json") && Contains("num_key_value_heads"));
    CHECK_THAT(error_of([] { load_qwen2_config("/nonexistent/config.json"); }), Contains("/nonexistent/config.json"));
  }
  SECTION("writer round trip through a file") {
    TempDir dir;
    auto u = untied_config();
    u.eos_token_ids = {1, 2};
    save_qwen2_config(u, (dir.path / "config.json").string());
    auto r = load_qwen2_config((dir.path / "config.json").string());
    CHECK(r.name == u.name);
    CHECK(r.hidden_size == u.hidden_size);
    CHECK(r.num_hidden_layers == u.num_hidden_layers);
    CHECK(r.num_attention_heads == u.num_attention_heads);
    CHECK(r.num_key_value_heads == u.num_key_value_heads);
    CHECK(r.head_dim == u.head_dim);
    CHECK(r.intermediate_size == u.intermediate_size);
    CHECK(r.vocab_size == u.vocab_size);
    CHECK(r.tie_word_embeddings == u.tie_word_embeddings);
    CHECK(r.rms_norm_eps == u.rms_norm_eps);
    CHECK(r.rope_theta == u.rope_theta);
    CHECK(r.max_position_embeddings == u.max_position_embeddings);
    CHECK(r.torch_dtype == u.torch_dtype);
    CHECK(r.bos_token_id == u.bos_token_id);
    CHECK(r.eos_token_ids == u.eos_token_ids);
  }
}

TEST_CASE("named_parameters are Hugging Face's names and shapes", "[qwen2]") {
  for (bool tied : {true, false}) {
    auto cfg = tied ? tied_config() : untied_config();
    INFO("tied " << tied);
    // Written out from HF's Qwen2ForCausalLM, not derived from the C++ modules.
    const int64_t H = cfg.hidden_size, D = cfg.head_dim, I = cfg.intermediate_size, V = cfg.vocab_size;
    const int64_t q = cfg.num_attention_heads * D, kv = cfg.num_key_value_heads * D;
    std::map<std::string, std::vector<int64_t>> expected{{"model.embed_tokens.weight", {V, H}},
                                                         {"model.norm.weight", {H}}};
    if (!tied) expected["lm_head.weight"] = {V, H};
    for (int i = 0; i < cfg.num_hidden_layers; ++i) {
      std::string p = "model.layers." + std::to_string(i) + ".";
      expected[p + "self_attn.q_proj.weight"] = {q, H};
      expected[p + "self_attn.q_proj.bias"] = {q};
      expected[p + "self_attn.k_proj.weight"] = {kv, H};
      expected[p + "self_attn.k_proj.bias"] = {kv};
      expected[p + "self_attn.v_proj.weight"] = {kv, H};
      expected[p + "self_attn.v_proj.bias"] = {kv};
      expected[p + "self_attn.o_proj.weight"] = {H, q};
      expected[p + "mlp.gate_proj.weight"] = {I, H};
      expected[p + "mlp.up_proj.weight"] = {I, H};
      expected[p + "mlp.down_proj.weight"] = {H, I};
      expected[p + "input_layernorm.weight"] = {H};
      expected[p + "post_attention_layernorm.weight"] = {H};
    }
    Qwen2ForCausalLM model(cfg);
    std::map<std::string, std::vector<int64_t>> actual;
    for (const auto& p : model->named_parameters()) actual[p.key()] = p.value().sizes().vec();
    CHECK(actual == expected);
    CHECK(state_dict(model).size() == expected.size());
  }
}

TEST_CASE("state dict: load, round trip, dtype conversion, strict errors", "[qwen2]") {
  auto cfg = untied_config();
  auto weights = random_weights(cfg, 1);
  Qwen2ForCausalLM a(cfg);
  auto report = load_state_dict(a, weights);
  CHECK(report.missing.empty());
  CHECK(report.unexpected.empty());

  SECTION("load -> state_dict -> load is bit-exact") {
    Qwen2ForCausalLM b(cfg);
    load_state_dict(b, state_dict(a));
    auto sd = state_dict(b);
    REQUIRE(sd.size() == weights.size());
    for (const auto& [name, t] : weights) {
      INFO(name);
      CHECK(torch::equal(sd.at(name), t));
    }
  }
  SECTION("strict load names missing, unexpected and mis-shaped tensors and loads nothing") {
    Qwen2ForCausalLM b(cfg);
    auto before = b->model->norm->weight.clone();
    auto missing = weights;
    missing.erase("model.layers.1.mlp.up_proj.weight");
    CHECK_THAT(error_of([&] { load_state_dict(b, missing); }),
               Contains("missing") && Contains("model.layers.1.mlp.up_proj.weight"));
    auto unexpected = weights;
    unexpected["model.layers.7.mlp.up_proj.weight"] = torch::zeros({1});
    CHECK_THAT(error_of([&] { load_state_dict(b, unexpected); }),
               Contains("unexpected") && Contains("model.layers.7.mlp.up_proj.weight"));
    auto misshaped = weights;
    misshaped["model.layers.0.self_attn.k_proj.weight"] = torch::zeros({16, 64});
    CHECK_THAT(error_of([&] { load_state_dict(b, misshaped, /*strict=*/false); }),
               Contains("model.layers.0.self_attn.k_proj.weight") && Contains("[24, 64]") && Contains("[16, 64]"));
    auto integer = weights;
    integer["model.norm.weight"] = torch::ones({64}, torch::kInt64);
    CHECK_THAT(error_of([&] { load_state_dict(b, integer); }), Contains("model.norm.weight") && Contains("Long"));
    CHECK(torch::equal(b->model->norm->weight, before));
  }
  SECTION("non-strict load reports what it skipped") {
    Qwen2ForCausalLM b(cfg);
    auto partial = weights;
    partial.erase("lm_head.weight");
    partial["extra.weight"] = torch::zeros({2});
    auto r = load_state_dict(b, partial, /*strict=*/false);
    CHECK(r.missing == std::vector<std::string>{"lm_head.weight"});
    CHECK(r.unexpected == std::vector<std::string>{"extra.weight"});
    CHECK(torch::equal(b->model->norm->weight, weights.at("model.norm.weight")));
  }
  SECTION("a tied model ignores an lm_head copy") {
    auto tied = tied_config();
    auto w = random_weights(tied, 2);
    w["lm_head.weight"] = w.at("model.embed_tokens.weight");
    Qwen2ForCausalLM b(tied);
    CHECK(load_state_dict(b, w).unexpected.empty());
  }
  SECTION("bf16 checkpoints load into fp32 models, and bf16 models run") {
    TensorMap bf16;
    for (const auto& [name, t] : weights) bf16.emplace(name, t.to(torch::kBFloat16));
    Qwen2ForCausalLM b(cfg);
    load_state_dict(b, bf16);
    CHECK(torch::equal(b->model->norm->weight, bf16.at("model.norm.weight").to(torch::kFloat32)));

    a->eval();
    auto ids = random_ids(cfg, 2, 12, 3);
    auto fp32 = a->forward(ids);
    Qwen2ForCausalLM half(cfg, torch::kBFloat16);
    load_state_dict(half, weights);
    half->eval();
    CHECK(half->model->embed_tokens->weight.scalar_type() == torch::kBFloat16);
    auto logits = half->forward(ids);
    CHECK(logits.scalar_type() == torch::kBFloat16);
    // bf16 keeps ~3 significant digits; the logits here reach ~10.
    CHECK(max_diff(logits, fp32) < 0.05 * fp32.abs().max().item<double>());
    // to(bf16) on an fp32 model gives the same model as building in bf16.
    a->to(torch::kBFloat16);
    CHECK(torch::equal(a->forward(ids), logits));
  }
}

TEST_CASE("KV-cache decoding equals the full forward pass", "[qwen2]") {
  for (bool tied : {true, false}) {
    auto cfg = tied ? tied_config() : untied_config();
    INFO("tied " << tied);
    auto model = make_model(cfg, 4);
    torch::NoGradGuard no_grad;
    auto ids = random_ids(cfg, 2, 10, 5);
    auto full = model->forward(ids);  // [2, 10, V]

    KVCache cache;
    std::vector<torch::Tensor> steps{model->forward(ids.slice(1, 0, 6), {}, {}, &cache)};
    CHECK(cache.length() == 6);
    for (int64_t t = 6; t < 10; ++t) steps.push_back(model->forward(ids.slice(1, t, t + 1), {}, {}, &cache));
    CHECK(cache.length() == 10);
    CHECK(max_diff(torch::cat(steps, 1), full) < 1e-5);

    CHECK(max_diff(model->forward(ids, {}, {}, nullptr, 1), full.slice(1, 9, 10)) < 1e-5);

    // Left-padded batch: the mask grows with the cache; real positions must match the full pass.
    auto mask = torch::ones({2, 10}, torch::kInt64);
    mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);
    auto full_masked = model->forward(ids, mask);
    KVCache c2;
    std::vector<torch::Tensor> s2{model->forward(ids.slice(1, 0, 5), mask.slice(1, 0, 5), {}, &c2)};
    for (int64_t t = 5; t < 10; ++t)
      s2.push_back(model->forward(ids.slice(1, t, t + 1), mask.slice(1, 0, t + 1), {}, &c2));
    auto inc = torch::cat(s2, 1);
    auto real = mask.to(torch::kBool);
    CHECK(max_diff(inc.index({real}), full_masked.index({real})) < 1e-5);
  }
}

TEST_CASE("padding mask: padded batches give each sequence's own logits", "[qwen2]") {
  auto cfg = untied_config();
  auto model = make_model(cfg, 6);
  torch::NoGradGuard no_grad;
  auto long_seq = random_ids(cfg, 1, 7, 7);
  auto short_seq = random_ids(cfg, 1, 4, 8);
  auto alone_long = model->forward(long_seq);    // [1, 7, V]
  auto alone_short = model->forward(short_seq);  // [1, 4, V]
  const int64_t pad_id = 0;
  using torch::indexing::Slice;

  SECTION("left padding") {
    auto ids = torch::full({2, 7}, pad_id, torch::kInt64);
    auto mask = torch::zeros({2, 7}, torch::kInt64);
    ids[0] = long_seq[0];
    mask[0] = 1;
    ids.index_put_({1, Slice(3, 7)}, short_seq[0]);
    mask.index_put_({1, Slice(3, 7)}, 1);
    auto batch = model->forward(ids, mask);
    CHECK(max_diff(batch[0], alone_long[0]) < 1e-5);
    CHECK(max_diff(batch.index({1, Slice(3, 7)}), alone_short[0]) < 1e-5);
    CHECK_FALSE(torch::isnan(batch).any().item<bool>());
    // Without the mask the short row differs: the test would notice a mask being ignored.
    CHECK(max_diff(model->forward(ids).index({1, Slice(3, 7)}), alone_short[0]) > 1e-2);
  }
  SECTION("right padding") {
    auto ids = torch::full({2, 7}, pad_id, torch::kInt64);
    auto mask = torch::zeros({2, 7}, torch::kInt64);
    ids[0] = long_seq[0];
    mask[0] = 1;
    ids.index_put_({1, Slice(0, 4)}, short_seq[0]);
    mask.index_put_({1, Slice(0, 4)}, 1);
    auto batch = model->forward(ids, mask);
    CHECK(max_diff(batch[0], alone_long[0]) < 1e-5);
    CHECK(max_diff(batch.index({1, Slice(0, 4)}), alone_short[0]) < 1e-5);
  }
}

TEST_CASE("LoRA experts on a shared frozen base", "[lora]") {
  auto cfg = tied_config();
  auto model = make_model(cfg, 9);
  LoraExperts experts(model);
  auto ids = random_ids(cfg, 2, 8, 10);
  auto base_logits = model->forward(ids).detach();

  SECTION("only adapter parameters require grad, and only they get gradients") {
    experts.attach("python", all_targets_spec(), LoraInit::random, 1);
    experts.activate("python");
    for (const auto& p : model->named_parameters()) {
      INFO(p.key());
      CHECK_FALSE(p.value().requires_grad());
    }
    auto params = experts.named_parameters("python");
    CHECK(params.size() == static_cast<size_t>(2 * 7 * cfg.num_hidden_layers));
    for (const auto& [name, t] : params) CHECK(t.requires_grad());
    model->forward(ids).pow(2).mean().backward();
    for (const auto& [name, t] : params) CHECK(t.grad().defined());
    for (const auto& p : model->parameters()) CHECK_FALSE(p.grad().defined());

    // An optimizer over the expert's parameters trains the expert and leaves the base alone.
    auto base_before = state_dict(model);
    for (auto& [name, t] : base_before) t = t.clone();
    auto a_before = params.begin()->second.detach().clone();
    torch::optim::SGD sgd(experts.parameters("python"), torch::optim::SGDOptions(0.1));
    sgd.step();
    CHECK(max_diff(params.begin()->second, a_before) > 0);
    for (const auto& [name, t] : state_dict(model)) CHECK(torch::equal(t, base_before.at(name)));
    CHECK(experts.spec("python").target_modules.size() == 7);
    CHECK(experts.model().ptr() == model.ptr());  // shared, not copied
  }
  SECTION("a fresh PEFT adapter (B = 0) leaves the logits unchanged") {
    experts.attach("fresh", all_targets_spec(), LoraInit::peft, 1);
    experts.activate("fresh");
    CHECK(torch::equal(model->forward(ids), base_logits));
    // PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform a=sqrt(5)), B zeros.
    auto p = experts.named_parameters("fresh");
    auto a = p.at("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
    CHECK(a.sizes() == torch::IntArrayRef{4, cfg.intermediate_size});
    CHECK(a.abs().max().item<double>() <= 1.0 / std::sqrt(static_cast<double>(cfg.intermediate_size)));
    CHECK(a.abs().max().item<double>() > 0);
    CHECK(p.at("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").abs().max().item<double>() == 0);
  }
  SECTION("switching experts changes the logits; switching back restores them bit-exactly") {
    experts.attach("python", all_targets_spec(), LoraInit::random, 1);
    experts.attach("sql", all_targets_spec(8, true), LoraInit::random, 2);
    CHECK(experts.names() == std::vector<std::string>{"python", "sql"});
    experts.activate("python");
    auto py = model->forward(ids).detach();
    experts.activate("sql");
    CHECK(experts.active() == "sql");
    auto sql = model->forward(ids).detach();
    CHECK(max_diff(py, base_logits) > 1e-2);
    CHECK(max_diff(sql, py) > 1e-2);
    experts.activate("python");
    CHECK(torch::equal(model->forward(ids), py));
    experts.deactivate();
    CHECK(torch::equal(model->forward(ids), base_logits));
    experts.activate("sql");
    experts.detach("sql");
    CHECK(experts.active().empty());
    CHECK(torch::equal(model->forward(ids), base_logits));
    CHECK_THAT(error_of([&] { experts.activate("sql"); }), Contains("no LoRA adapter named 'sql'") && Contains("python"));
  }
  SECTION("merge equals the unmerged expert; unmerge restores the base weights") {
    auto base = state_dict(model);
    for (auto& [name, t] : base) t = t.clone();
    experts.attach("python", all_targets_spec(), LoraInit::random, 1);
    experts.activate("python");
    auto lora_logits = model->forward(ids).detach();
    experts.merge();
    CHECK(experts.merged());
    CHECK(max_diff(model->forward(ids), lora_logits) < 1e-5);
    CHECK(max_diff(model->model->layer(1).mlp->down_proj->weight,
                   base.at("model.layers.1.mlp.down_proj.weight")) > 1e-3);
    CHECK_THROWS_AS(experts.activate("python"), std::logic_error);
    CHECK_THROWS_AS(experts.merge(), std::logic_error);
    experts.unmerge();
    double worst = 0;
    for (const auto& [name, t] : state_dict(model)) worst = std::max(worst, max_diff(t, base.at(name)));
    CHECK(worst < 1e-6);
    CHECK(max_diff(model->forward(ids), lora_logits) < 1e-5);
    CHECK_THROWS_AS(experts.unmerge(), std::logic_error);
  }
  SECTION("adapters round-trip in PEFT's names; misfitting adapters are refused by name and shape") {
    auto spec = all_targets_spec();
    auto tensors = to_map(make_lora_tensors(cfg, spec, LoraInit::random, 3));
    experts.import_adapter("docs", spec, tensors);
    auto exported = experts.adapter_state_dict("docs");
    REQUIRE(exported.size() == tensors.size());
    for (const auto& [name, t] : tensors) CHECK(torch::equal(exported.at(name), t));
    experts.attach("seeded", spec, LoraInit::random, 3);  // attach == import of make_lora_tensors
    experts.activate("docs");
    auto docs = model->forward(ids).detach();
    experts.activate("seeded");
    CHECK(torch::equal(model->forward(ids), docs));

    auto wider = cfg;
    wider.hidden_size = 96;
    auto wrong = to_map(make_lora_tensors(wider, spec, LoraInit::random, 3));
    auto msg = error_of([&] { experts.import_adapter("wide", spec, wrong); });
    CHECK_THAT(msg, Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") &&
                        Contains("[4, 96]") && Contains("[4, 64]"));
    CHECK_FALSE(experts.contains("wide"));

    auto missing = tensors;
    missing.erase("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
    missing["base_model.model.model.layers.5.mlp.up_proj.lora_B.weight"] = torch::zeros({128, 4});
    msg = error_of([&] { experts.import_adapter("broken", spec, missing); });
    CHECK_THAT(msg, Contains("layers.1.mlp.up_proj.lora_B.weight missing") &&
                        Contains("layers.5.mlp.up_proj.lora_B.weight is not a tensor of this spec"));
    CHECK_THAT(error_of([&] { experts.import_adapter("docs", spec, tensors); }), Contains("already attached"));
  }
  SECTION("dropout applies in training mode only") {
    auto spec = all_targets_spec();
    spec.dropout = 0.5;
    experts.attach("drop", spec, LoraInit::random, 4);
    experts.activate("drop");
    auto eval1 = model->forward(ids).detach();
    CHECK(torch::equal(model->forward(ids), eval1));
    model->train();
    auto train1 = model->forward(ids).detach();
    auto train2 = model->forward(ids).detach();
    CHECK(max_diff(train1, train2) > 1e-3);
    model->eval();
    CHECK(torch::equal(model->forward(ids), eval1));
  }
  SECTION("adapter_config.json round trip and refusals") {
    TempDir dir;
    auto spec = all_targets_spec(16, true);
    spec.dropout = 0.05;
    save_adapter_config(spec, "Qwen/Qwen2-0.5B", (dir.path / "adapter_config.json").string());
    auto r = load_adapter_config((dir.path / "adapter_config.json").string());
    CHECK(r.rank == 16);
    CHECK(r.alpha == spec.alpha);
    CHECK(r.dropout == spec.dropout);
    CHECK(r.use_rslora);
    CHECK(r.target_modules == spec.target_modules);
    CHECK(lora_spec_from_json(R"({"target_modules": "all-linear"})", "x").target_modules.size() == 7);
    CHECK_THAT(error_of([] { lora_spec_from_json(R"({"r": 8, "rank_pattern": {"q_proj": 4}})", "ac.json"); }),
               Contains("ac.json") && Contains("rank_pattern"));
    CHECK_THAT(error_of([] { lora_spec_from_json(R"({"target_modules": ["qkv"]})", "ac.json"); }),
               Contains("target_modules") && Contains("qkv"));
  }
}

TEST_CASE("parity with an independent PyTorch Qwen2 (tests/reference/qwen2_reference.py)", "[qwen2][reference]") {
  for (bool tied : {true, false}) {
    auto cfg = tied ? tied_config() : untied_config();
    INFO("config " << (tied ? "tied" : "untied, head_dim 24, 1 kv head"));
    auto weights = random_weights(cfg, 11);
    Qwen2ForCausalLM model(cfg);
    load_state_dict(model, weights);
    model->eval();
    LoraExperts experts(model);
    auto spec = all_targets_spec(4, /*rslora=*/!tied);
    experts.attach("expert", spec, LoraInit::random, 12);  // non-zero B, so the adapter matters

    // Row 0 full, row 1 left-padded, row 2 right-padded.
    auto ids = random_ids(cfg, 3, 9, 13);
    auto mask = torch::ones({3, 9}, torch::kInt64);
    mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);
    mask.index_put_({2, torch::indexing::Slice(6, 9)}, 0);

    TempDir dir;
    save_qwen2_config(cfg, (dir.path / "config.json").string());
    save_tensors(dir.path / "weights.pt", weights);
    save_tensors(dir.path / "inputs.pt", {{"input_ids", ids}, {"attention_mask", mask}});
    save_adapter_config(spec, cfg.name, (dir.path / "adapter_config.json").string());
    save_tensors(dir.path / "adapter.pt", experts.adapter_state_dict("expert"));
    std::string cmd = "/usr/bin/python3 " FEDMOE_SOURCE_DIR "/tests/reference/qwen2_reference.py " + dir.path.string();
    REQUIRE(std::system(cmd.c_str()) == 0);
    auto ref = load_tensors(dir.path / "out.pt");

    auto real = mask.to(torch::kBool);
    auto logits = model->forward(ids, mask).detach();
    double base_err = max_diff(logits.index({real}), ref.at("logits").index({real}));
    CHECK(base_err < 1e-4);
    CHECK(ref.at("logits").abs().max().item<double>() > 1.0);  // the tolerance is meaningful

    experts.activate("expert");
    auto lora_logits = model->forward(ids, mask);
    double lora_err = max_diff(lora_logits.index({real}).detach(), ref.at("lora_logits").index({real}));
    CHECK(lora_err < 1e-4);
    CHECK(max_diff(lora_logits.index({real}).detach(), logits.index({real})) > 1e-2);

    auto loss = next_token_loss(lora_logits, ids, mask);
    CHECK(std::abs(loss.item<double>() - ref.at("lora_loss").item<double>()) < 1e-5);
    loss.backward();
    double grad_err = 0, grad_max = 0;
    for (const auto& [name, p] : experts.named_parameters("expert")) {
      INFO(name);
      REQUIRE(ref.count("grad/" + name));
      REQUIRE(p.grad().defined());
      grad_err = std::max(grad_err, max_diff(p.grad(), ref.at("grad/" + name)));
      grad_max = std::max(grad_max, ref.at("grad/" + name).abs().max().item<double>());
    }
    CHECK(grad_err < 1e-4);
    CHECK(grad_max > 1e-3);
    std::printf(
        "reference parity (%s): logits max |err| %.3g (max |logit| %.3g), LoRA logits %.3g, LoRA grads %.3g "
        "(max |grad| %.3g)\n",
        tied ? "tied" : "untied", base_err, ref.at("logits").abs().max().item<double>(), lora_err, grad_err, grad_max);
  }
}

TEST_CASE("LoRA on a Qwen2-MoE model: MLP targets on sparse layers are refused by name", "[lora][moe]") {
  auto cfg = qwen2_preset("tiny");
  cfg.num_hidden_layers = 3, cfg.num_experts = 4, cfg.num_experts_per_tok = 2, cfg.moe_intermediate_size = 32;
  cfg.mlp_only_layers = {1};
  auto model = make_model(cfg, 5);
  LoraExperts experts(model);
  LoraSpec spec;
  spec.rank = 2, spec.alpha = 4, spec.target_modules = {"q_proj", "up_proj"};
  auto err = error_of([&] { experts.attach("mlp", spec); });
  CHECK_THAT(err, Contains("target up_proj on layer 0") && Contains("Qwen2-MoE sparse layer"));
  CHECK(experts.names().empty());
  // Attention targets work on every layer, dense or sparse.
  spec.target_modules = {"q_proj", "o_proj"};
  experts.attach("attn", spec, LoraInit::random, 3);
  auto ids = random_ids(cfg, 1, 5, 4);
  auto base = model->forward(ids).detach();
  experts.activate("attn");
  CHECK(max_diff(model->forward(ids).detach(), base) > 1e-3);
  // to(device) keeps the parameters live (same tensors the optimizer holds).
  auto before = experts.named_parameters("attn").begin()->second;
  experts.to(torch::kCPU);
  CHECK(experts.named_parameters("attn").begin()->second.is_same(before));
}
