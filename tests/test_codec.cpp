// Tests of net/codec, net/messages, net/buffer and net/checksum: round trips of every message kind,
// zero-copy behaviour, the stream framing, every DecodeErrc on crafted input, fuzzed input, checksums.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include "net/buffer.hpp"
#include "net/checksum.hpp"
#include "net/codec.hpp"
#include "net/fedmoe.capnp.h"
#include "net/random_id.hpp"
#include "net/text.hpp"

using namespace fedmoe::net;
namespace schema = fedmoe::schema;

// Catch prints enums by their underlying uint8_t, i.e. as characters: print their names instead.
namespace Catch {
template <>
struct StringMaker<DecodeErrc> {
  static std::string convert(DecodeErrc e) { return to_string(e); }
};
template <>
struct StringMaker<DType> {
  static std::string convert(DType e) { return to_string(e); }
};
template <>
struct StringMaker<Role> {
  static std::string convert(Role e) { return to_string(e); }
};
template <>
struct StringMaker<DeviceKind> {
  static std::string convert(DeviceKind e) { return to_string(e); }
};
template <>
struct StringMaker<RejectReason> {
  static std::string convert(RejectReason e) { return to_string(e); }
};
}  // namespace Catch

namespace {

// --- test data --------------------------------------------------------------------------------------

std::vector<std::byte> pattern(size_t n, uint32_t seed) {
  std::vector<std::byte> out(n);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : out) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<std::byte>(x >> 24);
  }
  return out;
}

Tensor make_tensor(std::string name, DType dtype, std::vector<uint64_t> shape, uint32_t seed) {
  uint64_t numel = 1;
  for (uint64_t d : shape) numel *= d;
  auto bytes = pattern(numel * dtype_size(dtype), seed);
  return Tensor::owning(std::move(name), dtype, std::move(shape), std::move(bytes));
}

// f32, f16 and bf16; whole-word and partial-word byte counts (the latter are copied by encode, the
// former referenced); a scalar and an empty tensor.
std::vector<Tensor> sample_tensors(uint32_t seed) {
  return {
      make_tensor("layers.0.q_proj.lora_A", DType::f32, {8, 16}, seed),
      make_tensor("layers.0.q_proj.lora_B", DType::f16, {3, 5}, seed + 1),
      make_tensor("layers.0.v_proj.lora_A", DType::bf16, {2, 2, 4}, seed + 2),
      make_tensor("scale", DType::f32, {}, seed + 3),
      make_tensor("empty", DType::f16, {0, 7}, seed + 4),
  };
}

ExpertSpec sample_spec() {
  ExpertSpec s;
  s.expert_id = "expert-python";
  s.domain = "python";
  s.lora_rank = 8;
  s.lora_alpha = 16.5f;
  s.lora_dropout = 0.125f;
  s.target_modules = {"q_proj", "v_proj", "o_proj"};
  s.base_model_id = "Qwen/Qwen2.5-0.5B";
  s.use_rslora = true;
  s.removed = true;
  return s;
}

// Log entries from `lsn` on: buffered (with deltas), applied (weights), round closed (weights, no update).
std::vector<LogEntry> sample_entries(uint64_t lsn, size_t n) {
  std::vector<LogEntry> out;
  for (size_t i = 0; i < n; ++i) {
    LogEntry e;
    e.lsn = lsn + i;
    e.term = 5;
    e.kind = static_cast<EntryKind>(i % 3);
    e.version = 40 + i;
    e.has_update = e.kind != EntryKind::round_closed;
    if (e.has_update) e.update = UpdatePush{"expert-sql", "worker-3", "upd-" + std::to_string(lsn + i), 39, 64, 0.5f,
                                            e.kind == EntryKind::buffered ? sample_tensors(3) : std::vector<Tensor>{}, 4, 1.5};
    if (e.kind != EntryKind::buffered) e.tensors = sample_tensors(4);
    e.staleness = 1 + i;
    e.weight = 0.25 * double(i + 1);
    out.push_back(std::move(e));
  }
  return out;
}

PlacementMap sample_placement_map() {
  PlacementMap p;
  p.epoch = 7;
  p.placements = {
      {"expert-python", {{"shard-a", "10.0.0.1:7001", 42, true}}, 3, {"shard-a"}, 1},
      {"expert-sql", {{"shard-a", "10.0.0.1:7001", 3, true}, {"shard-b", "10.0.0.2:7001", 2, false}}, 9, {"shard-a", "shard-b"}, 2},
      {"expert-docs",
       {{"shard-b", "10.0.0.2:7001", 9, true}, {"shard-c", "10.0.0.3:7001", 9, true}, {"shard-d", "", 8, false}},
       1,
       {"shard-c", "shard-b"},
       2},
  };
  p.assignments = {{"worker-1", "expert-python"}, {"worker-2", "expert-sql"}};
  return p;
}

// One body of each kind, in Body's alternative order, every field away from its default.
std::vector<Body> sample_bodies() {
  std::vector<Body> bodies;
  bodies.push_back(Hello{"node-7", Role::client, DeviceKind::cuda, "NVIDIA H100 80GB HBM3", 2.5, 3.25,
                         "10.0.0.7:4242", 3, "expert-sql"});
  bodies.push_back(HelloAck{true, 15000, "welcome back", "coord-1"});
  bodies.push_back(Heartbeat{"worker-3", 99, 2.75f, 1.5});
  bodies.push_back(Leave{"worker-3", "shutdown requested"});
  bodies.push_back(sample_spec());
  bodies.push_back(SnapshotRequest{"expert-sql", 41, true});
  bodies.push_back(ExpertSnapshot{sample_spec(), 42, sample_tensors(10), {"w1-r1-7", "w2-r4-9"}, 5, 77, sample_entries(76, 2)});
  bodies.push_back(SnapshotReceipt{"expert-sql", 42, 5, 123456, 0xDEADBEEFCAFEF00Dull, 77, 5});
  bodies.push_back(UpdatePush{"expert-python", "worker-3", "upd-0001", 40, 512, 0.875f, sample_tensors(20), 25, 12.5});
  bodies.push_back(UpdateAck{"expert-python", "upd-0001", 43, 3, 0.625});
  bodies.push_back(UpdateReject{"expert-python", "upd-0002", RejectReason::overloaded, "queue full", 43});
  bodies.push_back(sample_placement_map());
  bodies.push_back(RouteRequest{11, "write a SQL query \xE2\x9C\x93", 3});
  bodies.push_back(RouteReply{11, {{"expert-sql", 3, 0.75f, "shard-a", "rule sql:\\bselect\\b"}, {"expert-docs", 9, 0.25f, "shard-c", ""}}});
  bodies.push_back(GenerateRequest{12, "def f():\n\t", {{"expert-python", 42}, {"expert-docs", 0}}, 128, 0.7f, 40,
                                   0.9f, 1234, true, 2, "consensus"});
  bodies.push_back(GenerateReply{12, "return 42 \xE2\x80\x94 ok", {{"expert-python", 42}}, false, "partial",
                                 {{"expert-python", 42, 0.5f, "shard-b", "learned p=0.50"}}, "stitch"});
  bodies.push_back(StatusRequest{13, true});
  bodies.push_back(StatusReply{13, "coord-1", Role::coordinator, "{\"nodes\": 3}"});
  bodies.push_back(ErrorReply{"unknown_body", "discriminant 99"});
  bodies.push_back(VersionNotice{"expert-sql", 44, "shard-b"});
  bodies.push_back(RoundClose{"expert-docs", 17});
  bodies.push_back(ReplicaAppend{"expert-sql", 6, 70, sample_entries(71, 3)});
  bodies.push_back(ReplicaAck{"expert-sql", 6, 73, 44, 0x0123456789ABCDEFull, "gap"});
  bodies.push_back(IsrChange{"expert-sql", 6, {"shard-a", "shard-c"}, "shard-b did not acknowledge entry 73"});
  return bodies;
}

