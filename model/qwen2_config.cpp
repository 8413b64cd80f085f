#include "model/qwen2_config.hpp"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace fedmoe::model {

using nlohmann::json;

void Qwen2Config::validate() const {
  auto positive = [](const char* field, int64_t v) {
    if (v <= 0) throw std::invalid_argument(std::string("Qwen2 config: ") + field + " must be positive, got " +
                                            std::to_string(v));
  };
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("intermediate_size", intermediate_size);
  positive("vocab_size", vocab_size);
  if (num_attention_heads % num_key_value_heads != 0)
    throw std::invalid_argument("Qwen2 config: num_attention_heads (" + std::to_string(num_attention_heads) +
                                ") must be a multiple of num_key_value_heads (" +
                                std::to_string(num_key_value_heads) + ")");
  if (head_dim % 2 != 0)
    throw std::invalid_argument("Qwen2 config: head_dim must be even for RoPE, got " + std::to_string(head_dim));
  if (!(rms_norm_eps > 0)) throw std::invalid_argument("Qwen2 config: rms_norm_eps must be positive");
  if (!(rope_theta > 0)) throw std::invalid_argument("Qwen2 config: rope_theta must be positive");
  if (num_experts < 0) throw std::invalid_argument("Qwen2 config: num_experts must be >= 0, got " + std::to_string(num_experts));
  if (num_experts > 0) {
    if (num_experts_per_tok < 1 || num_experts_per_tok > num_experts)
      throw std::invalid_argument("Qwen2 config: num_experts_per_tok must be in [1, num_experts = " +
                                  std::to_string(num_experts) + "], got " + std::to_string(num_experts_per_tok));
    positive("moe_intermediate_size", moe_intermediate_size);
    positive("decoder_sparse_step", decoder_sparse_step);
    if (shared_expert_intermediate_size < 0)
      throw std::invalid_argument("Qwen2 config: shared_expert_intermediate_size must be >= 0, got " +
                                  std::to_string(shared_expert_intermediate_size));
    if (!(router_aux_loss_coef >= 0)) throw std::invalid_argument("Qwen2 config: router_aux_loss_coef must be >= 0");
    for (int64_t l : mlp_only_layers)
      if (l < 0 || l >= num_hidden_layers)
        throw std::invalid_argument("Qwen2 config: mlp_only_layers entry " + std::to_string(l) + " is not a layer (0.." +
                                    std::to_string(num_hidden_layers - 1) + ")");
  }
}

bool Qwen2Config::is_moe_layer(int64_t layer_idx) const {
  if (num_experts <= 0 || decoder_sparse_step <= 0) return false;
  for (int64_t l : mlp_only_layers)
    if (l == layer_idx) return false;
  return (layer_idx + 1) % decoder_sparse_step == 0;
}

Qwen2Config qwen2_preset(const std::string& name) {
  Qwen2Config c;
  c.name = name;
  if (name == "qwen2-0.5b") return c;  // the struct's defaults are Qwen2-0.5B
  if (name == "qwen2-1.5b") {
    c.hidden_size = 1536, c.num_hidden_layers = 28, c.num_attention_heads = 12, c.num_key_value_heads = 2;
    c.head_dim = 128, c.intermediate_size = 8960;
    return c;
  }
  if (name == "qwen2-7b") {
    c.hidden_size = 3584, c.num_hidden_layers = 28, c.num_attention_heads = 28, c.num_key_value_heads = 4;
    c.head_dim = 128, c.intermediate_size = 18944, c.vocab_size = 152064, c.tie_word_embeddings = false;
    return c;
  }
  if (name == "tiny") {
    c.hidden_size = 64, c.num_hidden_layers = 2, c.num_attention_heads = 4, c.num_key_value_heads = 2;
    c.head_dim = 16, c.intermediate_size = 128, c.vocab_size = 512;
    return c;
  }
  throw std::invalid_argument("unknown Qwen2 preset '" + name + "' (known: qwen2-0.5b, qwen2-1.5b, qwen2-7b, tiny)");
}

namespace {

// Typed field access whose errors name the file and the field.
struct Fields {
  const json& j;
  const std::string& source;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw std::runtime_error(source + ": field '" + field + "': " + what);
  }
  const json* find(const std::string& field) const {
    auto it = j.find(field);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const std::string& field, std::optional<int64_t> fallback = std::nullopt) const {
    const json* v = find(field);
    if (!v) {
      if (fallback) return *fallback;
      fail(field, "missing (required)");
    }
    if (!v->is_number_integer()) fail(field, "expected an integer, got " + v->dump());
    return v->get<int64_t>();
  }
  double number(const std::string& field, double fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_number()) fail(field, "expected a number, got " + v->dump());
    return v->get<double>();
  }
  bool boolean(const std::string& field, bool fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field, "expected true or false, got " + v->dump());
    return v->get<bool>();
  }
  std::optional<std::string> string(const std::string& field) const {
    const json* v = find(field);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail(field, "expected a string, got " + v->dump());
    return v->get<std::string>();
  }
};

}  // namespace

