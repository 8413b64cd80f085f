// A fast, non-cryptographic 64-bit checksum used to verify that bulk transfers arrived intact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "net/messages.hpp"

namespace fedmoe::net {

// Streams at several GB/s (four independent 64-bit lanes); depends on content, length and seed.
uint64_t checksum(const void* data, size_t size, uint64_t seed = 0);

// Chains checksum() over each tensor's name and data in order.
uint64_t checksum(const std::vector<Tensor>& tensors);

}  // namespace fedmoe::net
