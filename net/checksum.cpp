#include "net/checksum.hpp"

#include <bit>
#include <cstring>

namespace fedmoe::net {

// This is XXH64 (xxHash, 64-bit), bit for bit: a published algorithm with good distribution, test
// vectors and implementations in every language, so a peer or a script can verify a receipt's checksum.

namespace {

// XXH64's primes: odd 64-bit constants with well-spread bits.
constexpr uint64_t K1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t K2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t K3 = 0x165667B19E3779F9ull;
constexpr uint64_t K4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t K5 = 0x27D4EB2F165667C5ull;

// memcpy is the portable unaligned load: compilers turn it into one mov, and it is free of the
// alignment and aliasing UB a pointer cast would have.
uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint32_t load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One lane step: the multiply spreads the word's low bits upwards, the rotation brings high bits back
// down, the second multiply mixes them with the lane's history.
uint64_t round(uint64_t lane, uint64_t word) {
  lane += word * K2;
  lane = std::rotl(lane, 31);
  return lane * K1;
}

uint64_t merge(uint64_t h, uint64_t lane) {
  h ^= round(0, lane);
  return h * K1 + K4;
}

// Final avalanche: every input bit affects every output bit.
uint64_t avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= K2;
  h ^= h >> 29;
  h *= K3;
  h ^= h >> 32;
  return h;
}

}  // namespace

uint64_t checksum(const void* data, size_t size, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + size;
  uint64_t h;

  if (size >= 32) {
    // Four independent lanes: their multiplies have no dependency on each other, so the CPU runs them
    // in parallel and the loop streams at memory speed rather than at one multiply latency per word.
    uint64_t v1 = seed + K1 + K2;
    uint64_t v2 = seed + K2;
    uint64_t v3 = seed;
    uint64_t v4 = seed - K1;
    const unsigned char* const block_end = p + (size & ~size_t{31});
    for (; p < block_end; p += 32) {
      v1 = round(v1, load64(p));
      v2 = round(v2, load64(p + 8));
      v3 = round(v3, load64(p + 16));
      v4 = round(v4, load64(p + 24));
    }
    h = std::rotl(v1, 1) + std::rotl(v2, 7) + std::rotl(v3, 12) + std::rotl(v4, 18);
    h = merge(h, v1);
    h = merge(h, v2);
    h = merge(h, v3);
    h = merge(h, v4);
  } else {
    h = seed + K5;
  }

  // The length goes in so that inputs differing only by trailing zero bytes differ.
  h += static_cast<uint64_t>(size);

  // Tail (< 32 bytes): whole words, then a half word, then single bytes.
  for (; end - p >= 8; p += 8) {
    h ^= round(0, load64(p));
    h = std::rotl(h, 27) * K1 + K4;
  }
  if (end - p >= 4) {
    h ^= static_cast<uint64_t>(load32(p)) * K1;
    h = std::rotl(h, 23) * K2 + K3;
    p += 4;
  }
  for (; p < end; ++p) {
    h ^= static_cast<uint64_t>(*p) * K5;
    h = std::rotl(h, 11) * K1;
  }
  return avalanche(h);
}

uint64_t checksum(const std::vector<Tensor>& tensors) {
  // Each call folds in its length, so chaining keeps the boundaries between names and data: moving a
  // byte from one name or tensor to the next changes the result.
  uint64_t h = 0;
  for (const Tensor& t : tensors) {
    h = checksum(t.name.data(), t.name.size(), h);
    h = checksum(t.data, t.size_bytes, h);
  }
  return h;
}

}  // namespace fedmoe::net
