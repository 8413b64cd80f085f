#include "net/buffer.hpp"

#include <cstring>
#include <list>
#include <mutex>
#include <new>
#include <utility>

namespace fedmoe::net {

namespace {

// 64 bytes: a cache line, and enough for any SIMD load over tensor data; Cap'n Proto needs only 8.
constexpr std::align_val_t kAlignment{64};

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kPoolEnabled = false;
#else
constexpr bool kPoolEnabled = true;
#endif
constexpr size_t kPoolMinBlock = size_t{1} << 20;
constexpr size_t kPoolMaxBytes = size_t{512} << 20;

// Sizes from 1 MiB up round to eighths of their power of two (at most 12.5% slack), so that messages
// of about the same size share blocks.
size_t size_class(size_t n) {
  if (n < kPoolMinBlock) return n;
  int top = 63 - __builtin_clzll(n);
  size_t step = size_t{1} << (top - 3);
  return (n + step - 1) / step * step;
}

class BlockPool {
 public:
  std::byte* take(size_t capacity) {
    std::lock_guard lock(mu_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {  // newest first: likeliest still cached
      if (it->first != capacity) continue;
      std::byte* p = it->second;
      bytes_ -= capacity;
      blocks_.erase(std::next(it).base());
      return p;
    }
    return nullptr;
  }

  void give(std::byte* p, size_t capacity) {
    std::list<std::pair<size_t, std::byte*>> evicted;
    {
      std::lock_guard lock(mu_);
      blocks_.emplace_back(capacity, p);
      bytes_ += capacity;
      while (bytes_ > kPoolMaxBytes) {  // oldest first
        bytes_ -= blocks_.front().first;
        evicted.splice(evicted.end(), blocks_, blocks_.begin());
      }
    }
    for (auto& [cap, block] : evicted) ::operator delete(block, kAlignment);
  }

  size_t bytes() {
    std::lock_guard lock(mu_);
    return bytes_;
  }

 private:
  std::mutex mu_;
  std::list<std::pair<size_t, std::byte*>> blocks_;  // oldest at the front
  size_t bytes_ = 0;
};

// Never destroyed: buffers may still be released while static objects are torn down.
BlockPool& pool() {
  static auto* p = new BlockPool;
  return *p;
}

bool pooled(size_t capacity) { return kPoolEnabled && capacity >= kPoolMinBlock && capacity <= kPoolMaxBytes; }

}  // namespace

void Buffer::Free::operator()(std::byte* p) const {
  if (pooled(capacity)) pool().give(p, capacity);
  else ::operator delete(p, kAlignment);
}

std::shared_ptr<Buffer> Buffer::allocate(size_t size) {
  size_t capacity = size_class(size);
  std::byte* block = pooled(capacity) ? pool().take(capacity) : nullptr;
  // Aligned operator new accepts any size (0 included) and throws std::bad_alloc instead of
  // returning null. Ownership of the block passes hand to hand so that no throwing step leaks it:
  // `owner` frees it if `new Buffer` throws, the shared_ptr deletes the Buffer if its control block
  // cannot be allocated.
  if (!block) block = static_cast<std::byte*>(::operator new(capacity, kAlignment));
  std::unique_ptr<std::byte, Free> owner(block, Free{capacity});
  Buffer* buffer = new Buffer(block, size, capacity);
  owner.release();
  return std::shared_ptr<Buffer>(buffer);
}

std::shared_ptr<Buffer> Buffer::copy_of(const void* data, size_t size) {
  auto buffer = allocate(size);
  if (size > 0) std::memcpy(buffer->data(), data, size);
  return buffer;
}

size_t Buffer::pooled_bytes() { return pool().bytes(); }

}  // namespace fedmoe::net
