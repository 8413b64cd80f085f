// Encoding and bounded decoding between net::Message and the Cap'n Proto wire format.
//
// Decoding is total: any byte string yields either a Message or a DecodeError naming what was wrong;
// no exception escapes, no input can make it allocate more than DecodeLimits allows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "net/buffer.hpp"
#include "net/messages.hpp"

namespace fedmoe::net {

enum class DecodeErrc : uint8_t {
  too_large,            // message bigger than limits.max_message_bytes
  truncated,            // fewer bytes than the segment table announces / not a whole number of words
  bad_segment_table,    // segment count or sizes impossible
  traversal_limit,      // the message points at more data than it contains (or than the limit allows)
  nesting_limit,        // pointers nested deeper than limits.nesting_limit
  malformed,            // any other structural Cap'n Proto error (bad pointer, wrong kind of pointer...)
  unknown_body,         // union discriminant this build does not know
  unknown_enum,         // enum value outside the schema (dtype, role, reject reason...)
  invalid_text,         // empty or over-long id, bad characters in a name, text not UTF-8
  too_many_elements,    // a list longer than the limits allow (tensors, dims, replicas...)
  bad_shape,            // rank too high, or element count overflows
  byte_count_mismatch,  // tensor data size != product(shape) * dtype size
  transfer_failed,      // (transport) a bulk message could not be fetched from its sender
};

const char* to_string(DecodeErrc e);

struct DecodeError {
  DecodeErrc code;
  std::string detail;  // names the field / tensor and the offending values
  std::string message() const;  // "<code>: <detail>"
};

struct DecodeLimits {
  uint64_t max_message_bytes = uint64_t{4} << 30;  // 4 GiB
  // Words the reader may traverse; 0 = twice the message size (every word once, with headroom for
  // legitimately shared far pointers) plus 1024.
  uint64_t traversal_limit_words = 0;
  int nesting_limit = 16;               // the schema's real depth is 5
  uint32_t max_segments = 512;
  size_t max_list_elements = 1u << 20;  // replicas, choices, expert refs, target modules...
  size_t max_tensors = 1u << 16;
  size_t max_rank = 8;
  size_t max_name_bytes = 512;          // ids, tensor names
  size_t max_text_bytes = 64u << 20;    // prompts, generated text, status JSON
};

// Success or a DecodeError.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(DecodeError e) : v_(std::move(e)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T* operator->() { return &value(); }
  T& operator*() { return value(); }
  const DecodeError& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, DecodeError> v_;
};

// A message built for sending. Tensor bytes are referenced, not copied: the Encoded object keeps the
// tensors' owners alive. The wire form is the standard Cap'n Proto stream framing (segment table,
// then segments), available as a list of pieces for gather-writes or flattened into one Buffer.
class Encoded {
 public:
  struct Piece {
    const std::byte* data;
    size_t size;
  };
  ~Encoded();
  Encoded(Encoded&&) noexcept;
  Encoded& operator=(Encoded&&) noexcept;

  size_t size_bytes() const { return size_; }
  const std::vector<Piece>& pieces() const { return pieces_; }
  std::shared_ptr<Buffer> flatten() const;
  void copy_to(std::byte* dst) const;  // dst must hold size_bytes()

 private:
  friend Encoded encode(const Message& m);
  struct Impl;
  explicit Encoded(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::vector<Piece> pieces_;
  size_t size_ = 0;
};

// Throws std::invalid_argument for a message that must not be sent (tensor bytes not matching its
// shape, a list too long for Cap'n Proto): a programming error on the sending side.
Encoded encode(const Message& m);

// Decodes a whole framed message; decoded tensors point into `bytes` and keep it alive.
Result<Message> decode(std::shared_ptr<const Buffer> bytes, const DecodeLimits& limits = {});
// Same, for bytes of unknown alignment and lifetime: copies them once into a Buffer.
Result<Message> decode_copy(const void* data, size_t size, const DecodeLimits& limits = {});

}  // namespace fedmoe::net
