// LoRA experts on one shared, frozen Qwen2 base: several named adapters attach to the same model
// instance, one is active at a time (switching swaps pointers, the base is never reloaded), and the
// active one can be merged into the base weights and unmerged again. Adapter tensors use PEFT's
// names and shapes (see model/lora_expert.hpp), so an expert maps 1:1 onto adapter_model.safetensors:
// `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight`
// [out, r]; adapter_config.json reads and writes as PEFT's.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/lora_expert.hpp"
#include "model/qwen2.hpp"

namespace fedmoe::model {

// One projection's low-rank branch: delta(x) = scale * B(A(dropout(x))), as PEFT's LoRA Linear.
// Kept in fp32 whatever the base dtype (PEFT's autocast_adapter_dtype): bf16 updates of small
// adapter weights would round away.
class LoraLayerImpl : public torch::nn::Module {
 public:
  // a [r, in], b [out, r]: copied into fp32 parameters that require grad.
  LoraLayerImpl(const torch::Tensor& a, const torch::Tensor& b, double scale, double dropout);
  // x [..., in] -> [..., out] fp32. Dropout only when `training` (the host projection's mode).
  torch::Tensor forward(const torch::Tensor& x, bool training);
  torch::Tensor delta_weight() const;  // scale * B @ A, [out, in] fp32: what merging adds to W

  double scale, dropout;
  torch::Tensor lora_A;  // [r, in]
  torch::Tensor lora_B;  // [out, r]
};
TORCH_MODULE(LoraLayer);

// The adapters of one model. Construction freezes every base parameter (requires_grad false), so
// only adapter parameters train. Use one LoraExperts per model: it owns the projections' `lora` slots.
// Errors throw std::invalid_argument (bad names/shapes/specs) or std::logic_error (wrong state,
// e.g. switching while merged).
class LoraExperts {
 public:
  explicit LoraExperts(Qwen2ForCausalLM model);

  // Attaches a new adapter `name` with spec.target_modules in every layer. LoraInit::peft is PEFT's
  // init (A kaiming-uniform(a=sqrt(5)), B zeros: the expert starts as a no-op); LoraInit::random
  // makes B random too. Deterministic for `seed` (same tensors as make_lora_tensors). Not activated.
  void attach(const std::string& name, const LoraSpec& spec, LoraInit init = LoraInit::peft, uint64_t seed = 0);

  // Attaches adapter `name` from PEFT-named tensors (any floating dtype). The set of names must be
  // exactly spec.target_modules x layers, A and B each, with shapes [r, in] / [out, r] of this base;
  // otherwise nothing is attached and the error names every offending tensor with expected and
  // actual shape. Not activated.
  void import_adapter(const std::string& name, const LoraSpec& spec,
                      const std::map<std::string, torch::Tensor>& tensors);

  // Removes adapter `name` (deactivating it if active; refused while it is merged).
  void detach(const std::string& name);

  // Makes `name` the adapter the forward pass applies; deactivate() returns to the bare base.
  // Both are refused while an adapter is merged.
  void activate(const std::string& name);
  void deactivate();

  // W += scale * B @ A for the active adapter's projections (forward then skips the branch, so
  // inference costs what the base costs); unmerge() subtracts it again. In fp32 unmerge restores W
  // to rounding (~1e-7 relative); in bf16 it does not restore W exactly.
  void merge();
  void unmerge();

  const std::string& active() const { return active_; }  // "" when none
  bool merged() const { return merged_; }
  bool contains(const std::string& name) const { return adapters_.count(name) > 0; }
  std::vector<std::string> names() const;
  const LoraSpec& spec(const std::string& name) const;

  // Adapter `name`'s live parameters by PEFT name (for optimizers and their .grad()).
  std::map<std::string, torch::Tensor> named_parameters(const std::string& name) const;
  std::vector<torch::Tensor> parameters(const std::string& name) const;

  // A detached fp32 copy of adapter `name` by PEFT name: a snapshot to save or send while training
  // goes on.
  std::map<std::string, torch::Tensor> adapter_state_dict(const std::string& name) const;

  // Moves the base and every attached adapter to `device` (cpu, cuda:N). Parameters move in place, so
  // tensors from named_parameters() stay the live parameters. Adapters attached later are created
  // on the base's device.
  void to(const torch::Device& device);

  Qwen2ForCausalLM& model() { return model_; }  // the shared base these adapters ride on

 private:
  struct Branch {
    int64_t layer;
    std::string module;  // "q_proj", ..., "down_proj"
    LoraLayer lora;
  };
  struct Adapter {
    LoraSpec spec;
    std::vector<Branch> branches;  // layer by layer, module by module (PEFT's tensor order)
  };
  const Adapter& find(const std::string& name) const;
  Qwen2Linear& projection(int64_t layer, const std::string& module);
  void set_branches(const Adapter& adapter, bool on);
  void require_unmerged(const char* what) const;

  Qwen2ForCausalLM model_;
  std::map<std::string, Adapter> adapters_;
  std::string active_;
  bool merged_ = false;
};

// adapter_config.json: peft_type LORA, r, lora_alpha, lora_dropout, target_modules (a list, or
// "all-linear"), use_rslora. Refuses (std::runtime_error naming the file and field) what LoraExperts
// does not implement: rank_pattern/alpha_pattern, bias other than "none", fan_in_fan_out, DoRA.
LoraSpec lora_spec_from_json(const std::string& json_text, const std::string& source);
LoraSpec load_adapter_config(const std::string& path);
std::string adapter_config_to_json(const LoraSpec& spec, const std::string& base_model_name_or_path);
void save_adapter_config(const LoraSpec& spec, const std::string& base_model_name_or_path, const std::string& path);

}  // namespace fedmoe::model