Message make_message(Body body, uint64_t n = 0) {
  Message m;
  m.sender_id = "node-7";
  m.correlation_id = 0x0123456789ABCDEFull + n;
  m.sent_at_unix_ms = n % 2 == 0 ? 1732567890123 + int64_t(n) : -1732567890123 - int64_t(n);
  m.body = std::move(body);
  return m;
}

Message sample_snapshot_message() { return make_message(ExpertSnapshot{sample_spec(), 42, sample_tensors(30)}); }

// A message with `n` tensors of a few words each: each is referenced, so each gets its own segment.
Message many_tensors_message(size_t n) {
  ExpertSnapshot snap{sample_spec(), 1, {}};
  for (size_t i = 0; i < n; ++i) {
    snap.tensors.push_back(make_tensor(std::string("t").append(std::to_string(i)), DType::f32, {4}, uint32_t(i)));
  }
  return make_message(std::move(snap));
}

std::shared_ptr<Buffer> flat(capnp::MessageBuilder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  return Buffer::copy_of(bytes.begin(), bytes.size());
}

// --- comparisons --------------------------------------------------------------------------------------

void check_equal(const Tensor& a, const Tensor& b) {
  CHECK(a.name == b.name);
  CHECK(a.dtype == b.dtype);
  CHECK(a.shape == b.shape);
  REQUIRE(a.size_bytes == b.size_bytes);
  if (a.size_bytes > 0) CHECK(std::memcmp(a.data, b.data, a.size_bytes) == 0);
}

void check_equal(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) check_equal(a[i], b[i]);
}

void check_equal(const Hello& a, const Hello& b) {
  CHECK(a.node_id == b.node_id);
  CHECK(a.role == b.role);
  CHECK(a.device == b.device);
  CHECK(a.device_name == b.device_name);
  CHECK(a.declared_speed == b.declared_speed);
  CHECK(a.measured_speed == b.measured_speed);
  CHECK(a.endpoint == b.endpoint);
  CHECK(a.protocol_version == b.protocol_version);
  CHECK(a.expert == b.expert);
}
void check_equal(const HelloAck& a, const HelloAck& b) {
  CHECK(a.accepted == b.accepted);
  CHECK(a.lease_ms == b.lease_ms);
  CHECK(a.reason == b.reason);
  CHECK(a.coordinator_id == b.coordinator_id);
}
void check_equal(const Heartbeat& a, const Heartbeat& b) {
  CHECK(a.node_id == b.node_id);
  CHECK(a.seq == b.seq);
  CHECK(a.load == b.load);
  CHECK(a.measured_speed == b.measured_speed);
}
void check_equal(const Leave& a, const Leave& b) {
  CHECK(a.node_id == b.node_id);
  CHECK(a.reason == b.reason);
}
void check_equal(const ExpertSpec& a, const ExpertSpec& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.domain == b.domain);
  CHECK(a.lora_rank == b.lora_rank);
  CHECK(a.lora_alpha == b.lora_alpha);
  CHECK(a.lora_dropout == b.lora_dropout);
  CHECK(a.target_modules == b.target_modules);
  CHECK(a.base_model_id == b.base_model_id);
  CHECK(a.use_rslora == b.use_rslora);
  CHECK(a.removed == b.removed);
}
void check_equal(const SnapshotRequest& a, const SnapshotRequest& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.min_version == b.min_version);
  CHECK(a.subscribe == b.subscribe);
}
void check_equal(const RoundClose& a, const RoundClose& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.round_version == b.round_version);
}
void check_equal(const VersionNotice& a, const VersionNotice& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.version == b.version);
  CHECK(a.shard_id == b.shard_id);
}
void check_equal(const std::vector<LogEntry>& a, const std::vector<LogEntry>& b);
void check_equal(const ExpertSnapshot& a, const ExpertSnapshot& b) {
  check_equal(a.spec, b.spec);
  CHECK(a.version == b.version);
  check_equal(a.tensors, b.tensors);
  CHECK(a.seen_update_ids == b.seen_update_ids);
  CHECK(a.term == b.term);
  CHECK(a.lsn == b.lsn);
  check_equal(a.pending, b.pending);
}
void check_equal(const SnapshotReceipt& a, const SnapshotReceipt& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.version == b.version);
  CHECK(a.tensor_count == b.tensor_count);
  CHECK(a.byte_count == b.byte_count);
  CHECK(a.checksum == b.checksum);
  CHECK(a.lsn == b.lsn);
  CHECK(a.term == b.term);
}
void check_equal(const UpdatePush& a, const UpdatePush& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.worker_id == b.worker_id);
  CHECK(a.update_id == b.update_id);
  CHECK(a.base_version == b.base_version);
  CHECK(a.sample_count == b.sample_count);
  CHECK(a.train_loss == b.train_loss);
  check_equal(a.deltas, b.deltas);
  CHECK(a.local_steps == b.local_steps);
  CHECK(a.compute_seconds == b.compute_seconds);
}
void check_equal(const UpdateAck& a, const UpdateAck& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.update_id == b.update_id);
  CHECK(a.new_version == b.new_version);
  CHECK(a.staleness == b.staleness);
  CHECK(a.weight == b.weight);
}
void check_equal(const UpdateReject& a, const UpdateReject& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.update_id == b.update_id);
  CHECK(a.reason == b.reason);
  CHECK(a.detail == b.detail);
  CHECK(a.current_version == b.current_version);
}
void check_equal(const Replica& a, const Replica& b) {
  CHECK(a.shard_id == b.shard_id);
  CHECK(a.endpoint == b.endpoint);
  CHECK(a.version == b.version);
  CHECK(a.alive == b.alive);
}
void check_equal(const ExpertPlacement& a, const ExpertPlacement& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.term == b.term);
  CHECK(a.in_sync == b.in_sync);
  CHECK(a.min_in_sync == b.min_in_sync);
  REQUIRE(a.replicas.size() == b.replicas.size());
  for (size_t i = 0; i < a.replicas.size(); ++i) check_equal(a.replicas[i], b.replicas[i]);
}
void check_equal(const PlacementMap& a, const PlacementMap& b) {
  CHECK(a.epoch == b.epoch);
  REQUIRE(a.placements.size() == b.placements.size());
  for (size_t i = 0; i < a.placements.size(); ++i) check_equal(a.placements[i], b.placements[i]);
  REQUIRE(a.assignments.size() == b.assignments.size());
  for (size_t i = 0; i < a.assignments.size(); ++i) {
    CHECK(a.assignments[i].worker_id == b.assignments[i].worker_id);
    CHECK(a.assignments[i].expert_id == b.assignments[i].expert_id);
  }
}
void check_equal(const ExpertRef& a, const ExpertRef& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.version == b.version);
}
void check_equal(const std::vector<ExpertRef>& a, const std::vector<ExpertRef>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) check_equal(a[i], b[i]);
}
void check_equal(const RouteRequest& a, const RouteRequest& b) {
  CHECK(a.request_id == b.request_id);
  CHECK(a.prompt == b.prompt);
  CHECK(a.max_experts == b.max_experts);
}
void check_equal(const RouteChoice& a, const RouteChoice& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.version == b.version);
  CHECK(a.score == b.score);
  CHECK(a.shard_id == b.shard_id);
  CHECK(a.reason == b.reason);
}
void check_equal(const RouteReply& a, const RouteReply& b) {
  CHECK(a.request_id == b.request_id);
  REQUIRE(a.choices.size() == b.choices.size());
  for (size_t i = 0; i < a.choices.size(); ++i) check_equal(a.choices[i], b.choices[i]);
}
void check_equal(const GenerateRequest& a, const GenerateRequest& b) {
  CHECK(a.request_id == b.request_id);
  CHECK(a.prompt == b.prompt);
  check_equal(a.experts, b.experts);
  CHECK(a.max_new_tokens == b.max_new_tokens);
  CHECK(a.temperature == b.temperature);
  CHECK(a.top_k == b.top_k);
  CHECK(a.top_p == b.top_p);
  CHECK(a.seed == b.seed);
  CHECK(a.stream == b.stream);
  CHECK(a.max_experts == b.max_experts);
  CHECK(a.combine == b.combine);
}
void check_equal(const GenerateReply& a, const GenerateReply& b) {
  CHECK(a.request_id == b.request_id);
  CHECK(a.text == b.text);
  check_equal(a.experts, b.experts);
  CHECK(a.done == b.done);
  CHECK(a.error == b.error);
  REQUIRE(a.choices.size() == b.choices.size());
  for (size_t i = 0; i < a.choices.size(); ++i) check_equal(a.choices[i], b.choices[i]);
  CHECK(a.combine == b.combine);
}
void check_equal(const StatusRequest& a, const StatusRequest& b) {
  CHECK(a.request_id == b.request_id);
  CHECK(a.verbose == b.verbose);
}
void check_equal(const StatusReply& a, const StatusReply& b) {
  CHECK(a.request_id == b.request_id);
  CHECK(a.node_id == b.node_id);
  CHECK(a.role == b.role);
  CHECK(a.json == b.json);
}
void check_equal(const ErrorReply& a, const ErrorReply& b) {
  CHECK(a.code == b.code);
  CHECK(a.detail == b.detail);
}

