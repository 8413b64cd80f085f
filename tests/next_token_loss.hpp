// The loss every parity check uses (tests/reference/*.py, the Hugging Face kit, scripts/cuda-check):
// mean next-token cross-entropy over pairs of real tokens. No Catch2 here: tests/cuda_check.cpp,
// which runs on GPU machines without it, includes this too.
#pragma once

#include <torch/torch.h>

namespace fedmoe::test {

// logits [B, T, V], ids [B, T], mask [B, T] 0/1 -> scalar.
inline torch::Tensor next_token_loss(const torch::Tensor& logits, const torch::Tensor& ids, const torch::Tensor& mask) {
  using namespace torch::indexing;
  auto valid = mask.index({Slice(), Slice(None, -1)}).to(torch::kBool) &
               mask.index({Slice(), Slice(1, None)}).to(torch::kBool);
  auto labels = ids.index({Slice(), Slice(1, None)}).masked_fill(valid.logical_not(), -100);
  auto l = logits.index({Slice(), Slice(None, -1)});
  return torch::nn::functional::cross_entropy(l.reshape({-1, l.size(-1)}), labels.reshape({-1}),
                                              torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
}

}  // namespace fedmoe::test
