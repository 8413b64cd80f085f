#include "model/lora.hpp"

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

namespace fedmoe::model {

LoraLayerImpl::LoraLayerImpl(const torch::Tensor& a, const torch::Tensor& b, double scale_, double dropout_)
    : scale(scale_), dropout(dropout_) {
  // copy=true: the adapter owns its weights, whatever the caller does with the tensors it passed.
  lora_A = register_parameter("lora_A", a.detach().to(torch::kFloat32, false, /*copy=*/true));  // [r, in]
  lora_B = register_parameter("lora_B", b.detach().to(torch::kFloat32, false, /*copy=*/true));  // [out, r]
}

torch::Tensor LoraLayerImpl::forward(const torch::Tensor& x, bool training) {
  auto h = x.to(torch::kFloat32);
  if (dropout > 0) h = torch::dropout(h, dropout, training);
  return torch::linear(torch::linear(h, lora_A), lora_B) * scale;  // [..., r] then [..., out]
}

torch::Tensor LoraLayerImpl::delta_weight() const {
  return torch::matmul(lora_B.detach(), lora_A.detach()) * scale;  // [out, r] @ [r, in]
}

static std::string shape_str(torch::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

LoraExperts::LoraExperts(Qwen2ForCausalLM model) : model_(std::move(model)) {
  for (auto& p : model_->parameters()) p.requires_grad_(false);
}

void LoraExperts::attach(const std::string& name, const LoraSpec& spec, LoraInit init, uint64_t seed) {
  std::map<std::string, torch::Tensor> tensors;
  for (auto& t : make_lora_tensors(model_->config(), spec, init, seed)) tensors.emplace(t.name, t.tensor);
  import_adapter(name, spec, tensors);
}

void LoraExperts::import_adapter(const std::string& name, const LoraSpec& spec,
                                 const std::map<std::string, torch::Tensor>& tensors) {
  const std::string what = "LoRA adapter '" + name + "'";
  if (name.empty()) throw std::invalid_argument("a LoRA adapter needs a non-empty name");
  if (contains(name)) throw std::invalid_argument(what + " is already attached");
  if (spec.rank <= 0) throw std::invalid_argument(what + ": rank must be positive, got " + std::to_string(spec.rank));
  if (!(spec.dropout >= 0 && spec.dropout < 1))
    throw std::invalid_argument(what + ": dropout must be in [0, 1), got " + std::to_string(spec.dropout));
  if (spec.target_modules.empty()) throw std::invalid_argument(what + ": no target modules");
  std::set<std::string> modules(spec.target_modules.begin(), spec.target_modules.end());
  if (modules.size() != spec.target_modules.size()) throw std::invalid_argument(what + ": a target module is listed twice");

  // The feed-forward of a Qwen2-MoE layer is the sparse block (router + experts), whose projections
  // are not Qwen2Linear slots; PEFT would adapt every expert separately there. Refuse by name.
  const auto& config = model_->config();
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    if (config.is_moe_layer(layer))
      for (const auto& module : spec.target_modules)
        if (module == "gate_proj" || module == "up_proj" || module == "down_proj")
          throw std::invalid_argument(what + ": target " + module + " on layer " + std::to_string(layer) +
                                      ", a Qwen2-MoE sparse layer; LoRA experts adapt q/k/v/o_proj, and "
                                      "gate/up/down_proj on dense layers only");

  // Check every tensor before building anything, so a refused adapter leaves no trace and the
  // message lists all problems at once.
  const auto& cfg = model_->config();
  std::vector<std::string> problems;
  std::set<std::string> used;
  auto check = [&](const std::string& tensor, std::vector<int64_t> expected) {
    used.insert(tensor);
    auto it = tensors.find(tensor);
    if (it == tensors.end()) problems.push_back(tensor + " missing (expected " + shape_str(expected) + ")");
    else if (!it->second.defined() || !it->second.is_floating_point())
      problems.push_back(tensor + " is not a floating-point tensor");
    else if (it->second.sizes() != torch::IntArrayRef(expected))
      problems.push_back(tensor + " has shape " + shape_str(it->second.sizes()) + ", this base needs " +
                         shape_str(expected));
  };
  for (int64_t layer = 0; layer < cfg.num_hidden_layers; ++layer)
    for (const auto& module : spec.target_modules) {
      auto [in, out] = module_in_out(cfg, module);
      auto prefix = peft_lora_prefix(layer, module);
      check(prefix + "lora_A.weight", {spec.rank, in});   // [r, in]
      check(prefix + "lora_B.weight", {out, spec.rank});  // [out, r]
    }
  for (const auto& [tensor, value] : tensors)
    if (!used.count(tensor)) problems.push_back(tensor + " is not a tensor of this spec (unexpected)");
  if (!problems.empty()) {
    std::string msg = what + " does not fit the base (hidden " + std::to_string(cfg.hidden_size) + ", " +
                      std::to_string(cfg.num_hidden_layers) + " layers, rank " + std::to_string(spec.rank) + "): ";
    for (size_t i = 0; i < problems.size() && i < 8; ++i) msg += (i ? "; " : "") + problems[i];
    if (problems.size() > 8) msg += "; ... (" + std::to_string(problems.size() - 8) + " more)";
    throw std::invalid_argument(msg);
  }

  Adapter adapter{spec, {}};
  const auto device = model_->model->embed_tokens->weight.device();
  for (int64_t layer = 0; layer < cfg.num_hidden_layers; ++layer)
    for (const auto& module : spec.target_modules) {
      auto prefix = peft_lora_prefix(layer, module);
      adapter.branches.push_back({layer, module,
                                  LoraLayer(tensors.at(prefix + "lora_A.weight").to(device),
                                            tensors.at(prefix + "lora_B.weight").to(device), spec.scale(),
                                            spec.dropout)});
    }
  adapters_.emplace(name, std::move(adapter));
}

void LoraExperts::detach(const std::string& name) {
  find(name);
  if (name == active_) {
    require_unmerged("detach the active adapter");
    deactivate();
  }
  adapters_.erase(name);
}

void LoraExperts::activate(const std::string& name) {
  require_unmerged("switch adapters");
  const auto& next = find(name);
  if (!active_.empty()) set_branches(adapters_.at(active_), false);
  set_branches(next, true);
  active_ = name;
}

void LoraExperts::deactivate() {
  require_unmerged("deactivate");
  if (!active_.empty()) set_branches(adapters_.at(active_), false);
  active_.clear();
}

void LoraExperts::merge() {
  if (active_.empty()) throw std::logic_error("LoRA merge: no active adapter");
  require_unmerged("merge again");
  torch::NoGradGuard no_grad;
  for (const auto& b : adapters_.at(active_).branches) {
    auto& proj = projection(b.layer, b.module);
    proj->weight.add_(b.lora->delta_weight().to(proj->weight.scalar_type()));
    proj->lora = nullptr;  // the update now lives in W; applying the branch too would count it twice
  }
  merged_ = true;
}

void LoraExperts::unmerge() {
  if (!merged_) throw std::logic_error("LoRA unmerge: nothing is merged");
  torch::NoGradGuard no_grad;
  for (const auto& b : adapters_.at(active_).branches) {
    auto& proj = projection(b.layer, b.module);
    proj->weight.sub_(b.lora->delta_weight().to(proj->weight.scalar_type()));
    proj->lora = b.lora.ptr();
  }
  merged_ = false;
}

void LoraExperts::to(const torch::Device& device) {
  model_->to(device);
  for (auto& [name, adapter] : adapters_)
    for (auto& b : adapter.branches) b.lora->to(device);
}

std::vector<std::string> LoraExperts::names() const {
  std::vector<std::string> out;
  for (const auto& [name, adapter] : adapters_) out.push_back(name);
  return out;
}

const LoraSpec& LoraExperts::spec(const std::string& name) const { return find(name).spec; }

std::map<std::string, torch::Tensor> LoraExperts::named_parameters(const std::string& name) const {
  std::map<std::string, torch::Tensor> out;
  for (const auto& b : find(name).branches) {
    auto prefix = peft_lora_prefix(b.layer, b.module);
    out.emplace(prefix + "lora_A.weight", b.lora->lora_A);
    out.emplace(prefix + "lora_B.weight", b.lora->lora_B);
  }
  return out;
}

std::vector<torch::Tensor> LoraExperts::parameters(const std::string& name) const {
  std::vector<torch::Tensor> out;
  for (const auto& b : find(name).branches) {
    out.push_back(b.lora->lora_A);
    out.push_back(b.lora->lora_B);
  }
  return out;
}

std::map<std::string, torch::Tensor> LoraExperts::adapter_state_dict(const std::string& name) const {
  auto out = named_parameters(name);
  for (auto& [tensor, value] : out) value = value.detach().clone();
  return out;
}

const LoraExperts::Adapter& LoraExperts::find(const std::string& name) const {
  auto it = adapters_.find(name);
  if (it != adapters_.end()) return it->second;
  std::string known;
  for (const auto& [n, a] : adapters_) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("no LoRA adapter named '" + name + "' (attached: " + (known.empty() ? "none" : known) +
                              ")");
}

Qwen2Linear& LoraExperts::projection(int64_t layer, const std::string& module) {
  auto& l = model_->model->layer(layer);
  if (module == "q_proj") return l.self_attn->q_proj;
  if (module == "k_proj") return l.self_attn->k_proj;
  if (module == "v_proj") return l.self_attn->v_proj;
  if (module == "o_proj") return l.self_attn->o_proj;
  if (module == "gate_proj") return l.mlp->gate_proj;
  if (module == "up_proj") return l.mlp->up_proj;
  if (module == "down_proj") return l.mlp->down_proj;
  throw std::invalid_argument("unknown LoRA target module '" + module + "'");
}

void LoraExperts::set_branches(const Adapter& adapter, bool on) {
  for (const auto& b : adapter.branches) projection(b.layer, b.module)->lora = on ? b.lora.ptr() : nullptr;
}

void LoraExperts::require_unmerged(const char* what) const {
  if (merged_) throw std::logic_error(std::string("LoRA: cannot ") + what + " while '" + active_ + "' is merged; unmerge() first");
}

// --- adapter_config.json ---------------------------------------------------------------------------

using nlohmann::json;

static const std::vector<std::string> kAllLinear{"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};

LoraSpec lora_spec_from_json(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw std::runtime_error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(source + ": expected a JSON object at the top level");
  auto fail = [&](const std::string& field, const std::string& why) {
    throw std::runtime_error(source + ": field '" + field + "': " + why);
  };
  auto get = [&](const std::string& field) -> const json* {
    auto it = j.find(field);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  // PEFT's LoraConfig defaults for absent fields.
  LoraSpec spec;
  spec.rank = 8, spec.alpha = 8, spec.dropout = 0.0, spec.use_rslora = false;
  if (const json* v = get("peft_type"); v && *v != "LORA") fail("peft_type", v->dump() + " is not \"LORA\"");
  if (const json* v = get("r")) {
    if (!v->is_number_integer()) fail("r", "expected an integer, got " + v->dump());
    spec.rank = v->get<int64_t>();
  }
  if (const json* v = get("lora_alpha")) {
    if (!v->is_number()) fail("lora_alpha", "expected a number, got " + v->dump());
    spec.alpha = v->get<double>();
  }
  if (const json* v = get("lora_dropout")) {
    if (!v->is_number()) fail("lora_dropout", "expected a number, got " + v->dump());
    spec.dropout = v->get<double>();
  }
  if (const json* v = get("use_rslora")) {
    if (!v->is_boolean()) fail("use_rslora", "expected true or false, got " + v->dump());
    spec.use_rslora = v->get<bool>();
  }
  if (const json* v = get("target_modules")) {
    if (v->is_string()) {
      // A string is a regex in PEFT; only the "all-linear" shorthand has a fixed meaning.
      if (*v != "all-linear") fail("target_modules", v->dump() + ": only a list of names or \"all-linear\" is supported");
      spec.target_modules = kAllLinear;
    } else if (v->is_array()) {
      spec.target_modules.clear();
      for (const auto& m : *v) {
        if (!m.is_string()) fail("target_modules", "expected names, got " + m.dump());
        if (std::find(kAllLinear.begin(), kAllLinear.end(), m.get<std::string>()) == kAllLinear.end())
          fail("target_modules", m.dump() + " is not a Qwen2 linear (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                            "up_proj, down_proj)");
        spec.target_modules.push_back(m.get<std::string>());
      }
    } else {
      fail("target_modules", "expected a list of names, got " + v->dump());
    }
  }
  for (const char* field : {"rank_pattern", "alpha_pattern"})
    if (const json* v = get(field); v && !v->empty()) fail(field, "per-module ranks/alphas are not supported");
  if (const json* v = get("bias"); v && *v != "none") fail("bias", v->dump() + ": only \"none\" is supported");
  if (const json* v = get("fan_in_fan_out"); v && *v != false) fail("fan_in_fan_out", "must be false for Qwen2");
  if (const json* v = get("use_dora"); v && *v != false) fail("use_dora", "DoRA is not supported");
  if (get("layers_to_transform")) fail("layers_to_transform", "adapters on a subset of layers are not supported");
  return spec;
}

LoraSpec load_adapter_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open adapter config");
  std::ostringstream text;
  text << in.rdbuf();
  return lora_spec_from_json(text.str(), path);
}

std::string adapter_config_to_json(const LoraSpec& spec, const std::string& base_model_name_or_path) {
  json j = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"r", spec.rank},
      {"lora_alpha", spec.alpha},
      {"lora_dropout", spec.dropout},
      {"target_modules", spec.target_modules},
      {"bias", "none"},
      {"use_rslora", spec.use_rslora},
      {"fan_in_fan_out", false},
      {"use_dora", false},
      {"base_model_name_or_path", base_model_name_or_path},
      {"rank_pattern", json::object()},
      {"alpha_pattern", json::object()},
  };
  return j.dump(2) + "\n";
}

void save_adapter_config(const LoraSpec& spec, const std::string& base_model_name_or_path, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot write adapter config");
  out << adapter_config_to_json(spec, base_model_name_or_path);
  if (!out.flush()) throw std::runtime_error(path + ": write failed");
}

}  // namespace fedmoe::model
