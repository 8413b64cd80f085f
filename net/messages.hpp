// Plain C++ mirrors of the wire schema (net/fedmoe.capnp). Actors and the model layer work with these
// structs; net/codec converts them to and from Cap'n Proto. No torch here: a tensor is bytes + dtype + shape.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <variant>
#include <vector>

namespace fedmoe::net {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fedmoe's wire tensors are little-endian");

enum class Role : uint8_t { unknown, coordinator, worker, shard, router, sim, client };
enum class DeviceKind : uint8_t { unknown, cpu, cuda };
enum class DType : uint8_t { f32, f16, bf16 };
enum class EntryKind : uint8_t { buffered, applied, round_closed };
enum class RejectReason : uint8_t {
  unknown, too_stale, non_finite, shape_mismatch, unknown_expert, duplicate_update, malformed,
  not_replica, overloaded, not_enough_replicas, storage_error
};

const char* to_string(Role r);
const char* to_string(DeviceKind d);
const char* to_string(DType d);
const char* to_string(RejectReason r);
const char* to_string(EntryKind k);
size_t dtype_size(DType d);

// A read-only view of tensor bytes, kept alive by `owner` (a decoded message buffer, a std::vector
// the producer handed over, a torch tensor's storage...). Encoding references `data` without copying.
struct Tensor {
  std::string name;
  DType dtype = DType::f32;
  std::vector<uint64_t> shape;
  const std::byte* data = nullptr;
  size_t size_bytes = 0;
  std::shared_ptr<const void> owner;

