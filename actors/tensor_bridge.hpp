// Converts between LibTorch tensors (model/) and wire tensors (net/) without copying the data when
// the tensor is already contiguous on the CPU.
#pragma once

#include <string>
#include <vector>

#include "net/messages.hpp"

namespace at { class Tensor; }  // keeps <torch/torch.h> out of everything that includes this header
namespace fedmoe::model { struct NamedTensor; }

namespace fedmoe::actors {

// f32/f16/bf16 only; other dtypes throw std::invalid_argument. The wire tensor keeps the torch
// storage alive through its owner.
net::Tensor to_wire(const std::string& name, const at::Tensor& t);
std::vector<net::Tensor> to_wire(const std::vector<model::NamedTensor>& tensors);

// A CPU tensor viewing the wire bytes (no copy) that keeps the wire buffer alive. The wire buffer is
// read-only: clone() before modifying.
at::Tensor from_wire(const net::Tensor& t);

}  // namespace fedmoe::actors