void check_equal(const std::vector<LogEntry>& a, const std::vector<LogEntry>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].lsn == b[i].lsn);
    CHECK(a[i].term == b[i].term);
    CHECK(a[i].kind == b[i].kind);
    CHECK(a[i].version == b[i].version);
    REQUIRE(a[i].has_update == b[i].has_update);
    if (a[i].has_update) check_equal(a[i].update, b[i].update);
    check_equal(a[i].tensors, b[i].tensors);
    CHECK(a[i].staleness == b[i].staleness);
    CHECK(a[i].weight == b[i].weight);
  }
}
void check_equal(const ReplicaAppend& a, const ReplicaAppend& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.term == b.term);
  CHECK(a.committed_lsn == b.committed_lsn);
  check_equal(a.entries, b.entries);
}
void check_equal(const ReplicaAck& a, const ReplicaAck& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.term == b.term);
  CHECK(a.lsn == b.lsn);
  CHECK(a.version == b.version);
  CHECK(a.checksum == b.checksum);
  CHECK(a.refused == b.refused);
}
void check_equal(const IsrChange& a, const IsrChange& b) {
  CHECK(a.expert_id == b.expert_id);
  CHECK(a.term == b.term);
  CHECK(a.in_sync == b.in_sync);
  CHECK(a.reason == b.reason);
}

void check_equal(const Message& a, const Message& b) {
  CHECK(a.sender_id == b.sender_id);
  CHECK(a.correlation_id == b.correlation_id);
  CHECK(a.sent_at_unix_ms == b.sent_at_unix_ms);
  REQUIRE(a.body.index() == b.body.index());
  std::visit([&](const auto& x) { check_equal(x, std::get<std::decay_t<decltype(x)>>(b.body)); }, a.body);
}

// --- decode helpers ---------------------------------------------------------------------------------

const Message& require_ok(const Result<Message>& r) {
  if (!r.ok()) FAIL("decode failed: " << r.error().message());
  return r.value();
}

void require_error(const Result<Message>& r, DecodeErrc code, std::string_view detail_part = {}) {
  REQUIRE_FALSE(r.ok());
  INFO(r.error().message());
  CHECK(r.error().code == code);
  if (!detail_part.empty()) CHECK(r.error().detail.find(detail_part) != std::string::npos);
}

Result<Message> round_trip(const Message& m, const DecodeLimits& limits = {}) {
  return decode(encode(m).flatten(), limits);
}

bool inside(const std::byte* p, size_t n, const Buffer& b) {
  return n == 0 || (p >= b.data() && p + n <= b.data() + b.size());
}

// Every tensor of a decoded message points into the buffer it was decoded from and holds it alive.
bool tensors_inside(const Message& m, const std::shared_ptr<const Buffer>& buffer) {
  const std::vector<Tensor>* tensors = nullptr;
  if (auto* s = std::get_if<ExpertSnapshot>(&m.body)) tensors = &s->tensors;
  if (auto* u = std::get_if<UpdatePush>(&m.body)) tensors = &u->deltas;
  if (!tensors) return true;
  return std::all_of(tensors->begin(), tensors->end(), [&](const Tensor& t) {
    return inside(t.data, t.size_bytes, *buffer) && t.owner.get() == buffer.get();
  });
}

}  // namespace

// =====================================================================================================

TEST_CASE("messages: enum names, dtype sizes, body names", "[messages]") {
  CHECK(std::string(to_string(Role::client)) == "client");
  CHECK(std::string(to_string(DeviceKind::cuda)) == "cuda");
  CHECK(std::string(to_string(DType::bf16)) == "bf16");
  CHECK(std::string(to_string(RejectReason::duplicate_update)) == "duplicate_update");
  CHECK(std::string(to_string(EntryKind::round_closed)) == "round_closed");
  CHECK(std::string(to_string(static_cast<Role>(200))) == "invalid");
  CHECK(dtype_size(DType::f32) == 4);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK(dtype_size(DType::bf16) == 2);
  CHECK_THROWS_AS(dtype_size(static_cast<DType>(9)), std::invalid_argument);

  const char* expected[] = {"hello",          "helloAck",        "heartbeat",     "leave",
                            "expertSpec",     "snapshotRequest", "expertSnapshot", "snapshotReceipt",
                            "updatePush",     "updateAck",       "updateReject",  "placementMap",
                            "routeRequest",   "routeReply",      "generateRequest", "generateReply",
                            "statusRequest",  "statusReply",     "errorReply",    "versionNotice",
                            "roundClose",     "replicaAppend",   "replicaAck",    "isrChange"};
  auto bodies = sample_bodies();
  REQUIRE(bodies.size() == std::size(expected));
  for (size_t i = 0; i < bodies.size(); ++i) CHECK(std::string(body_name(bodies[i])) == expected[i]);
}

