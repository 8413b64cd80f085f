#include "net/messages.hpp"

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>

namespace fedmoe::net {

// The switches below list every enumerator; the trailing return covers values cast in from outside
// the enum's range (a caller's bug), which must still print as something.

const char* to_string(Role r) {
  switch (r) {
    case Role::unknown: return "unknown";
    case Role::coordinator: return "coordinator";
    case Role::worker: return "worker";
    case Role::shard: return "shard";
    case Role::router: return "router";
    case Role::sim: return "sim";
    case Role::client: return "client";
  }
  return "invalid";
}

const char* to_string(DeviceKind d) {
  switch (d) {
    case DeviceKind::unknown: return "unknown";
    case DeviceKind::cpu: return "cpu";
    case DeviceKind::cuda: return "cuda";
  }
  return "invalid";
}

const char* to_string(DType d) {
  switch (d) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
  }
  return "invalid";
}

const char* to_string(RejectReason r) {
  switch (r) {
    case RejectReason::unknown: return "unknown";
    case RejectReason::too_stale: return "too_stale";
    case RejectReason::non_finite: return "non_finite";
    case RejectReason::shape_mismatch: return "shape_mismatch";
    case RejectReason::unknown_expert: return "unknown_expert";
    case RejectReason::duplicate_update: return "duplicate_update";
    case RejectReason::malformed: return "malformed";
    case RejectReason::not_replica: return "not_replica";
    case RejectReason::overloaded: return "overloaded";
    case RejectReason::not_enough_replicas: return "not_enough_replicas";
    case RejectReason::storage_error: return "storage_error";
  }
  return "invalid";
}

const char* to_string(EntryKind k) {
  switch (k) {
    case EntryKind::buffered: return "buffered";
    case EntryKind::applied: return "applied";
    case EntryKind::round_closed: return "round_closed";
  }
  return "invalid";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
  }
  throw std::invalid_argument("dtype_size: invalid dtype " + std::to_string(static_cast<int>(d)));
}

// Throws std::overflow_error when the product does not fit: a wrapped-around count would make a bad
// shape look consistent with a small byte count. A zero dimension makes the product 0 whatever the
// others are, so it is looked for first.
uint64_t Tensor::numel() const {
  if (std::find(shape.begin(), shape.end(), uint64_t{0}) != shape.end()) return 0;
  uint64_t n = 1;
  for (uint64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n)) {
      throw std::overflow_error("tensor '" + name + "': element count overflows uint64");
    }
  }
  return n;
}

Tensor Tensor::owning(std::string name, DType dtype, std::vector<uint64_t> shape,
                      std::vector<std::byte> bytes) {
  Tensor t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.shape = std::move(shape);
  uint64_t expected = 0;
  bool overflow = false;
  try {
    overflow = __builtin_mul_overflow(t.numel(), dtype_size(dtype), &expected);
  } catch (const std::overflow_error&) {
    overflow = true;
  }
  if (overflow || expected != bytes.size()) {
    throw std::invalid_argument("Tensor::owning: tensor '" + t.name + "' has " + std::to_string(bytes.size()) +
                                " bytes, its shape and dtype need " +
                                (overflow ? std::string("more than 2^64") : std::to_string(expected)));
  }
  // The vector's heap block moves into the owner, so `data` stays valid as long as the owner lives.
  auto owner = std::make_shared<std::vector<std::byte>>(std::move(bytes));
  t.data = owner->data();
  t.size_bytes = owner->size();
  t.owner = std::move(owner);
  return t;
}

const char* body_name(const Body& b) {
  // Indexed like Body's alternatives, which follow the schema's union order.
  static constexpr const char* kNames[] = {
      "hello",           "helloAck",       "heartbeat",    "leave",         "expertSpec",
      "snapshotRequest", "expertSnapshot", "snapshotReceipt", "updatePush", "updateAck",
      "updateReject",    "placementMap",   "routeRequest", "routeReply",    "generateRequest",
      "generateReply",   "statusRequest",  "statusReply",  "errorReply",
      "versionNotice",   "roundClose",     "replicaAppend", "replicaAck",  "isrChange",
  };
  static_assert(std::size(kNames) == std::variant_size_v<Body>);
  if (b.valueless_by_exception()) return "valueless";
  return kNames[b.index()];
}

}  // namespace fedmoe::net