  uint64_t numel() const;
  // Owns a copy-free move of `bytes`; bytes.size() must equal numel * dtype_size.
  static Tensor owning(std::string name, DType dtype, std::vector<uint64_t> shape,
                       std::vector<std::byte> bytes);
};

// --- membership
struct Hello {
  std::string node_id;
  Role role = Role::unknown;
  DeviceKind device = DeviceKind::unknown;
  std::string device_name;
  double declared_speed = 1.0;
  double measured_speed = 0.0;
  std::string endpoint;
  uint32_t protocol_version = 1;
  std::string expert;  // a worker's preferred expert ("" = the coordinator chooses)
};
struct HelloAck {
  bool accepted = false;
  uint64_t lease_ms = 0;
  std::string reason;
  std::string coordinator_id;
};
struct Heartbeat {
  std::string node_id;
  uint64_t seq = 0;
  float load = 0;
  double measured_speed = 0;
};
struct Leave {
  std::string node_id;
  std::string reason;
};

// --- experts
struct ExpertSpec {
  std::string expert_id;
  std::string domain;
  uint32_t lora_rank = 16;
  float lora_alpha = 32;
  float lora_dropout = 0;
  std::vector<std::string> target_modules;
  std::string base_model_id;
  bool use_rslora = false;
  bool removed = false;  // to a coordinator: unregister the expert
};
struct SnapshotRequest {
  std::string expert_id;
  uint64_t min_version = 0;
  bool subscribe = false;
};
struct RoundClose {
  std::string expert_id;
  uint64_t round_version = 0;
};
struct VersionNotice {
  std::string expert_id;
  uint64_t version = 0;
  std::string shard_id;
};
struct LogEntry;
struct ExpertSnapshot {
  ExpertSpec spec;
  uint64_t version = 0;
  std::vector<Tensor> tensors;
  std::vector<std::string> seen_update_ids;  // only when a primary seeds a replica
  uint64_t term = 0;                         // a seeding primary's term (0 = not from a primary)
  uint64_t lsn = 0;                          // the last log entry it holds, pending ones included
  std::vector<LogEntry> pending;             // accepted, not yet in a version (buffered entries)
};
struct SnapshotReceipt {
  std::string expert_id;
  uint64_t version = 0;
  uint32_t tensor_count = 0;
  uint64_t byte_count = 0;
  uint64_t checksum = 0;
  uint64_t lsn = 0;
  uint64_t term = 0;
};

// --- updates
struct UpdatePush {
  std::string expert_id;
  std::string worker_id;
  std::string update_id;
  uint64_t base_version = 0;
  uint64_t sample_count = 0;
  float train_loss = 0;
  std::vector<Tensor> deltas;
  uint32_t local_steps = 0;
  double compute_seconds = 0;
};
struct UpdateAck {
  std::string expert_id;
  std::string update_id;
  uint64_t new_version = 0;
  uint64_t staleness = 0;
  double weight = 0;
};
struct UpdateReject {
  std::string expert_id;
  std::string update_id;
  RejectReason reason = RejectReason::unknown;
  std::string detail;
  uint64_t current_version = 0;
};

// --- replication (see the schema: one log per expert, written by its primary)
struct LogEntry {
  uint64_t lsn = 0;
  uint64_t term = 0;
  EntryKind kind = EntryKind::buffered;
  uint64_t version = 0;        // the expert's version after the entry
  bool has_update = false;     // false for round_closed
  UpdatePush update;           // buffered: with deltas; applied: without
  std::vector<Tensor> tensors; // applied, round_closed: all weights of the new version
  uint64_t staleness = 0;
  double weight = 0;
};
struct ReplicaAppend {
  std::string expert_id;
  uint64_t term = 0;
  uint64_t committed_lsn = 0;
  std::vector<LogEntry> entries;
};
struct ReplicaAck {
  std::string expert_id;
  uint64_t term = 0;
  uint64_t lsn = 0;
  uint64_t version = 0;
  uint64_t checksum = 0;
  std::string refused;  // "" = applied
};
struct IsrChange {
  std::string expert_id;
  uint64_t term = 0;
  std::vector<std::string> in_sync;
  std::string reason;
};

// --- placement
struct Replica {
  std::string shard_id;
  std::string endpoint;
  uint64_t version = 0;
  bool alive = false;
};
struct ExpertPlacement {
  std::string expert_id;
  std::vector<Replica> replicas;
  uint64_t term = 0;                 // grows whenever the primary changes
  std::vector<std::string> in_sync;  // primary first
  uint32_t min_in_sync = 1;
};
struct Assignment {
  std::string worker_id;
  std::string expert_id;
};
struct PlacementMap {
  uint64_t epoch = 0;
  std::vector<ExpertPlacement> placements;
  std::vector<Assignment> assignments;
};

// --- inference
struct ExpertRef {
  std::string expert_id;
  uint64_t version = 0;
};
struct RouteRequest {
  uint64_t request_id = 0;
  std::string prompt;
  uint32_t max_experts = 1;
};
struct RouteChoice {
  std::string expert_id;
  uint64_t version = 0;
  float score = 0;
  std::string shard_id;
  std::string reason;
};
struct RouteReply {
  uint64_t request_id = 0;
  std::vector<RouteChoice> choices;
};
struct GenerateRequest {
  uint64_t request_id = 0;
  std::string prompt;
  std::vector<ExpertRef> experts;
  uint32_t max_new_tokens = 64;
  float temperature = 0;
  uint32_t top_k = 0;
  float top_p = 1;
  uint64_t seed = 0;
  bool stream = false;
  uint32_t max_experts = 0;
  std::string combine;
};
struct GenerateReply {
  uint64_t request_id = 0;
  std::string text;
  std::vector<ExpertRef> experts;
  bool done = true;
  std::string error;
  std::vector<RouteChoice> choices;
  std::string combine;
};

// --- status and errors
struct StatusRequest {
  uint64_t request_id = 0;
  bool verbose = false;
};
struct StatusReply {
  uint64_t request_id = 0;
  std::string node_id;
  Role role = Role::unknown;
  std::string json;
};
struct ErrorReply {
  std::string code;
  std::string detail;
};

// The order of alternatives is the order of the schema's `Envelope.body` union.
using Body = std::variant<Hello, HelloAck, Heartbeat, Leave, ExpertSpec, SnapshotRequest, ExpertSnapshot,
                          SnapshotReceipt, UpdatePush, UpdateAck, UpdateReject, PlacementMap, RouteRequest,
                          RouteReply, GenerateRequest, GenerateReply, StatusRequest, StatusReply, ErrorReply,
                          VersionNotice, RoundClose, ReplicaAppend, ReplicaAck, IsrChange>;

struct Message {
  std::string sender_id;
  uint64_t correlation_id = 0;
  int64_t sent_at_unix_ms = 0;
  Body body;
};

const char* body_name(const Body& b);

}  // namespace fedmoe::net