TEST_CASE("messages: Tensor::numel and Tensor::owning", "[messages]") {
  Tensor t;
  t.shape = {3, 4, 5};
  CHECK(t.numel() == 60);
  t.shape = {};
  CHECK(t.numel() == 1);
  t.shape = {uint64_t{1} << 40, uint64_t{1} << 40, 0};
  CHECK(t.numel() == 0);
  t.shape = {uint64_t{1} << 40, uint64_t{1} << 40};
  CHECK_THROWS_AS(t.numel(), std::overflow_error);

  auto bytes = pattern(24, 1);
  const std::byte* heap = bytes.data();
  Tensor owned = Tensor::owning("w", DType::f16, {3, 4}, std::move(bytes));
  CHECK(owned.data == heap);  // moved, not copied
  CHECK(owned.size_bytes == 24);
  CHECK(owned.owner != nullptr);
  CHECK_THROWS_AS(Tensor::owning("w", DType::f32, {3, 4}, pattern(24, 1)), std::invalid_argument);
  CHECK_THROWS_AS(Tensor::owning("w", DType::f32, {uint64_t{1} << 62}, {}), std::invalid_argument);
}

TEST_CASE("buffer: aligned allocation and copies", "[buffer]") {
  for (size_t n : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{1000}}) {
    auto b = Buffer::allocate(n);
    CHECK(b->size() == n);
    CHECK(reinterpret_cast<uintptr_t>(b->data()) % 64 == 0);
  }
  auto src = pattern(100, 3);
  auto copy = Buffer::copy_of(src.data(), src.size());
  REQUIRE(copy->size() == 100);
  CHECK(copy->data() != src.data());
  CHECK(std::memcmp(copy->data(), src.data(), 100) == 0);
  CHECK(Buffer::copy_of(nullptr, 0)->size() == 0);
}

TEST_CASE("buffer: large blocks are recycled, within the pool's bound", "[buffer]") {
#if defined(__SANITIZE_ADDRESS__)
  CHECK(Buffer::pooled_bytes() == 0);  // the sanitizer build bypasses the pool
#else
  const size_t n = (size_t{9} << 20) + 8192;  // size class 10 MiB (eighths of 8 MiB)
  std::byte* first = nullptr;
  {
    auto a = Buffer::allocate(n);
    first = a->data();
    std::memset(a->data(), 0x5a, n);
  }
  CHECK(Buffer::pooled_bytes() >= 10u << 20);
  auto b = Buffer::allocate(n + 4096);  // same class: the same block comes back
  CHECK(b->data() == first);
  CHECK(b->size() == n + 4096);
  CHECK(reinterpret_cast<uintptr_t>(b->data()) % 64 == 0);
  auto c = Buffer::allocate(n);         // the pool holds no other: a fresh block
  CHECK(c->data() != first);
  // Release more than the pool may hold: it keeps at most 512 MiB.
  {
    std::vector<std::shared_ptr<Buffer>> many;
    for (int i = 0; i < 40; ++i) many.push_back(Buffer::allocate(size_t{16} << 20));
  }
  CHECK(Buffer::pooled_bytes() <= size_t{512} << 20);
  CHECK(Buffer::pooled_bytes() >= size_t{400} << 20);
#endif
}

TEST_CASE("codec: every body kind round-trips with all fields", "[codec]") {
  auto bodies = sample_bodies();
  REQUIRE(bodies.size() == std::variant_size_v<Body>);
  for (size_t i = 0; i < bodies.size(); ++i) {
    REQUIRE(bodies[i].index() == i);  // one sample per alternative, in order
    const Message m = make_message(bodies[i], i);
    INFO("body " << body_name(m.body));

    const auto buffer = encode(m).flatten();
    const auto decoded = decode(buffer);
    check_equal(m, require_ok(decoded));
    CHECK(tensors_inside(decoded.value(), buffer));

    // decode_copy from unaligned memory gives the same message.
    std::vector<std::byte> shifted(buffer->size() + 1);
    std::memcpy(shifted.data() + 1, buffer->data(), buffer->size());
    check_equal(m, require_ok(decode_copy(shifted.data() + 1, buffer->size())));
  }
}

TEST_CASE("codec: decoded tensors point into the received buffer", "[codec][zero-copy]") {
  const Message m = sample_snapshot_message();
  std::shared_ptr<const Buffer> buffer = encode(m).flatten();
  const long owners_before = buffer.use_count();
  auto decoded = decode(buffer);
  const auto& tensors = std::get<ExpertSnapshot>(require_ok(decoded).body).tensors;
  REQUIRE(tensors.size() == 5);
  for (const Tensor& t : tensors) {
    if (t.size_bytes == 0) continue;
    CHECK(t.data >= buffer->data());
    CHECK(t.data + t.size_bytes <= buffer->data() + buffer->size());
    CHECK(t.owner.get() == buffer.get());
  }
  CHECK(buffer.use_count() == owners_before + long(tensors.size()));  // each tensor holds the buffer

  // The tensors keep the bytes alive after everything else let go (ASan reports it otherwise).
  std::vector<Tensor> kept = tensors;
  decoded = DecodeError{DecodeErrc::malformed, "dropped"};
  buffer.reset();
  check_equal(kept, std::get<ExpertSnapshot>(m.body).tensors);
}

TEST_CASE("codec: encoding references large tensor data without copying it", "[codec][zero-copy]") {
  constexpr size_t kBytes = size_t{32} << 20;
  Tensor big = Tensor::owning("big", DType::f32, {kBytes / 4}, pattern(kBytes, 9));
  const std::byte* data = big.data;
  std::weak_ptr<const void> owner = big.owner;
  const auto expected = pattern(kBytes, 9);

  std::optional<Encoded> encoded;
  {
    Message m = make_message(UpdatePush{"e", "w", "u", 1, 1, 0.5f, {std::move(big)}, 1, 1.0});
    encoded.emplace(encode(m));
  }
  // The message and its tensor are gone; the Encoded still holds the bytes, in place.
  CHECK_FALSE(owner.expired());
  const auto& pieces = encoded->pieces();
  CHECK(std::any_of(pieces.begin(), pieces.end(),
                    [&](const Encoded::Piece& p) { return p.data == data && p.size == kBytes; }));
  size_t total = 0;
  for (const auto& p : pieces) total += p.size;
  CHECK(total == encoded->size_bytes());
  CHECK(encoded->size_bytes() < kBytes + 4096);

  Encoded moved = std::move(*encoded);
  encoded.reset();
  auto decoded = decode(moved.flatten());
  const auto& t = std::get<UpdatePush>(require_ok(decoded).body).deltas.at(0);
  REQUIRE(t.size_bytes == kBytes);
  CHECK(std::memcmp(t.data, expected.data(), kBytes) == 0);

  moved = encode(make_message(Leave{"n", "r"}));
  CHECK(owner.expired());  // replacing the Encoded released the tensor
}

TEST_CASE("codec: tensors Cap'n Proto cannot reference are copied correctly", "[codec]") {
  // 6 bytes (not a whole word) and data at an odd address: referencing either would make Cap'n Proto
  // read past the tensor or reject it.
  auto storage = std::make_shared<std::vector<std::byte>>(pattern(17, 5));
  Tensor odd;
  odd.name = "odd";
  odd.dtype = DType::f16;
  odd.shape = {8};
  odd.data = storage->data() + 1;
  odd.size_bytes = 16;
  odd.owner = storage;
  Tensor partial = make_tensor("partial", DType::bf16, {3}, 6);
  REQUIRE(partial.size_bytes == 6);

  const Message m = make_message(ExpertSnapshot{sample_spec(), 5, {odd, partial}});
  const Encoded encoded = encode(m);
  for (const auto& p : encoded.pieces()) {
    CHECK(p.data != odd.data);
    CHECK(p.data != partial.data);
  }
  check_equal(m, require_ok(decode(encoded.flatten())));
}

