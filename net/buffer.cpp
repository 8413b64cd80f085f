#include "net/buffer.hpp"

#include <cstring>
#include <new>

namespace fedmoe::net {

namespace {
// 64 bytes: a cache line, and enough for any SIMD load over tensor data; Cap'n Proto needs only 8.
constexpr std::align_val_t kAlignment{64};
}  // namespace

void Buffer::Free::operator()(std::byte* p) const { ::operator delete(p, kAlignment); }

std::shared_ptr<Buffer> Buffer::allocate(size_t size) {
  // Aligned operator new accepts any size (0 included) and throws std::bad_alloc instead of
  // returning null. Ownership of the block passes hand to hand so that no throwing step leaks it:
  // `block` frees it if `new Buffer` throws, the shared_ptr deletes the Buffer if its control block
  // cannot be allocated.
  std::unique_ptr<std::byte, Free> block(static_cast<std::byte*>(::operator new(size, kAlignment)));
  Buffer* buffer = new Buffer(block.get(), size);
  block.release();
  return std::shared_ptr<Buffer>(buffer);
}

std::shared_ptr<Buffer> Buffer::copy_of(const void* data, size_t size) {
  auto buffer = allocate(size);
  if (size > 0) std::memcpy(buffer->data(), data, size);
  return buffer;
}

}  // namespace fedmoe::net
