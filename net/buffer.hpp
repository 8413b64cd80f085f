// An immutable, word-aligned byte buffer: what a received message lives in. Decoded tensors point
// into it and hold it alive through Tensor::owner.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace fedmoe::net {

class Buffer {
 public:
  // Uninitialized storage of `size` bytes, aligned to 64 bytes (Cap'n Proto needs 8).
  static std::shared_ptr<Buffer> allocate(size_t size);
  static std::shared_ptr<Buffer> copy_of(const void* data, size_t size);

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free { void operator()(std::byte* p) const; };
  Buffer(std::byte* p, size_t n) : data_(p), size_(n) {}
  std::unique_ptr<std::byte, Free> data_;
  size_t size_ = 0;
};

}  // namespace fedmoe::net