Qwen2Config qwen2_config_from_json(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw std::runtime_error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(source + ": expected a JSON object at the top level");
  Fields f{j, source};

  // Qwen3 and its MoE variant share field names but compute differently: refuse them here rather
  // than run the wrong architecture.
  const auto model_type = f.string("model_type");
  if (model_type && *model_type != "qwen2" && *model_type != "qwen2_moe")
    f.fail("model_type", "'" + *model_type + "' is not supported (this decoder implements 'qwen2' and 'qwen2_moe')");
  if (auto act = f.string("hidden_act"); act && *act != "silu")
    f.fail("hidden_act", "'" + *act + "' is not supported (Qwen2 uses 'silu')");
  if (f.boolean("use_sliding_window", false)) f.fail("use_sliding_window", "sliding-window attention is not supported");

  Qwen2Config c;
  c.name = f.string("_name_or_path").value_or(source);
  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_hidden_layers = f.integer("num_hidden_layers");
  c.num_attention_heads = f.integer("num_attention_heads");
  c.vocab_size = f.integer("vocab_size");
  c.num_key_value_heads = f.integer("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads <= 0) f.fail("num_attention_heads", "must be positive");
  c.head_dim = f.integer("head_dim", c.hidden_size / c.num_attention_heads);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.max_position_embeddings = f.integer("max_position_embeddings", 32768);
  c.attention_bias = f.boolean("attention_bias", true);
  c.initializer_range = f.number("initializer_range", 0.02);

  // transformers >= 4.56 writes `dtype`, older versions `torch_dtype`.
  c.torch_dtype = f.string("dtype").value_or(f.string("torch_dtype").value_or("float32"));

  // RoPE: transformers v5 moved the base into `rope_parameters`; scaled variants (YaRN, dynamic NTK)
  // change the frequencies and are not implemented.
  c.rope_theta = f.number("rope_theta", 10000.0);
  if (const json* rp = f.find("rope_parameters")) {
    if (!rp->is_object()) f.fail("rope_parameters", "expected an object, got " + rp->dump());
    Fields r{*rp, source};
    if (auto type = r.string("rope_type"); type && *type != "default")
      f.fail("rope_parameters.rope_type", "'" + *type + "' is not supported (only 'default' RoPE)");
    c.rope_theta = r.number("rope_theta", c.rope_theta);
  }
  if (const json* rs = f.find("rope_scaling")) {
    std::string type = rs->is_object() ? rs->value("rope_type", rs->value("type", std::string("?"))) : rs->dump();
    if (type != "default") f.fail("rope_scaling", "'" + type + "' scaling is not supported");
  }

  c.bos_token_id = std::nullopt;
  if (f.find("bos_token_id")) c.bos_token_id = f.integer("bos_token_id");
  c.eos_token_ids.clear();
  if (const json* eos = f.find("eos_token_id")) {
    if (eos->is_array()) {
      for (const auto& id : *eos) {
        if (!id.is_number_integer()) f.fail("eos_token_id", "expected integers, got " + eos->dump());
        c.eos_token_ids.push_back(id.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(f.integer("eos_token_id"));
    }
  }

  // Qwen2-MoE fields (HF's Qwen2MoeConfig names).
  const bool moe_type = model_type && *model_type == "qwen2_moe";
  if (moe_type) {
    c.num_experts = f.integer("num_experts");
    if (c.num_experts <= 0) f.fail("num_experts", "must be positive for model_type 'qwen2_moe'");
  } else {
    c.num_experts = f.integer("num_experts", 0);
    if (c.num_experts < 0) f.fail("num_experts", "must be >= 0");
    if (c.num_experts > 0 && model_type)
      f.fail("num_experts", "set with model_type 'qwen2': transformers would build a dense model (use 'qwen2_moe')");
  }
  if (c.num_experts > 0) {
    c.num_experts_per_tok = f.integer("num_experts_per_tok");
    c.moe_intermediate_size = f.integer("moe_intermediate_size");
    c.shared_expert_intermediate_size = f.integer("shared_expert_intermediate_size");
    c.norm_topk_prob = f.boolean("norm_topk_prob", false);
    c.router_aux_loss_coef = f.number("router_aux_loss_coef", 0.001);
    c.decoder_sparse_step = f.integer("decoder_sparse_step", 1);
    if (const json* only = f.find("mlp_only_layers")) {
      if (!only->is_array()) f.fail("mlp_only_layers", "expected a list of layer indices, got " + only->dump());
      for (const auto& l : *only) {
        if (!l.is_number_integer()) f.fail("mlp_only_layers", "expected integers, got " + only->dump());
        c.mlp_only_layers.push_back(l.get<int64_t>());
      }
    }
  }

  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(source + ": " + e.what());
  }
  return c;
}

Qwen2Config load_qwen2_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open Qwen2 config");
  std::ostringstream text;
  text << in.rdbuf();
  return qwen2_config_from_json(text.str(), path);
}

std::string qwen2_config_to_json(const Qwen2Config& c) {
  json j = {
      {"architectures", {"Qwen2ForCausalLM"}},
      {"model_type", "qwen2"},
      {"hidden_act", "silu"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"attention_bias", c.attention_bias},
      {"initializer_range", c.initializer_range},
      {"torch_dtype", c.torch_dtype},
      {"use_sliding_window", false},
  };
  if (!c.name.empty()) j["_name_or_path"] = c.name;
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  else if (!c.eos_token_ids.empty()) j["eos_token_id"] = c.eos_token_ids;
  if (c.num_experts > 0) {
    j["architectures"] = {"Qwen2MoeForCausalLM"};
    j["model_type"] = "qwen2_moe";
    j["num_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
    j["decoder_sparse_step"] = c.decoder_sparse_step;
    j["mlp_only_layers"] = c.mlp_only_layers;
  }
  return j.dump(2) + "\n";
}

void save_qwen2_config(const Qwen2Config& config, const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot write Qwen2 config");
  out << qwen2_config_to_json(config);
  if (!out.flush()) throw std::runtime_error(path + ": write failed");
}

}  // namespace fedmoe::model
