// Writes the Hugging Face parity kit: generated checkpoints in Hugging Face's format, PEFT adapters,
// inputs, and what fedmoe computes on them (logits with and without the adapter, the LoRA loss and
// gradients, greedy continuations, bf16 logits). tests/reference/hf_parity.py loads the same
// directories with transformers + peft (on a GPU machine, where they are installed) and compares.
//
// Hidden from the default run ([.]): `test_model "[hf-kit]"` with FEDMOE_HF_KIT=DIR writes the kit;
// without FEDMOE_HF_KIT it writes to a temporary directory and checks the kit reads back (that part
// runs in CI through the "[hf-kit-smoke]" tag).
// LibTorch pulls in glog, whose CHECK(cond) aborts the process: include it first and let Catch's
// CHECK replace it.
#include <torch/torch.h>
#undef CHECK
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "model/checkpoint.hpp"
#include "model/generation.hpp"
#include "model/lora.hpp"
#include "model/qwen2.hpp"
#include "model_test_util.hpp"

using namespace fedmoe::model;
using namespace fedmoe::test;
namespace fs = std::filesystem;

namespace {

struct KitCase {
  std::string name;
  Qwen2Config config;
  LoraSpec spec;  // target_modules empty: no adapter
};

std::vector<KitCase> kit_cases() {
  std::vector<KitCase> out;
  LoraSpec all;
  all.rank = 4, all.alpha = 8;
  all.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

  auto tied = qwen2_preset("tiny");
  tied.name = "kit-dense-tied";
  out.push_back({"dense-tied", tied, all});

  auto untied = qwen2_preset("tiny");
  untied.name = "kit-dense-untied";
  untied.tie_word_embeddings = false, untied.head_dim = 24, untied.num_key_value_heads = 1, untied.rope_theta = 10000;
  auto rs = all;
  rs.use_rslora = true, rs.rank = 8, rs.alpha = 16;
  out.push_back({"dense-untied-rslora", untied, rs});

  auto moe = qwen2_preset("tiny");
  moe.name = "kit-moe";
  moe.num_hidden_layers = 3, moe.num_experts = 4, moe.num_experts_per_tok = 2, moe.moe_intermediate_size = 32;
  moe.shared_expert_intermediate_size = 48, moe.norm_topk_prob = true, moe.mlp_only_layers = {1};
  LoraSpec attn = all;
  attn.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
  out.push_back({"moe", moe, attn});
  return out;
}

std::vector<int64_t> greedy(Qwen2ForCausalLM& model, const std::vector<int64_t>& prompt, int64_t n) {
  torch::NoGradGuard no_grad;
  KVCache cache;
  StepFn step = [&](const std::vector<int64_t>& toks) {
    return model->forward(torch::tensor(toks, torch::kInt64).unsqueeze(0), {}, {}, &cache, 1).reshape({-1});
  };
  GenerationOptions opts;
  opts.max_new_tokens = n;
  return generate(step, prompt, opts).tokens;
}

// One case's directory: model/ (HF), adapter/ (PEFT), expected.safetensors.
void write_case(const KitCase& c, const fs::path& dir, uint64_t seed) {
  auto model = make_model(c.config, seed);
  save_pretrained(model, (dir / "model").string());
  LoraExperts experts(model);
  experts.attach("expert", c.spec, LoraInit::random, seed + 1);  // non-zero B: the adapter matters
  save_peft_adapter(experts, "expert", (dir / "adapter").string(), "../model");

  // Row 0 full, row 1 left-padded, row 2 right-padded.
  auto ids = random_ids(c.config, 3, 11, seed + 2);  // [3, 11]
  auto mask = torch::ones({3, 11}, torch::kInt64);   // [3, 11]
  mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);
  mask.index_put_({2, torch::indexing::Slice(8, 11)}, 0);

  TensorMap expected{{"input_ids", ids}, {"attention_mask", mask}};
  expected["logits"] = model->forward(ids, mask).detach();  // [3, 11, V]
  std::vector<int64_t> prompt(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + 11);
  expected["greedy"] = torch::tensor(greedy(model, prompt, 12), torch::kInt64);  // [12]

  experts.activate("expert");
  auto lora_logits = model->forward(ids, mask);  // [3, 11, V]
  expected["lora_logits"] = lora_logits.detach();
  auto loss = next_token_loss(lora_logits, ids, mask);
  loss.backward();
  expected["lora_loss"] = loss.detach().reshape({1});
  for (const auto& [name, p] : experts.named_parameters("expert")) expected["grad/" + name] = p.grad().clone();
  expected["lora_greedy"] = torch::tensor(greedy(model, prompt, 12), torch::kInt64);  // [12]
  experts.deactivate();

  // The same weights in bf16 (what a GPU user runs): HF's bf16 forward should land within bf16 noise.
  Qwen2ForCausalLM bf16(c.config, torch::kBFloat16);
  load_state_dict(bf16, state_dict(model));
  bf16->eval();
  expected["bf16_logits"] = bf16->forward(ids, mask).detach().to(torch::kFloat32);
  write_safetensors((dir / "expected.safetensors").string(), expected);
}

void write_kit(const fs::path& root) {
  uint64_t seed = 100;
  for (const auto& c : kit_cases()) write_case(c, root / c.name, seed += 10);
}

}  // namespace

TEST_CASE("Hugging Face parity kit: written, and every part reads back", "[hf-kit-smoke]") {
  TempDir dir;
  write_kit(dir.path);
  for (const auto& c : kit_cases()) {
    INFO(c.name);
    auto base = load_pretrained((dir.path / c.name / "model").string());
    LoraExperts experts(base);
    load_peft_adapter(experts, "expert", (dir.path / c.name / "adapter").string());
    auto expected = read_safetensors((dir.path / c.name / "expected.safetensors").string());
    base->eval();
    experts.activate("expert");
    auto logits = base->forward(expected.at("input_ids"), expected.at("attention_mask")).detach();
    auto real = expected.at("attention_mask").to(torch::kBool);
    CHECK(max_diff(logits.index({real}), expected.at("lora_logits").index({real})) < 1e-5);
    // bf16 rounding moves logits by ~0.1 here; on MoE layers it can also flip a top-k choice.
    if (c.config.num_experts == 0)
      CHECK(max_diff(expected.at("bf16_logits").index({real}), expected.at("logits").index({real})) < 0.5);
    CHECK(expected.at("greedy").numel() == 12);
  }
}

TEST_CASE("Hugging Face parity kit: write to $FEDMOE_HF_KIT", "[.][hf-kit]") {
  const char* out = std::getenv("FEDMOE_HF_KIT");
  REQUIRE(out != nullptr);
  fs::create_directories(out);
  write_kit(out);
  std::printf("wrote the Hugging Face parity kit to %s\n", out);
}