TEST_CASE("codec: a message with many tensors stays within the default segment limit", "[codec]") {
  const Message m = many_tensors_message(600);
  const Encoded encoded = encode(m);
  CHECK(encoded.pieces().size() - 1 <= DecodeLimits{}.max_segments);
  CHECK(encoded.pieces().size() > 400);  // most tensors are still referenced, not copied
  check_equal(m, require_ok(decode(encoded.flatten())));
}

TEST_CASE("codec: wire form is the standard Cap'n Proto stream framing", "[codec]") {
  const Message m = sample_snapshot_message();
  const Encoded encoded = encode(m);
  const auto& pieces = encoded.pieces();
  REQUIRE(pieces.size() >= 3);  // table, the builder's segment, referenced tensors

  // Same bytes as Cap'n Proto's own serializer given the same segments.
  std::vector<kj::ArrayPtr<const capnp::word>> segments;
  for (size_t i = 1; i < pieces.size(); ++i) {
    REQUIRE(pieces[i].size % sizeof(capnp::word) == 0);
    segments.push_back(kj::arrayPtr(reinterpret_cast<const capnp::word*>(pieces[i].data),
                                    pieces[i].size / sizeof(capnp::word)));
  }
  const auto reference = capnp::messageToFlatArray(kj::arrayPtr(segments.data(), segments.size()));
  const auto flat = encoded.flatten();
  REQUIRE(flat->size() == reference.asBytes().size());
  CHECK(std::memcmp(flat->data(), reference.asBytes().begin(), flat->size()) == 0);

  std::vector<std::byte> copied(encoded.size_bytes());
  encoded.copy_to(copied.data());
  CHECK(std::memcmp(copied.data(), flat->data(), copied.size()) == 0);

  // Cap'n Proto's reader reads it.
  capnp::FlatArrayMessageReader reader(
      kj::arrayPtr(reinterpret_cast<const capnp::word*>(flat->data()), flat->size() / sizeof(capnp::word)));
  auto root = reader.getRoot<schema::Envelope>();
  CHECK(std::string(root.getSenderId().cStr()) == "node-7");
  REQUIRE(root.getBody().which() == schema::Envelope::Body::EXPERT_SNAPSHOT);
  auto snapshot = root.getBody().getExpertSnapshot();
  CHECK(snapshot.getVersion() == 42);
  CHECK(std::string(snapshot.getSpec().getExpertId().cStr()) == "expert-python");
  const auto& tensors = std::get<ExpertSnapshot>(m.body).tensors;
  REQUIRE(snapshot.getTensors().size() == tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto t = snapshot.getTensors()[i];
    CHECK(std::string(t.getName().cStr()) == tensors[i].name);
    REQUIRE(t.getData().size() == tensors[i].size_bytes);
    if (tensors[i].size_bytes > 0) CHECK(std::memcmp(t.getData().begin(), tensors[i].data, tensors[i].size_bytes) == 0);
  }
}

TEST_CASE("codec: encode refuses tensors whose bytes do not match their shape", "[codec]") {
  Tensor t = make_tensor("layer.w", DType::f32, {2, 3}, 1);
  t.shape = {2, 4};
  try {
    encode(make_message(UpdatePush{"e", "w", "u", 1, 1, 0, {t}, 1, 1}));
    FAIL("encode accepted a tensor with 24 bytes for shape [2, 4] f32");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("layer.w") != std::string::npos);
    CHECK(std::string(e.what()).find("32") != std::string::npos);
  }
  t.shape = {uint64_t{1} << 40, uint64_t{1} << 40};
  CHECK_THROWS_AS(encode(make_message(ExpertSnapshot{sample_spec(), 1, {t}})), std::invalid_argument);
}

TEST_CASE("codec: error names and messages", "[codec]") {
  CHECK(std::string(to_string(DecodeErrc::byte_count_mismatch)) == "byte_count_mismatch");
  CHECK(std::string(to_string(DecodeErrc::bad_segment_table)) == "bad_segment_table");
  CHECK(DecodeError{DecodeErrc::too_large, "9 bytes"}.message() == "too_large: 9 bytes");
}

// --- malformed input ---------------------------------------------------------------------------------

TEST_CASE("decode: empty input", "[codec][malformed]") {
  require_error(decode(Buffer::allocate(0)), DecodeErrc::truncated);
  require_error(decode(nullptr), DecodeErrc::truncated);
  require_error(decode_copy(nullptr, 0), DecodeErrc::truncated);
}

TEST_CASE("decode: sizes that are not whole words", "[codec][malformed]") {
  const auto buffer = encode(make_message(Leave{"n", "r"})).flatten();
  for (size_t extra : {1, 3, 7}) {
    std::vector<std::byte> bytes(buffer->size() + extra);
    std::memcpy(bytes.data(), buffer->data(), buffer->size());
    require_error(decode_copy(bytes.data(), bytes.size()), DecodeErrc::truncated);
  }
  require_error(decode_copy(buffer->data(), 12), DecodeErrc::truncated);
}

TEST_CASE("decode: bytes after the last segment", "[codec][malformed]") {
  const auto buffer = encode(make_message(Leave{"n", "r"})).flatten();
  std::vector<std::byte> bytes(buffer->size() + 8);
  std::memcpy(bytes.data(), buffer->data(), buffer->size());
  require_error(decode_copy(bytes.data(), bytes.size()), DecodeErrc::malformed, "follow the last segment");
}

TEST_CASE("decode: a valid message cut at every length", "[codec][malformed]") {
  const Encoded encoded = encode(sample_snapshot_message());
  const size_t table_bytes = encoded.pieces()[0].size;
  REQUIRE(table_bytes > 8);  // several segments, so some cuts fall inside the table
  const auto full = encoded.flatten();
  require_ok(decode(full));
  for (size_t n = 0; n < full->size(); ++n) {
    INFO("cut at " << n << " of " << full->size());
    DecodeErrc expected = DecodeErrc::truncated;
    if (n % 8 == 0 && n > 0 && n < table_bytes) expected = DecodeErrc::bad_segment_table;
    require_error(decode_copy(full->data(), n), expected);
  }
}

TEST_CASE("decode: segment tables that cannot be right", "[codec][malformed]") {
  auto with_header = [](std::vector<uint32_t> words32) {
    return Buffer::copy_of(words32.data(), words32.size() * sizeof(uint32_t));
  };
  // 2^32 segments (count field 0xFFFFFFFF), and one more than the limit.
  require_error(decode(with_header({0xFFFFFFFFu, 0})), DecodeErrc::bad_segment_table);
  require_error(decode(with_header({512, 0})), DecodeErrc::bad_segment_table);
  // 4 segments need a 24-byte table; the message has 8 bytes.
  require_error(decode(with_header({3, 0})), DecodeErrc::bad_segment_table);
  // One segment of 1000 words; 8 bytes follow the table.
  require_error(decode(with_header({0, 1000, 0, 0})), DecodeErrc::truncated);
  // Segment sizes summing past 2^32 words must not wrap around.
  require_error(decode(with_header({1, 0xFFFFFFFFu, 0xFFFFFFFFu, 0, 0, 0})), DecodeErrc::truncated);
  // An empty first segment has no root pointer.
  require_error(decode(with_header({0, 0})), DecodeErrc::malformed);

  DecodeLimits few;
  few.max_segments = 3;
  require_ok(round_trip(many_tensors_message(1), few));
  require_error(round_trip(many_tensors_message(3), few), DecodeErrc::bad_segment_table);
}

