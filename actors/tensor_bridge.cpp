#include "actors/tensor_bridge.hpp"

#include <stdexcept>

#include <torch/torch.h>

#include "model/lora_expert.hpp"

namespace fedmoe::actors {

static net::DType wire_dtype(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return net::DType::f32;
    case torch::kFloat16: return net::DType::f16;
    case torch::kBFloat16: return net::DType::bf16;
    default:
      throw std::invalid_argument("tensor '" + name + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
                                  "; the wire carries f32, f16 and bf16 only");
  }
}

net::Tensor to_wire(const std::string& name, const at::Tensor& tensor) {
  auto dtype = wire_dtype(tensor, name);
  auto owned = std::make_shared<at::Tensor>(tensor.to(torch::kCPU).contiguous());
  net::Tensor out;
  out.name = name;
  out.dtype = dtype;
  for (auto d : owned->sizes()) out.shape.push_back(static_cast<uint64_t>(d));
  out.data = static_cast<const std::byte*>(owned->data_ptr());
  out.size_bytes = owned->nbytes();
  out.owner = owned;
  return out;
}

std::vector<net::Tensor> to_wire(const std::vector<model::NamedTensor>& tensors) {
  std::vector<net::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(to_wire(t.name, t.tensor));
  return out;
}

at::Tensor from_wire(const net::Tensor& t) {
  torch::Dtype dtype = t.dtype == net::DType::f32 ? torch::kFloat32
                       : t.dtype == net::DType::f16 ? torch::kFloat16
                                                    : torch::kBFloat16;
  std::vector<int64_t> sizes(t.shape.begin(), t.shape.end());
  auto owner = t.owner;  // the deleter holds the wire buffer until torch releases the view
  return torch::from_blob(const_cast<std::byte*>(t.data), sizes, [owner](void*) {},
                          torch::TensorOptions().dtype(dtype));
}

}  // namespace fedmoe::actors
