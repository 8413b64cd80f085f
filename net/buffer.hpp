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
  //
  // Blocks of 1 MiB and more are recycled through a small per-process pool (512 MiB at most): a
  // fresh block costs a page fault per 4 KiB on first touch (~0.4 ms per MiB measured here, as much
  // as receiving the bytes), and a node that keeps the newest snapshot and frees the previous one
  // would otherwise pay that on every message. Sanitizer builds bypass the pool so that
  // AddressSanitizer still sees every use after free.
  static std::shared_ptr<Buffer> allocate(size_t size);
  static std::shared_ptr<Buffer> copy_of(const void* data, size_t size);

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }

  // Bytes currently parked in the pool (for tests and status).
  static size_t pooled_bytes();

 private:
  struct Free {
    size_t capacity;  // the block's real size: its pool size class
    void operator()(std::byte* p) const;
  };
  Buffer(std::byte* p, size_t n, size_t capacity) : data_(p, Free{capacity}), size_(n) {}
  std::unique_ptr<std::byte, Free> data_;
  size_t size_ = 0;
};

}  // namespace fedmoe::net