TEST_CASE("decode: messages over max_message_bytes", "[codec][malformed]") {
  const auto buffer = encode(sample_snapshot_message()).flatten();
  DecodeLimits limits;
  limits.max_message_bytes = buffer->size();
  require_ok(decode(buffer, limits));
  limits.max_message_bytes = buffer->size() - 8;
  require_error(decode(buffer, limits), DecodeErrc::too_large);
  require_error(decode_copy(buffer->data(), buffer->size(), limits), DecodeErrc::too_large);
  // Refused from the size alone: the 2^62 bytes claimed are neither read nor allocated.
  require_error(decode_copy(buffer->data(), size_t{1} << 62), DecodeErrc::too_large);
}

TEST_CASE("decode: lists longer than the limits", "[codec][malformed]") {
  PlacementMap map;
  map.epoch = 1;
  map.placements.push_back({"expert-a", {}});
  for (int i = 0; i < 100; ++i) map.placements[0].replicas.push_back({"shard-" + std::to_string(i), "", 1, true});
  const Message placement = make_message(map);
  DecodeLimits limits;
  limits.max_list_elements = 100;
  require_ok(round_trip(placement, limits));
  limits.max_list_elements = 10;
  require_error(round_trip(placement, limits), DecodeErrc::too_many_elements, "replicas");

  const Message snapshot = many_tensors_message(20);
  limits = {};
  limits.max_tensors = 20;
  require_ok(round_trip(snapshot, limits));
  limits.max_tensors = 5;
  require_error(round_trip(snapshot, limits), DecodeErrc::too_many_elements, "tensors");
}

TEST_CASE("decode: tensor data that does not match the shape", "[codec][malformed]") {
  capnp::MallocMessageBuilder builder;
  auto push = builder.initRoot<schema::Envelope>().getBody().initUpdatePush();
  push.setExpertId("e");
  push.setWorkerId("w");
  push.setUpdateId("u");
  auto t = push.initDeltas(1)[0];
  t.setName("layer.w");
  t.setDtype(schema::DType::F32);
  auto shape = t.initShape(2);
  shape.set(0, 2);
  shape.set(1, 3);
  t.initData(20);
  const auto r = decode(flat(builder));
  require_error(r, DecodeErrc::byte_count_mismatch, "layer.w");
  CHECK(r.error().detail.find("[2, 3]") != std::string::npos);
  CHECK(r.error().detail.find("f32") != std::string::npos);
  CHECK(r.error().detail.find("expected 24 bytes, got 20") != std::string::npos);
}

TEST_CASE("decode: enum values outside the schema", "[codec][malformed]") {
  for (uint16_t dtype : {3, 7, 65535}) {
    capnp::MallocMessageBuilder builder;
    auto snap = builder.initRoot<schema::Envelope>().getBody().initExpertSnapshot();
    snap.initSpec().setExpertId("e");
    auto t = snap.initTensors(1)[0];
    t.setName("w");
    t.setDtype(static_cast<schema::DType>(dtype));
    require_error(decode(flat(builder)), DecodeErrc::unknown_enum, "dtype = " + std::to_string(dtype));
  }
  {
    capnp::MallocMessageBuilder builder;
    auto hello = builder.initRoot<schema::Envelope>().getBody().initHello();
    hello.setNodeId("n");
    hello.setRole(static_cast<schema::Role>(7));
    require_error(decode(flat(builder)), DecodeErrc::unknown_enum, "hello.role = 7");
  }
  {
    capnp::MallocMessageBuilder builder;
    auto hello = builder.initRoot<schema::Envelope>().getBody().initHello();
    hello.setNodeId("n");
    hello.setDevice(static_cast<schema::DeviceKind>(3));
    require_error(decode(flat(builder)), DecodeErrc::unknown_enum, "hello.device = 3");
  }
  {
    capnp::MallocMessageBuilder builder;
    auto reject = builder.initRoot<schema::Envelope>().getBody().initUpdateReject();
    reject.setReason(static_cast<schema::RejectReason>(11));
    require_error(decode(flat(builder)), DecodeErrc::unknown_enum, "updateReject.reason = 11");
  }
  {
    capnp::MallocMessageBuilder builder;
    auto status = builder.initRoot<schema::Envelope>().getBody().initStatusReply();
    status.setNodeId("n");
    status.setRole(static_cast<schema::Role>(42));
    require_error(decode(flat(builder)), DecodeErrc::unknown_enum, "statusReply.role = 42");
  }
}

TEST_CASE("decode: union discriminant this build does not know", "[codec][malformed]") {
  // Leave and ErrorReply have the same layout (two texts): with the same text set, the two messages
  // differ only in the body discriminant.
  auto build = [](bool leave) {
    capnp::MallocMessageBuilder builder;
    auto body = builder.initRoot<schema::Envelope>().getBody();
    if (leave) {
      body.initLeave().setNodeId("n");
    } else {
      body.initErrorReply().setCode("n");
    }
    return flat(builder);
  };
  const auto leave = build(true);
  const auto error = build(false);
  REQUIRE(leave->size() == error->size());
  std::vector<size_t> differ;
  for (size_t i = 0; i < leave->size(); ++i) {
    if (leave->data()[i] != error->data()[i]) differ.push_back(i);
  }
  REQUIRE(differ.size() == 1);  // the discriminant's low byte: 3 vs 18
  CHECK(std::holds_alternative<Leave>(require_ok(decode(leave)).body));
  CHECK(std::holds_alternative<ErrorReply>(require_ok(decode(error)).body));

  auto patched = Buffer::copy_of(leave->data(), leave->size());
  const uint16_t unknown = 99;
  std::memcpy(patched->data() + differ[0], &unknown, sizeof unknown);
  require_error(decode(patched), DecodeErrc::unknown_body, "99");
}

TEST_CASE("decode: nesting and traversal limits", "[codec][malformed]") {
  const Message placement = make_message(sample_placement_map());
  require_ok(round_trip(placement));
  DecodeLimits shallow;
  shallow.nesting_limit = 2;
  require_error(round_trip(placement, shallow), DecodeErrc::nesting_limit);

  const Message snapshot = sample_snapshot_message();
  const auto buffer = encode(snapshot).flatten();
  DecodeLimits tight;
  tight.traversal_limit_words = 10;
  require_error(decode(buffer, tight), DecodeErrc::traversal_limit);
  // The limit bounds one pass over the message: a budget of the message's own size suffices.
  tight.traversal_limit_words = buffer->size() / 8;
  require_ok(decode(buffer, tight));
}

