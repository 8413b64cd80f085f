// Hugging Face directories round-trip: base models (single file and shards, fp32 and bf16) and PEFT
// adapters, with the refusals a user meets when files do not fit.

#include <filesystem>
#include <fstream>

#include <torch/torch.h>
// glog (via LibTorch) defines CHECK too; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "model/checkpoint.hpp"

using namespace fedmoe::model;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("fedmoe_ckpt_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

Qwen2Config tiny(bool tied) {
  auto c = qwen2_preset("tiny");
  c.tie_word_embeddings = tied;
  return c;
}

torch::Tensor logits_of(Qwen2ForCausalLM& m) {
  torch::NoGradGuard g;
  auto ids = torch::tensor({{1, 5, 9, 200, 3, 7}}, torch::kInt64);
  return m->forward(ids);
}

}  // namespace

TEST_CASE("checkpoint: save_pretrained -> load_pretrained is bit-exact, single file and shards", "[checkpoint]") {
  for (bool tied : {true, false}) {
    for (uint64_t shard : {uint64_t{1} << 30, uint64_t{20000}}) {
      INFO("tied " << tied << ", shard bytes " << shard);
      auto dir = temp_dir("base");
      torch::manual_seed(3);
      Qwen2ForCausalLM m(tiny(tied));
      save_pretrained(m, dir.string(), shard);
      CHECK(fs::exists(dir / "config.json"));
      CHECK(fs::exists(dir / (shard > 1000000 ? "model.safetensors" : "model.safetensors.index.json")));
      auto back = load_pretrained(dir.string());
      auto a = state_dict(m), b = state_dict(back);
      REQUIRE(a.size() == b.size());
      for (auto& [name, t] : a) CHECK(torch::equal(t, b.at(name)));
      CHECK(a.count("lm_head.weight") == (tied ? 0u : 1u));
      CHECK(torch::equal(logits_of(m), logits_of(back)));
      fs::remove_all(dir);
    }
  }
}

TEST_CASE("checkpoint: bf16 models save and load in bf16", "[checkpoint]") {
  auto dir = temp_dir("bf16");
  torch::manual_seed(4);
  Qwen2ForCausalLM m(tiny(true), torch::kBFloat16);
  save_pretrained(m, dir.string());
  auto views = SafetensorsFile::open(dir / "model.safetensors");
  CHECK(views->at("model.norm.weight").dtype == SafetensorsDtype::BF16);
  auto back = load_pretrained(dir.string(), torch::kBFloat16);
  for (auto& [name, t] : state_dict(m)) CHECK(torch::equal(t, state_dict(back).at(name)));
  fs::remove_all(dir);
}

TEST_CASE("checkpoint: a broken model directory is named in the error", "[checkpoint]") {
  auto dir = temp_dir("broken");
  fs::create_directories(dir);
  CHECK_THROWS_WITH(load_pretrained(dir.string()), Catch::Contains("no config.json"));
  torch::manual_seed(5);
  Qwen2ForCausalLM m(tiny(true));
  save_pretrained(m, dir.string());
  // A checkpoint of another shape: the error names the tensor and both shapes.
  auto other = tiny(true);
  other.intermediate_size = 96;
  save_qwen2_config(other, (dir / "config.json").string());
  CHECK_THROWS_WITH(load_pretrained(dir.string()),
                    Catch::Contains(dir.string()) && Catch::Contains("mlp.gate_proj.weight") && Catch::Contains("96"));
  fs::remove_all(dir);
}

TEST_CASE("checkpoint: PEFT adapters export and import with identical logits", "[checkpoint]") {
  auto dir = temp_dir("peft");
  torch::manual_seed(6);
  Qwen2ForCausalLM base(tiny(true));
  LoraExperts experts(base);
  LoraSpec spec;
  spec.rank = 4;
  spec.alpha = 8;
  spec.target_modules = {"q_proj", "v_proj", "down_proj"};
  experts.attach("python", spec, LoraInit::random, 17);
  experts.activate("python");
  auto with_adapter = logits_of(experts.model());
  save_peft_adapter(experts, "python", dir.string(), "fedmoe/tiny");
  CHECK(fs::exists(dir / "adapter_config.json"));
  auto file = SafetensorsFile::open(dir / "adapter_model.safetensors");
  CHECK(file->contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  CHECK(file->at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == std::vector<int64_t>{4, 64});

  // A second process would load the same base and the adapter from disk.
  torch::manual_seed(6);
  Qwen2ForCausalLM base2(tiny(true));
  LoraExperts experts2(base2);
  auto without = logits_of(experts2.model());
  load_peft_adapter(experts2, "python", dir.string());
  experts2.activate("python");
  auto imported = logits_of(experts2.model());
  CHECK(torch::equal(imported, with_adapter));
  CHECK_FALSE(torch::allclose(without, with_adapter));

  // An adapter made for another base is refused, naming the tensor and the shapes.
  auto wide = tiny(true);
  wide.hidden_size = 96;
  wide.head_dim = 24;
  Qwen2ForCausalLM other(wide);
  LoraExperts experts3(other);
  CHECK_THROWS_WITH(load_peft_adapter(experts3, "python", dir.string()),
                    Catch::Contains("lora_A.weight") && Catch::Contains("64") && Catch::Contains("96"));
  CHECK_FALSE(experts3.contains("python"));
  fs::remove_all(dir);
}
