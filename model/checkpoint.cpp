#include "model/checkpoint.hpp"

#include <filesystem>
#include <stdexcept>

#include <torch/torch.h>

namespace fedmoe::model {

namespace fs = std::filesystem;

namespace {

torch::Dtype torch_dtype(SafetensorsDtype d, const std::string& where) {
  switch (d) {
    case SafetensorsDtype::F32: return torch::kFloat32;
    case SafetensorsDtype::F16: return torch::kFloat16;
    case SafetensorsDtype::BF16: return torch::kBFloat16;
    case SafetensorsDtype::F64: return torch::kFloat64;
    case SafetensorsDtype::I64: return torch::kInt64;
    case SafetensorsDtype::I32: return torch::kInt32;
    case SafetensorsDtype::I16: return torch::kInt16;
    case SafetensorsDtype::I8: return torch::kInt8;
    case SafetensorsDtype::U8: return torch::kUInt8;
    case SafetensorsDtype::BOOL: return torch::kBool;
    default: throw std::runtime_error(where + ": dtype " + to_string(d) + " has no LibTorch equivalent here");
  }
}

SafetensorsDtype file_dtype(torch::Dtype d, const std::string& name) {
  switch (d) {
    case torch::kFloat32: return SafetensorsDtype::F32;
    case torch::kFloat16: return SafetensorsDtype::F16;
    case torch::kBFloat16: return SafetensorsDtype::BF16;
    case torch::kFloat64: return SafetensorsDtype::F64;
    case torch::kInt64: return SafetensorsDtype::I64;
    case torch::kInt32: return SafetensorsDtype::I32;
    case torch::kInt16: return SafetensorsDtype::I16;
    case torch::kInt8: return SafetensorsDtype::I8;
    case torch::kUInt8: return SafetensorsDtype::U8;
    case torch::kBool: return SafetensorsDtype::BOOL;
    default: throw std::invalid_argument("tensor '" + name + "': dtype " + std::string(c10::toString(d)) + " cannot be saved");
  }
}

torch::Tensor to_torch(const TensorView& v, const std::string& where) {
  auto dtype = torch_dtype(v.dtype, where + ": tensor '" + v.name + "'");
  auto options = torch::TensorOptions().dtype(dtype);
  if (v.nbytes == 0) return torch::empty(v.shape, options);
  auto file = v.file;  // the deleter holds the mapping open for as long as the tensor lives
  auto borrowed = torch::from_blob(const_cast<std::byte*>(v.data), v.shape, [file](void*) {}, options);
  return v.aligned() ? borrowed : borrowed.clone();
}

std::map<std::string, torch::Tensor> to_map(const std::vector<TensorView>& views, const std::string& where) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& v : views) out.emplace(v.name, to_torch(v, where));
  return out;
}

std::vector<TensorRef> refs(const std::map<std::string, torch::Tensor>& tensors,
                            std::vector<torch::Tensor>& keep_alive) {
  std::vector<TensorRef> out;
  for (const auto& [name, t] : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    keep_alive.push_back(c);
    out.push_back({name, file_dtype(c.scalar_type(), name), c.sizes().vec(), c.data_ptr(), c.nbytes()});
  }
  return out;
}

}  // namespace

std::map<std::string, torch::Tensor> read_safetensors(const std::string& path) {
  if (fs::is_directory(path)) return to_map(SafetensorsCheckpoint::open(path).tensors(), path);
  return to_map(SafetensorsFile::open(path)->tensors(), path);
}

void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<torch::Tensor> keep;
  model::write_safetensors(fs::path(path), refs(tensors, keep), metadata);
}

Qwen2ForCausalLM load_pretrained(const std::string& dir, torch::Dtype dtype) {
  auto config_path = fs::path(dir) / "config.json";
  if (!fs::exists(config_path)) throw std::runtime_error(dir + ": no config.json (expected a Hugging Face model directory)");
  auto config = load_qwen2_config(config_path.string());
  Qwen2ForCausalLM model(config, dtype);
  auto tensors = to_map(SafetensorsCheckpoint::open(dir).tensors(), dir);
  try {
    load_state_dict(model, tensors, /*strict=*/true);
  } catch (const std::exception& e) {
    throw std::runtime_error(dir + ": " + e.what());
  }
  return model;
}

void save_pretrained(const Qwen2ForCausalLM& model, const std::string& dir, uint64_t max_shard_bytes) {
  fs::create_directories(dir);
  // config.json's torch_dtype says how the weights are stored (HF writes the model's dtype), so a
  // reader with dtype="auto" gets what is in the file.
  auto config = model->config();
  const auto stored = model->model->embed_tokens->weight.scalar_type();
  config.torch_dtype = stored == torch::kBFloat16 ? "bfloat16" : stored == torch::kFloat16 ? "float16" : "float32";
  save_qwen2_config(config, (fs::path(dir) / "config.json").string());
  std::vector<torch::Tensor> keep;
  write_sharded(fs::path(dir), refs(state_dict(model), keep), max_shard_bytes, {{"format", "pt"}});
}

void save_peft_adapter(const LoraExperts& experts, const std::string& name, const std::string& dir,
                       const std::string& base_model_name_or_path) {
  fs::create_directories(dir);
  save_adapter_config(experts.spec(name), base_model_name_or_path, (fs::path(dir) / "adapter_config.json").string());
  write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), experts.adapter_state_dict(name),
                    {{"format", "pt"}});
}

void load_peft_adapter(LoraExperts& experts, const std::string& name, const std::string& dir) {
  auto spec = load_adapter_config((fs::path(dir) / "adapter_config.json").string());
  auto tensors = read_safetensors((fs::path(dir) / "adapter_model.safetensors").string());
  try {
    experts.import_adapter(name, spec, tensors);
  } catch (const std::exception& e) {
    throw std::runtime_error(dir + ": " + e.what());
  }
}

}  // namespace fedmoe::model