TEST_CASE("decode: ids and texts", "[codec][malformed]") {
  UpdatePush push{"expert-python", "worker-3", "", 1, 1, 0.5f, {}, 1, 1.0};
  require_error(round_trip(make_message(push)), DecodeErrc::invalid_text, "updatePush.updateId is empty");
  ExpertSpec spec = sample_spec();
  spec.expert_id.clear();
  require_error(round_trip(make_message(spec)), DecodeErrc::invalid_text, "expertSpec.expertId");
  require_error(round_trip(make_message(SnapshotRequest{"", 1})), DecodeErrc::invalid_text);

  require_error(round_trip(make_message(Heartbeat{"node\x01", 1, 0, 0})), DecodeErrc::invalid_text, "U+0001");
  require_error(round_trip(make_message(Heartbeat{"node\xC2\x85", 1, 0, 0})), DecodeErrc::invalid_text, "U+0085");
  require_error(round_trip(make_message(Heartbeat{std::string(513, 'n'), 1, 0, 0})), DecodeErrc::invalid_text);
  require_ok(round_trip(make_message(Heartbeat{std::string(512, 'n'), 1, 0, 0})));
  require_ok(round_trip(make_message(Heartbeat{"n\xC3\xB6\x64\x65-\xF0\x9F\x98\x80", 1, 0, 0})));

  Message sender = make_message(Leave{"n", "r"});
  sender.sender_id = "bad\nsender";
  require_error(round_trip(sender), DecodeErrc::invalid_text, "senderId");
  sender.sender_id.clear();  // optional
  require_ok(round_trip(sender));

  Tensor unnamed = make_tensor("", DType::f32, {2}, 1);
  require_error(round_trip(make_message(ExpertSnapshot{sample_spec(), 1, {unnamed}})), DecodeErrc::invalid_text,
                "tensors[0].name");

  for (const char* bad : {"ok \xC3\x28", "overlong \xC0\xAF", "surrogate \xED\xA0\x80", "cut \xE2\x82",
                          "too high \xF4\x90\x80\x80", "lone \x80"}) {
    INFO(bad);
    // A hostile peer's bytes (written past our encoder) are refused...
    capnp::MallocMessageBuilder builder;
    auto route = builder.initRoot<schema::Envelope>().getBody().initRouteRequest();
    route.setRequestId(1);
    route.setPrompt(capnp::Text::Reader(bad, std::strlen(bad)));
    require_error(decode(flat(builder)), DecodeErrc::invalid_text, "routeRequest.prompt is not valid UTF-8");
    // ...while our encoder never writes them: ill-formed text goes out with U+FFFD in its place.
    auto sent = round_trip(make_message(RouteRequest{1, bad, 1}));
    REQUIRE(sent);
    const auto& prompt = std::get<RouteRequest>(sent.value().body).prompt;
    CHECK(prompt == valid_utf8(bad));
    CHECK(prompt.find("\xEF\xBF\xBD") != std::string::npos);
  }
  // Free text may hold newlines and any valid UTF-8.
  require_ok(round_trip(make_message(RouteRequest{1, "line\n\t\xE2\x9C\x93 \xF0\x9F\x98\x80", 1})));

  DecodeLimits limits;
  limits.max_text_bytes = 16;
  require_ok(round_trip(make_message(RouteRequest{1, std::string(16, 'x'), 1}), limits));
  require_error(round_trip(make_message(RouteRequest{1, std::string(17, 'x'), 1}), limits),
                DecodeErrc::invalid_text);
}

TEST_CASE("decode: shapes", "[codec][malformed]") {
  const auto with_shape = [](std::vector<uint64_t> dims, DType dtype) {
    return make_message(ExpertSnapshot{sample_spec(), 1, {Tensor::owning("w", dtype, dims, pattern(dtype_size(dtype), 1))}});
  };
  require_ok(round_trip(with_shape(std::vector<uint64_t>(8, 1), DType::f32)));
  require_error(round_trip(with_shape(std::vector<uint64_t>(9, 1), DType::f32)), DecodeErrc::bad_shape, "rank 9");

  // Shapes encode refuses, written directly.
  auto raw = [](std::vector<uint64_t> dims, schema::DType dtype) {
    capnp::MallocMessageBuilder builder;
    auto snap = builder.initRoot<schema::Envelope>().getBody().initExpertSnapshot();
    snap.initSpec().setExpertId("e");
    auto t = snap.initTensors(1)[0];
    t.setName("w");
    t.setDtype(dtype);
    t.setShape(kj::arrayPtr(dims.data(), dims.size()));
    return flat(builder);
  };
  require_error(decode(raw({uint64_t{1} << 40, uint64_t{1} << 40}, schema::DType::F32)), DecodeErrc::bad_shape,
                "overflows");
  // The element count fits, the byte count does not.
  require_error(decode(raw({uint64_t{1} << 62}, schema::DType::F32)), DecodeErrc::bad_shape);
  require_error(decode(raw({uint64_t{1} << 63}, schema::DType::F16)), DecodeErrc::bad_shape);
  // A zero dimension makes it empty, however large the others.
  const auto empty = decode(raw({uint64_t{1} << 40, uint64_t{1} << 40, 0}, schema::DType::F32));
  CHECK(std::get<ExpertSnapshot>(require_ok(empty).body).tensors.at(0).size_bytes == 0);
}

// --- fuzzing: decode must never crash, whatever the bytes -----------------------------------------

TEST_CASE("decode: 10,000 random buffers", "[codec][fuzz]") {
  std::mt19937_64 rng(20240611);
  size_t errors = 0, decoded = 0, escaped_tensor = 0, empty_detail = 0;
  std::set<DecodeErrc> seen;
  for (int iter = 0; iter < 10000; ++iter) {
    size_t size = rng() % 1024;
    if (rng() % 2) size &= ~size_t{7};  // half of them whole words, so they get past the first check
    auto buffer = Buffer::allocate(size);
    for (size_t i = 0; i < size; ++i) buffer->data()[i] = static_cast<std::byte>(rng());
    // Most get a consistent segment table, so Cap'n Proto itself sees the random content.
    const size_t words = size / 8;
    if (words >= 2 && rng() % 4 != 0) {
      const uint32_t segments = 1 + rng() % std::min<size_t>(4, words - 1);
      const size_t table_words = segments / 2 + 1;
      if (table_words < words) {
        std::vector<uint32_t> table(table_words * 2, 0);
        table[0] = segments - 1;
        size_t left = words - table_words;
        for (uint32_t s = 0; s + 1 < segments; ++s) {
          table[1 + s] = static_cast<uint32_t>(rng() % (left + 1));
          left -= table[1 + s];
        }
        table[segments] = static_cast<uint32_t>(left);
        std::memcpy(buffer->data(), table.data(), table.size() * 4);
      }
    }
    const std::shared_ptr<const Buffer> input = buffer;
    const auto r = decode(input);
    if (r.ok()) {
      ++decoded;
      if (!tensors_inside(r.value(), input)) ++escaped_tensor;
    } else {
      ++errors;
      seen.insert(r.error().code);
      if (r.error().detail.empty()) ++empty_detail;
    }
  }
  CHECK(errors + decoded == 10000);
  CHECK(escaped_tensor == 0);
  CHECK(empty_detail == 0);
  // The generator reaches every stage: the size check, the segment table check and Cap'n Proto.
  CHECK(seen.count(DecodeErrc::truncated) == 1);
  CHECK(seen.count(DecodeErrc::bad_segment_table) == 1);
  CHECK(seen.count(DecodeErrc::malformed) == 1);
}

TEST_CASE("decode: 5,000 mutated valid messages", "[codec][fuzz]") {
  std::vector<std::shared_ptr<Buffer>> seeds;
  uint64_t n = 0;
  for (const Body& b : sample_bodies()) seeds.push_back(encode(make_message(b, n++)).flatten());
  std::mt19937_64 rng(77);
  size_t decoded = 0, escaped_tensor = 0, reencode_failed = 0;
  std::set<DecodeErrc> seen;
  for (int iter = 0; iter < 5000; ++iter) {
    const auto& seed = seeds[rng() % seeds.size()];
    auto buffer = Buffer::copy_of(seed->data(), seed->size());
    // Bytes after the segment table only: the framing stays consistent, so the mutations reach
    // Cap'n Proto's pointer checks and the conversion's.
    uint32_t count;
    std::memcpy(&count, buffer->data(), sizeof count);
    const size_t table_bytes = 8 * ((size_t{count} + 1) / 2 + 1);
    for (uint64_t flips = 1 + rng() % 4; flips > 0; --flips) {
      buffer->data()[table_bytes + rng() % (buffer->size() - table_bytes)] = static_cast<std::byte>(rng());
    }
    const std::shared_ptr<const Buffer> input = buffer;
    const auto r = decode(input);
    if (!r.ok()) {
      seen.insert(r.error().code);
      continue;
    }
    ++decoded;
    if (!tensors_inside(r.value(), input)) ++escaped_tensor;
    // Whatever decode accepts is a valid message: it encodes and decodes again.
    if (!round_trip(r.value()).ok()) ++reencode_failed;
  }
  CHECK(escaped_tensor == 0);
  CHECK(reencode_failed == 0);
  CHECK(decoded > 0);
  // The mutations reach Cap'n Proto's checks and the conversion's.
  CHECK(seen.count(DecodeErrc::malformed) == 1);
  CHECK(seen.count(DecodeErrc::unknown_enum) == 1);
  CHECK(seen.count(DecodeErrc::invalid_text) == 1);
  CHECK(seen.count(DecodeErrc::byte_count_mismatch) == 1);
}

// --- checksum ---------------------------------------------------------------------------------------

TEST_CASE("checksum: XXH64 test vectors", "[checksum]") {
  auto of = [](std::string_view s, uint64_t seed = 0) { return checksum(s.data(), s.size(), seed); };
  CHECK(of("") == 0xEF46DB3751D8E999ull);
  CHECK(of("a") == 0xD24EC4F1A98C6E5Bull);
  CHECK(of("abc") == 0x44BC2CF5AD770999ull);
  CHECK(of("Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1ull);  // blocks and tail
  CHECK(of("xxhash", 20141025) == 0xB559B98D844E0635ull);
  CHECK(checksum(nullptr, 0) == of(""));
}

TEST_CASE("checksum: any single changed byte changes it", "[checksum]") {
  // Sizes around the 32-byte block and the 8/4/1-byte tail steps.
  for (size_t size : {1, 3, 4, 7, 8, 12, 15, 31, 32, 33, 39, 63, 64, 100, 1000, 1031}) {
    const auto original = pattern(size, uint32_t(size));
    const uint64_t base = checksum(original.data(), size);
    size_t unchanged = 0;
    for (size_t pos = 0; pos < size; ++pos) {
      for (uint8_t flip : {0x01, 0x80, 0xFF}) {
        auto changed = original;
        changed[pos] ^= static_cast<std::byte>(flip);
        if (checksum(changed.data(), size) == base) ++unchanged;
      }
    }
    INFO("size " << size);
    CHECK(unchanged == 0);
  }
}

TEST_CASE("checksum: depends on length and seed, not on alignment", "[checksum]") {
  const std::vector<std::byte> zeros(300);
  std::set<uint64_t> by_length;
  for (size_t n = 0; n <= zeros.size(); ++n) by_length.insert(checksum(zeros.data(), n));
  CHECK(by_length.size() == zeros.size() + 1);

  const auto content = pattern(257, 4);
  CHECK(checksum(content.data(), content.size(), 1) != checksum(content.data(), content.size(), 2));
  const uint64_t expected = checksum(content.data(), content.size());
  std::vector<std::byte> storage(content.size() + 16);
  for (size_t offset = 0; offset < 16; ++offset) {
    std::memcpy(storage.data() + offset, content.data(), content.size());
    CHECK(checksum(storage.data() + offset, content.size()) == expected);
  }
}

TEST_CASE("checksum: tensor lists chain names and data in order", "[checksum]") {
  const auto tensors = sample_tensors(1);
  const uint64_t base = checksum(tensors);
  CHECK(checksum(sample_tensors(1)) == base);  // equal content in other memory
  CHECK(checksum(std::vector<Tensor>{}) != base);

  auto renamed = tensors;
  renamed[2].name += "x";
  CHECK(checksum(renamed) != base);

  auto swapped = tensors;
  std::swap(swapped[0], swapped[1]);
  CHECK(checksum(swapped) != base);

  auto changed = tensors;
  std::vector<std::byte> bytes(tensors[1].data, tensors[1].data + tensors[1].size_bytes);
  bytes.back() ^= std::byte{1};
  changed[1] = Tensor::owning(tensors[1].name, tensors[1].dtype, tensors[1].shape, std::move(bytes));
  CHECK(checksum(changed) != base);

  // A byte moved from a name to the next tensor's name keeps the concatenation but not the checksum.
  auto a = sample_tensors(1), b = sample_tensors(1);
  a[0].name = "ab";
  a[1].name = "c";
  b[0].name = "a";
  b[1].name = "bc";
  CHECK(checksum(a) != checksum(b));

  // The checksum the decoder's side computes equals the sender's.
  const Message m = make_message(ExpertSnapshot{sample_spec(), 1, tensors});
  const auto decoded = round_trip(m);
  CHECK(checksum(std::get<ExpertSnapshot>(require_ok(decoded).body).tensors) == base);
}

TEST_CASE("text: cuts on code-point boundaries, replaces ill-formed subparts", "[text]") {
  const std::string zh = "\xE8\xAF\xB7\xE7\x94\xA8";  // two 3-byte characters
  CHECK(utf8_head(zh, 6) == zh);
  CHECK(utf8_head(zh, 5) == zh.substr(0, 3));
  CHECK(utf8_head(zh, 4) == zh.substr(0, 3));
  CHECK(utf8_head(zh, 3) == zh.substr(0, 3));
  CHECK(utf8_head(zh, 2).empty());
  CHECK(utf8_head("abc", 80) == "abc");
  const std::string emoji = "a\xF0\x9F\x98\x80" "b";
  for (size_t n = 0; n <= emoji.size(); ++n) {
    INFO(n);
    auto head = utf8_head(emoji, n);
    CHECK(is_valid_utf8(head));
    CHECK(head.size() <= n);
    CHECK(emoji.compare(0, head.size(), head) == 0);
  }
  CHECK(valid_utf8("ok") == "ok");
  CHECK(valid_utf8("a\xE2\x82") == "a\xEF\xBF\xBD");            // a cut 3-byte sequence: one U+FFFD
  CHECK(valid_utf8("\x80\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD");  // two lone continuation bytes: two
  CHECK(valid_utf8("x\xC0\xAFy") == "x\xEF\xBF\xBD\xEF\xBF\xBDy");
  CHECK(is_valid_utf8(utf8_head("\xE8\xAF\xB7\xFF\xE7\x94", 80)));
}

TEST_CASE("random ids: 128 bits, and two processes started alike never draw the same one", "[random_id]") {
  std::set<std::string> ids;
  for (int i = 0; i < 10000; ++i) {
    auto id = random_id_128();
    REQUIRE(id.size() == 32);
    REQUIRE(id.find_first_not_of("0123456789abcdef") == std::string::npos);
    ids.insert(id);
  }
  CHECK(ids.size() == 10000);
  // A restarted worker is a new process in the same state as the old one: a generator seeded at start
  // (as update ids once were) would repeat itself in two forked children; the kernel's does not.
  auto child_id = [] {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      const auto id = random_id_128();
      ssize_t n = ::write(fds[1], id.data(), id.size());
      ::_exit(n == static_cast<ssize_t>(id.size()) ? 0 : 1);
    }
    ::close(fds[1]);
    char buf[32];
    size_t got = 0;
    for (ssize_t n; got < sizeof buf && (n = ::read(fds[0], buf + got, sizeof buf - got)) > 0;) got += size_t(n);
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    REQUIRE(got == sizeof buf);
    return std::string(buf, sizeof buf);
  };
  CHECK(child_id() != child_id());
}
