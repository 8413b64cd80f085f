#include "net/codec.hpp"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string_view>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include "net/fedmoe.capnp.h"
#include "net/text.hpp"

namespace fedmoe::net {

namespace s = ::fedmoe::schema;

// The plain enums convert to and from the wire enums by value: both must list the same enumerators in
// the same order. A value the schema gains later is rejected by decode until messages.hpp has it too.
static_assert(static_cast<uint16_t>(s::Role::CLIENT) == static_cast<uint16_t>(Role::client));
static_assert(static_cast<uint16_t>(s::DeviceKind::CUDA) == static_cast<uint16_t>(DeviceKind::cuda));
static_assert(static_cast<uint16_t>(s::DType::BF16) == static_cast<uint16_t>(DType::bf16));
static_assert(static_cast<uint16_t>(s::RejectReason::STORAGE_ERROR) ==
              static_cast<uint16_t>(RejectReason::storage_error));
// Body's alternatives follow the union's order, so alternative i is discriminant i.
static_assert(static_cast<uint16_t>(s::EntryKind::ROUND_CLOSED) == static_cast<uint16_t>(EntryKind::round_closed));
// Body's alternatives follow the union's order, so alternative i is discriminant i.
static_assert(std::variant_size_v<Body> == static_cast<size_t>(s::Envelope::Body::ISR_CHANGE) + 1);

const char* to_string(DecodeErrc e) {
  switch (e) {
    case DecodeErrc::too_large: return "too_large";
    case DecodeErrc::truncated: return "truncated";
    case DecodeErrc::bad_segment_table: return "bad_segment_table";
    case DecodeErrc::traversal_limit: return "traversal_limit";
    case DecodeErrc::nesting_limit: return "nesting_limit";
    case DecodeErrc::malformed: return "malformed";
    case DecodeErrc::unknown_body: return "unknown_body";
    case DecodeErrc::unknown_enum: return "unknown_enum";
    case DecodeErrc::invalid_text: return "invalid_text";
    case DecodeErrc::too_many_elements: return "too_many_elements";
    case DecodeErrc::bad_shape: return "bad_shape";
    case DecodeErrc::byte_count_mismatch: return "byte_count_mismatch";
    case DecodeErrc::transfer_failed: return "transfer_failed";
  }
  return "invalid";
}

std::string DecodeError::message() const { return std::string(to_string(code)) + ": " + detail; }

namespace {

// Cap'n Proto stores a Data field's byte count in 29 bits.
constexpr uint64_t kMaxBlobBytes = (uint64_t{1} << 29) - 1;

// Every referenced tensor becomes a segment of its own. Past this many, encode copies tensors into the
// message instead, so that a message stays within the decoder's default segment limit; the margin
// leaves room for the builder's own segments, which grow geometrically and so stay few.
constexpr size_t kMaxReferencedTensors = DecodeLimits{}.max_segments - 32;

std::string shape_string(const std::vector<uint64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// numel * dtype_size, or false when that does not fit in 64 bits.
bool expected_bytes(const Tensor& t, uint64_t& bytes) {
  try {
    return !__builtin_mul_overflow(t.numel(), dtype_size(t.dtype), &bytes);
  } catch (const std::overflow_error&) {
    return false;
  }
}

// A text field as written: ill-formed UTF-8 (a prompt cut inside a character by someone) goes out
// with U+FFFD in its place instead of making every receiver reject the whole message. The fixed copy,
// when one is needed, lives until the end of the full expression that sets the field.
struct TextField {
  std::string fixed;
  const std::string* source;
  explicit TextField(const std::string& s) : source(&s) {
    if (!is_valid_utf8(s)) {
      fixed = valid_utf8(s);
      source = &fixed;
    }
  }
  TextField(const TextField&) = delete;  // `source` may point into this object
  TextField& operator=(const TextField&) = delete;
  operator capnp::Text::Reader() const { return {source->data(), source->size()}; }
};
TextField text(const std::string& s) { return TextField(s); }

// ---------------------------------------------------------------------------------------------------
// Encoding

// Writes tensors, referencing their bytes in place where Cap'n Proto allows it and keeping the owners
// of referenced bytes alive.
class TensorWriter {
 public:
  TensorWriter(capnp::Orphanage orphanage, std::vector<std::shared_ptr<const void>>& owners)
      : orphanage_(orphanage), owners_(owners) {}

  void write(s::Tensor::Builder b, const Tensor& t) {
    uint64_t expected = 0;
    if (!expected_bytes(t, expected)) {
      throw std::invalid_argument("encode: tensor '" + t.name + "' shape " + shape_string(t.shape) +
                                  ": byte count overflows uint64");
    }
    if (expected != t.size_bytes) {
      throw std::invalid_argument("encode: tensor '" + t.name + "' shape " + shape_string(t.shape) + " " +
                                  to_string(t.dtype) + " needs " + std::to_string(expected) + " bytes, has " +
                                  std::to_string(t.size_bytes));
    }
    if (t.size_bytes > kMaxBlobBytes) {
      throw std::invalid_argument("encode: tensor '" + t.name + "' has " + std::to_string(t.size_bytes) +
                                  " bytes, more than Cap'n Proto's Data limit of " + std::to_string(kMaxBlobBytes));
    }
    if (t.size_bytes > 0 && t.data == nullptr) {
      throw std::invalid_argument("encode: tensor '" + t.name + "' has no data pointer");
    }
    b.setName(text(t.name));
    b.setDtype(static_cast<s::DType>(t.dtype));
    b.setShape(kj::arrayPtr(t.shape.data(), t.shape.size()));
    if (t.size_bytes == 0) return;  // a null Data pointer reads back as empty

    capnp::Data::Reader bytes(reinterpret_cast<const kj::byte*>(t.data), t.size_bytes);
    // An external segment must start word-aligned and is a whole number of words long: Cap'n Proto
    // would read (and send) the bytes after a partial last word, which the tensor does not own.
    const bool referencable = reinterpret_cast<uintptr_t>(t.data) % sizeof(capnp::word) == 0 &&
                        t.size_bytes % sizeof(capnp::word) == 0 && referenced_ < kMaxReferencedTensors;
    if (referencable) {
      b.adoptData(orphanage_.referenceExternalData(bytes));
      if (t.owner) owners_.push_back(t.owner);
      ++referenced_;
    } else {
      b.setData(bytes);
    }
  }

  void write(capnp::List<s::Tensor>::Builder list, const std::vector<Tensor>& tensors) {
    for (size_t i = 0; i < tensors.size(); ++i) write(list[i], tensors[i]);
  }

 private:
  capnp::Orphanage orphanage_;
  std::vector<std::shared_ptr<const void>>& owners_;
  size_t referenced_ = 0;
};

void write_texts(capnp::List<capnp::Text>::Builder list, const std::vector<std::string>& texts) {
  for (size_t i = 0; i < texts.size(); ++i) list.set(i, text(texts[i]));
}

void write(s::ExpertSpec::Builder b, const ExpertSpec& x) {
  b.setExpertId(text(x.expert_id));
  b.setDomain(text(x.domain));
  b.setLoraRank(x.lora_rank);
  b.setLoraAlpha(x.lora_alpha);
  b.setLoraDropout(x.lora_dropout);
  write_texts(b.initTargetModules(x.target_modules.size()), x.target_modules);
  b.setBaseModelId(text(x.base_model_id));
  b.setUseRslora(x.use_rslora);
  b.setRemoved(x.removed);
}

void write(s::ExpertRef::Builder b, const ExpertRef& x) {
  b.setExpertId(text(x.expert_id));
  b.setVersion(x.version);
}

void write(s::Replica::Builder b, const Replica& x) {
  b.setShardId(text(x.shard_id));
  b.setEndpoint(text(x.endpoint));
  b.setVersion(x.version);
  b.setAlive(x.alive);
}

void write(s::ExpertPlacement::Builder b, const ExpertPlacement& x) {
  b.setExpertId(text(x.expert_id));
  auto replicas = b.initReplicas(x.replicas.size());
  for (size_t i = 0; i < x.replicas.size(); ++i) write(replicas[i], x.replicas[i]);
  b.setTerm(x.term);
  write_texts(b.initInSync(x.in_sync.size()), x.in_sync);
  b.setMinInSync(x.min_in_sync);
}

void write(s::Assignment::Builder b, const Assignment& x) {
  b.setWorkerId(text(x.worker_id));
  b.setExpertId(text(x.expert_id));
}

void write(s::RouteChoice::Builder b, const RouteChoice& x) {
  b.setExpertId(text(x.expert_id));
  b.setVersion(x.version);
  b.setScore(x.score);
  b.setShardId(text(x.shard_id));
  b.setReason(text(x.reason));
}

template <class T, class ListBuilder>
void write_list(ListBuilder list, const std::vector<T>& items) {
  for (size_t i = 0; i < items.size(); ++i) write(list[i], items[i]);
}

// Fills the envelope's body union: one overload per alternative of Body.
class BodyWriter {
 public:
  BodyWriter(s::Envelope::Body::Builder body, TensorWriter& tensors) : body_(body), tensors_(tensors) {}

  void operator()(const Hello& x) {
    auto b = body_.initHello();
    b.setNodeId(text(x.node_id));
    b.setRole(static_cast<s::Role>(x.role));
    b.setDevice(static_cast<s::DeviceKind>(x.device));
    b.setDeviceName(text(x.device_name));
    b.setDeclaredSpeed(x.declared_speed);
    b.setMeasuredSpeed(x.measured_speed);
    b.setEndpoint(text(x.endpoint));
    b.setProtocolVersion(x.protocol_version);
    b.setExpert(text(x.expert));
  }
  void operator()(const HelloAck& x) {
    auto b = body_.initHelloAck();
    b.setAccepted(x.accepted);
    b.setLeaseMs(x.lease_ms);
    b.setReason(text(x.reason));
    b.setCoordinatorId(text(x.coordinator_id));
  }
  void operator()(const Heartbeat& x) {
    auto b = body_.initHeartbeat();
    b.setNodeId(text(x.node_id));
    b.setSeq(x.seq);
    b.setLoad(x.load);
    b.setMeasuredSpeed(x.measured_speed);
  }
  void operator()(const Leave& x) {
    auto b = body_.initLeave();
    b.setNodeId(text(x.node_id));
    b.setReason(text(x.reason));
  }
  void operator()(const ExpertSpec& x) { write(body_.initExpertSpec(), x); }
  void operator()(const SnapshotRequest& x) {
    auto b = body_.initSnapshotRequest();
    b.setExpertId(text(x.expert_id));
    b.setMinVersion(x.min_version);
    b.setSubscribe(x.subscribe);
  }
  void operator()(const ExpertSnapshot& x) {
    auto b = body_.initExpertSnapshot();
    write(b.initSpec(), x.spec);
    b.setVersion(x.version);
    tensors_.write(b.initTensors(x.tensors.size()), x.tensors);
    write_texts(b.initSeenUpdateIds(x.seen_update_ids.size()), x.seen_update_ids);
    b.setTerm(x.term);
    b.setLsn(x.lsn);
    write_entries(b.initPending(x.pending.size()), x.pending);
  }
  void write_entries(capnp::List<s::LogEntry>::Builder list, const std::vector<LogEntry>& entries) {
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& x = entries[i];
      auto b = list[i];
      b.setLsn(x.lsn);
      b.setTerm(x.term);
      b.setKind(static_cast<s::EntryKind>(x.kind));
      b.setVersion(x.version);
      if (x.has_update) write_update(b.initUpdate(), x.update);
      tensors_.write(b.initTensors(x.tensors.size()), x.tensors);
      b.setStaleness(x.staleness);
      b.setWeight(x.weight);
    }
  }
  void operator()(const ReplicaAppend& x) {
    auto b = body_.initReplicaAppend();
    b.setExpertId(text(x.expert_id));
    b.setTerm(x.term);
    b.setCommittedLsn(x.committed_lsn);
    write_entries(b.initEntries(x.entries.size()), x.entries);
  }
  void operator()(const ReplicaAck& x) {
    auto b = body_.initReplicaAck();
    b.setExpertId(text(x.expert_id));
    b.setTerm(x.term);
    b.setLsn(x.lsn);
    b.setVersion(x.version);
    b.setChecksum(x.checksum);
    b.setRefused(text(x.refused));
  }
  void operator()(const IsrChange& x) {
    auto b = body_.initIsrChange();
    b.setExpertId(text(x.expert_id));
    b.setTerm(x.term);
    write_texts(b.initInSync(x.in_sync.size()), x.in_sync);
    b.setReason(text(x.reason));
  }
  void operator()(const SnapshotReceipt& x) {
    auto b = body_.initSnapshotReceipt();
    b.setExpertId(text(x.expert_id));
    b.setVersion(x.version);
    b.setTensorCount(x.tensor_count);
    b.setByteCount(x.byte_count);
    b.setChecksum(x.checksum);
    b.setLsn(x.lsn);
    b.setTerm(x.term);
  }
  void operator()(const UpdatePush& x) { write_update(body_.initUpdatePush(), x); }
  void write_update(s::UpdatePush::Builder b, const UpdatePush& x) {
    b.setExpertId(text(x.expert_id));
    b.setWorkerId(text(x.worker_id));
    b.setUpdateId(text(x.update_id));
    b.setBaseVersion(x.base_version);
    b.setSampleCount(x.sample_count);
    b.setTrainLoss(x.train_loss);
    tensors_.write(b.initDeltas(x.deltas.size()), x.deltas);
    b.setLocalSteps(x.local_steps);
    b.setComputeSeconds(x.compute_seconds);
  }
  void operator()(const UpdateAck& x) {
    auto b = body_.initUpdateAck();
    b.setExpertId(text(x.expert_id));
    b.setUpdateId(text(x.update_id));
    b.setNewVersion(x.new_version);
    b.setStaleness(x.staleness);
    b.setWeight(x.weight);
  }
  void operator()(const UpdateReject& x) {
    auto b = body_.initUpdateReject();
    b.setExpertId(text(x.expert_id));
    b.setUpdateId(text(x.update_id));
    b.setReason(static_cast<s::RejectReason>(x.reason));
    b.setDetail(text(x.detail));
    b.setCurrentVersion(x.current_version);
  }
  void operator()(const PlacementMap& x) {
    auto b = body_.initPlacementMap();
    b.setEpoch(x.epoch);
    write_list(b.initPlacements(x.placements.size()), x.placements);
    write_list(b.initAssignments(x.assignments.size()), x.assignments);
  }
  void operator()(const RouteRequest& x) {
    auto b = body_.initRouteRequest();
    b.setRequestId(x.request_id);
    b.setPrompt(text(x.prompt));
    b.setMaxExperts(x.max_experts);
  }
  void operator()(const RouteReply& x) {
    auto b = body_.initRouteReply();
    b.setRequestId(x.request_id);
    write_list(b.initChoices(x.choices.size()), x.choices);
  }
  void operator()(const GenerateRequest& x) {
    auto b = body_.initGenerateRequest();
    b.setRequestId(x.request_id);
    b.setPrompt(text(x.prompt));
    write_list(b.initExperts(x.experts.size()), x.experts);
    b.setMaxNewTokens(x.max_new_tokens);
    b.setTemperature(x.temperature);
    b.setTopK(x.top_k);
    b.setTopP(x.top_p);
    b.setSeed(x.seed);
    b.setStream(x.stream);
    b.setMaxExperts(x.max_experts);
    b.setCombine(text(x.combine));
  }
  void operator()(const GenerateReply& x) {
    auto b = body_.initGenerateReply();
    b.setRequestId(x.request_id);
    b.setText(text(x.text));
    write_list(b.initExperts(x.experts.size()), x.experts);
    b.setDone(x.done);
    b.setError(text(x.error));
    write_list(b.initChoices(x.choices.size()), x.choices);
    b.setCombine(text(x.combine));
  }
  void operator()(const StatusRequest& x) {
    auto b = body_.initStatusRequest();
    b.setRequestId(x.request_id);
    b.setVerbose(x.verbose);
  }
  void operator()(const StatusReply& x) {
    auto b = body_.initStatusReply();
    b.setRequestId(x.request_id);
    b.setNodeId(text(x.node_id));
    b.setRole(static_cast<s::Role>(x.role));
    b.setJson(text(x.json));
  }
  void operator()(const ErrorReply& x) {
    auto b = body_.initErrorReply();
    b.setCode(text(x.code));
    b.setDetail(text(x.detail));
  }
  void operator()(const RoundClose& x) {
    auto b = body_.initRoundClose();
    b.setExpertId(text(x.expert_id));
    b.setRoundVersion(x.round_version);
  }
  void operator()(const VersionNotice& x) {
    auto b = body_.initVersionNotice();
    b.setExpertId(text(x.expert_id));
    b.setVersion(x.version);
    b.setShardId(text(x.shard_id));
  }

 private:
  s::Envelope::Body::Builder body_;
  TensorWriter& tensors_;
};

// ---------------------------------------------------------------------------------------------------
// Decoding

// Thrown by the checks below and caught in decode(), so that each check is one line at the place it
// applies instead of an error threaded through every return.
struct DecodeFailure {
  DecodeError error;
};

[[noreturn]] void fail(DecodeErrc code, std::string detail) { throw DecodeFailure{{code, std::move(detail)}}; }

uint32_t load_u32(const std::byte* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Checks the stream framing before Cap'n Proto sees it: FlatArrayMessageReader would allocate a table
// for whatever segment count the first word claims, and reports every inconsistency alike.
void check_framing(const Buffer& buffer, const DecodeLimits& limits) {
  const uint64_t size = buffer.size();
  if (size > limits.max_message_bytes) {
    fail(DecodeErrc::too_large, std::to_string(size) + " bytes, limit " + std::to_string(limits.max_message_bytes));
  }
  if (size == 0 || size % sizeof(capnp::word) != 0) {
    fail(DecodeErrc::truncated, std::to_string(size) + " bytes is not a positive whole number of 8-byte words");
  }
  const uint64_t words = size / sizeof(capnp::word);
  const uint64_t segments = uint64_t{load_u32(buffer.data())} + 1;
  if (segments > limits.max_segments) {
    fail(DecodeErrc::bad_segment_table,
         std::to_string(segments) + " segments, limit " + std::to_string(limits.max_segments));
  }
  // uint32 count, one uint32 size per segment, padded to a whole word.
  const uint64_t table_words = segments / 2 + 1;
  if (table_words > words) {
    fail(DecodeErrc::bad_segment_table, "segment table of " + std::to_string(segments) + " segments needs " +
                                            std::to_string(table_words * 8) + " bytes, message has " +
                                            std::to_string(size));
  }
  uint64_t segment_words = 0;
  for (uint64_t i = 0; i < segments; ++i) segment_words += load_u32(buffer.data() + 4 + 4 * i);
  const uint64_t available = words - table_words;
  if (segment_words > available) {
    fail(DecodeErrc::truncated, "segments announce " + std::to_string(segment_words * 8) + " bytes, " +
                                    std::to_string(available * 8) + " follow the segment table");
  }
  if (segment_words < available) {
    fail(DecodeErrc::malformed,
         std::to_string((available - segment_words) * 8) + " bytes follow the last segment");
  }
}

DecodeError from_kj(const kj::Exception& e) {
  const std::string_view description = e.getDescription().cStr();
  auto has = [&](std::string_view what) { return description.find(what) != std::string_view::npos; };
  DecodeErrc code = DecodeErrc::malformed;
  if (has("traversal limit")) {
    code = DecodeErrc::traversal_limit;
  } else if (has("nesting") || has("too deeply")) {
    code = DecodeErrc::nesting_limit;
  } else if (has("ends prematurely")) {
    code = DecodeErrc::truncated;
  }
  // Out-of-bounds pointers stay `malformed`: the framing check has already matched the segments to the
  // bytes received, so such a pointer is wrong rather than cut off.
  return {code, "Cap'n Proto: " + std::string(description)};
}

bool is_control(int32_t cp) { return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F); }

enum class Presence { required, optional };

// Converts a decoded envelope into a Message, applying every DecodeLimits bound and schema rule that
// Cap'n Proto itself does not. Each pointer field is read once: reads count against the traversal limit.
class MessageReader {
 public:
  MessageReader(const DecodeLimits& limits, std::shared_ptr<const Buffer> buffer)
      : limits_(limits), buffer_(std::move(buffer)) {}

  Message envelope(s::Envelope::Reader r) {
    Message m;
    m.sender_id = id(r.getSenderId(), "senderId", Presence::optional);
    m.correlation_id = r.getCorrelationId();
    m.sent_at_unix_ms = r.getSentAtUnixMs();
    m.body = body(r.getBody());
    return m;
  }

 private:
  Body body(s::Envelope::Body::Reader b) {
    using W = s::Envelope::Body::Which;
    switch (b.which()) {
      case W::HELLO: return read(b.getHello());
      case W::HELLO_ACK: return read(b.getHelloAck());
      case W::HEARTBEAT: return read(b.getHeartbeat());
      case W::LEAVE: return read(b.getLeave());
      case W::EXPERT_SPEC: return read(b.getExpertSpec());
      case W::SNAPSHOT_REQUEST: return read(b.getSnapshotRequest());
      case W::EXPERT_SNAPSHOT: return read(b.getExpertSnapshot());
      case W::SNAPSHOT_RECEIPT: return read(b.getSnapshotReceipt());
      case W::UPDATE_PUSH: return read(b.getUpdatePush());
      case W::UPDATE_ACK: return read(b.getUpdateAck());
      case W::UPDATE_REJECT: return read(b.getUpdateReject());
      case W::PLACEMENT_MAP: return read(b.getPlacementMap());
      case W::ROUTE_REQUEST: return read(b.getRouteRequest());
      case W::ROUTE_REPLY: return read(b.getRouteReply());
      case W::GENERATE_REQUEST: return read(b.getGenerateRequest());
      case W::GENERATE_REPLY: return read(b.getGenerateReply());
      case W::STATUS_REQUEST: return read(b.getStatusRequest());
      case W::STATUS_REPLY: return read(b.getStatusReply());
      case W::ERROR_REPLY: return read(b.getErrorReply());
      case W::VERSION_NOTICE: return read(b.getVersionNotice());
      case W::ROUND_CLOSE: return read(b.getRoundClose());
      case W::REPLICA_APPEND: return read(b.getReplicaAppend());
      case W::REPLICA_ACK: return read(b.getReplicaAck());
      case W::ISR_CHANGE: return read(b.getIsrChange());
    }
    fail(DecodeErrc::unknown_body, "body discriminant " + std::to_string(static_cast<uint16_t>(b.which())) +
                                       " (this build knows 0.." + std::to_string(std::variant_size_v<Body> - 1) +
                                       ")");
  }

  // --- scalars and texts

  // Cap'n Proto hands unknown enumerants through as raw numbers.
  template <class Plain, class Wire>
  Plain enumeration(Wire value, Plain last, const char* field) {
    const auto raw = static_cast<uint16_t>(value);
    if (raw > static_cast<uint16_t>(last)) {
      fail(DecodeErrc::unknown_enum, std::string(field) + " = " + std::to_string(raw) + " (this build knows 0.." +
                                         std::to_string(static_cast<uint16_t>(last)) + ")");
    }
    return static_cast<Plain>(raw);
  }

  // Free text (prompts, reasons, JSON): bounded and valid UTF-8.
  std::string text(capnp::Text::Reader t, const char* field) {
    const std::string_view v(t.cStr(), t.size());
    if (v.size() > limits_.max_text_bytes) {
      fail(DecodeErrc::invalid_text, std::string(field) + " is " + std::to_string(v.size()) +
                                         " bytes, limit " + std::to_string(limits_.max_text_bytes));
    }
    for (size_t i = 0; i < v.size();) {
      if (next_code_point(v, i) < 0) {
        fail(DecodeErrc::invalid_text, std::string(field) + " is not valid UTF-8 at byte " + std::to_string(i));
      }
    }
    return std::string(v);
  }

  // Ids and names end up in logs, maps and file names: short, UTF-8, no control characters.
  std::string id(capnp::Text::Reader t, const char* field, Presence presence) {
    const std::string_view v(t.cStr(), t.size());
    if (v.empty()) {
      if (presence == Presence::required) fail(DecodeErrc::invalid_text, std::string(field) + " is empty");
      return {};
    }
    if (v.size() > limits_.max_name_bytes) {
      fail(DecodeErrc::invalid_text, std::string(field) + " is " + std::to_string(v.size()) +
                                         " bytes, limit " + std::to_string(limits_.max_name_bytes));
    }
    for (size_t i = 0; i < v.size();) {
      const size_t at = i;
      const int32_t cp = next_code_point(v, i);
      if (cp < 0) fail(DecodeErrc::invalid_text, std::string(field) + " is not valid UTF-8 at byte " + std::to_string(at));
      if (is_control(cp)) {
        char code[16];
        std::snprintf(code, sizeof code, "U+%04X", static_cast<unsigned>(cp));
        fail(DecodeErrc::invalid_text,
             std::string(field) + " has control character " + code + " at byte " + std::to_string(at));
      }
    }
    return std::string(v);
  }

  void check_count(size_t n, size_t limit, const char* field, const char* limit_name) {
    if (n > limit) {
      fail(DecodeErrc::too_many_elements, std::string(field) + " has " + std::to_string(n) + " elements, " +
                                              limit_name + " is " + std::to_string(limit));
    }
  }

  template <class T, class ListReader>
  std::vector<T> list(ListReader l, const char* field) {
    check_count(l.size(), limits_.max_list_elements, field, "max_list_elements");
    std::vector<T> out;
    out.reserve(l.size());
    for (auto item : l) out.push_back(read(item));
    return out;
  }

  // --- tensors

  Tensor tensor(s::Tensor::Reader r, const char* field, size_t index) {
    const std::string where = std::string(field) + "[" + std::to_string(index) + "]";
    Tensor t;
    t.name = id(r.getName(), (where + ".name").c_str(), Presence::required);
    t.dtype = enumeration(r.getDtype(), DType::bf16, (where + ".dtype").c_str());
    const auto shape = r.getShape();
    if (shape.size() > limits_.max_rank) {
      fail(DecodeErrc::bad_shape, "tensor '" + t.name + "' (" + where + ") has rank " +
                                      std::to_string(shape.size()) + ", limit " + std::to_string(limits_.max_rank));
    }
    t.shape.reserve(shape.size());
    for (uint64_t d : shape) t.shape.push_back(d);
    uint64_t expected = 0;
    if (!expected_bytes(t, expected)) {
      fail(DecodeErrc::bad_shape, "tensor '" + t.name + "' (" + where + ") shape " + shape_string(t.shape) + " " +
                                      to_string(t.dtype) + ": byte count overflows uint64");
    }
    const auto data = r.getData();
    if (data.size() != expected) {
      fail(DecodeErrc::byte_count_mismatch, "tensor '" + t.name + "' (" + where + ") shape " +
                                                shape_string(t.shape) + " " + to_string(t.dtype) + ": expected " +
                                                std::to_string(expected) + " bytes, got " +
                                                std::to_string(data.size()));
    }
    // The bytes stay where they are, inside the received buffer, which the tensor keeps alive.
    t.data = reinterpret_cast<const std::byte*>(data.begin());
    t.size_bytes = data.size();
    t.owner = buffer_;
    return t;
  }

  // A list of ids (names, update ids, shard ids): bounded, each one checked like a single id.
  std::vector<std::string> ids(capnp::List<capnp::Text>::Reader l, const char* field) {
    check_count(l.size(), limits_.max_list_elements, field, "max_list_elements");
    const std::string element = std::string(field) + "[]";
    std::vector<std::string> out;
    out.reserve(l.size());
    for (auto t : l) out.push_back(id(t, element.c_str(), Presence::required));
    return out;
  }

  std::vector<Tensor> tensors(capnp::List<s::Tensor>::Reader l, const char* field) {
    check_count(l.size(), limits_.max_tensors, field, "max_tensors");
    std::vector<Tensor> out;
    out.reserve(l.size());
    for (size_t i = 0; i < l.size(); ++i) out.push_back(tensor(l[i], field, i));
    return out;
  }

  // --- structs, one overload per schema struct

  Hello read(s::Hello::Reader r) {
    Hello x;
    x.node_id = id(r.getNodeId(), "hello.nodeId", Presence::required);
    x.role = enumeration(r.getRole(), Role::client, "hello.role");
    x.device = enumeration(r.getDevice(), DeviceKind::cuda, "hello.device");
    x.device_name = text(r.getDeviceName(), "hello.deviceName");
    x.declared_speed = r.getDeclaredSpeed();
    x.measured_speed = r.getMeasuredSpeed();
    x.endpoint = text(r.getEndpoint(), "hello.endpoint");
    x.protocol_version = r.getProtocolVersion();
    x.expert = id(r.getExpert(), "hello.expert", Presence::optional);
    return x;
  }

  HelloAck read(s::HelloAck::Reader r) {
    HelloAck x;
    x.accepted = r.getAccepted();
    x.lease_ms = r.getLeaseMs();
    x.reason = text(r.getReason(), "helloAck.reason");
    // Empty when the node was turned away before a coordinator was known.
    x.coordinator_id = id(r.getCoordinatorId(), "helloAck.coordinatorId", Presence::optional);
    return x;
  }

  Heartbeat read(s::Heartbeat::Reader r) {
    Heartbeat x;
    x.node_id = id(r.getNodeId(), "heartbeat.nodeId", Presence::required);
    x.seq = r.getSeq();
    x.load = r.getLoad();
    x.measured_speed = r.getMeasuredSpeed();
    return x;
  }

  Leave read(s::Leave::Reader r) {
    Leave x;
    x.node_id = id(r.getNodeId(), "leave.nodeId", Presence::required);
    x.reason = text(r.getReason(), "leave.reason");
    return x;
  }

  ExpertSpec read(s::ExpertSpec::Reader r) {
    ExpertSpec x;
    x.expert_id = id(r.getExpertId(), "expertSpec.expertId", Presence::required);
    x.domain = text(r.getDomain(), "expertSpec.domain");
    x.lora_rank = r.getLoraRank();
    x.lora_alpha = r.getLoraAlpha();
    x.lora_dropout = r.getLoraDropout();
    x.target_modules = ids(r.getTargetModules(), "expertSpec.targetModules");
    x.base_model_id = text(r.getBaseModelId(), "expertSpec.baseModelId");
    x.use_rslora = r.getUseRslora();
    x.removed = r.getRemoved();
    return x;
  }

  SnapshotRequest read(s::SnapshotRequest::Reader r) {
    SnapshotRequest x;
    x.expert_id = id(r.getExpertId(), "snapshotRequest.expertId", Presence::required);
    x.min_version = r.getMinVersion();
    x.subscribe = r.getSubscribe();
    return x;
  }

  ExpertSnapshot read(s::ExpertSnapshot::Reader r) {
    ExpertSnapshot x;
    x.spec = read(r.getSpec());
    x.version = r.getVersion();
    x.tensors = tensors(r.getTensors(), "expertSnapshot.tensors");
    x.seen_update_ids = ids(r.getSeenUpdateIds(), "expertSnapshot.seenUpdateIds");
    x.term = r.getTerm();
    x.lsn = r.getLsn();
    x.pending = entries(r.getPending(), "expertSnapshot.pending");
    return x;
  }

  std::vector<LogEntry> entries(capnp::List<s::LogEntry>::Reader l, const char* field) {
    check_count(l.size(), limits_.max_list_elements, field, "max_list_elements");
    std::vector<LogEntry> out;
    out.reserve(l.size());
    for (auto r : l) {
      LogEntry x;
      x.lsn = r.getLsn();
      x.term = r.getTerm();
      x.kind = enumeration(r.getKind(), EntryKind::round_closed, "logEntry.kind");
      x.version = r.getVersion();
      x.has_update = r.hasUpdate();
      if (x.has_update) x.update = read(r.getUpdate());
      x.tensors = tensors(r.getTensors(), "logEntry.tensors");
      x.staleness = r.getStaleness();
      x.weight = r.getWeight();
      if (x.kind != EntryKind::round_closed && !x.has_update)
        fail(DecodeErrc::malformed, std::string(field) + ": a " + to_string(x.kind) + " entry without its update");
      out.push_back(std::move(x));
    }
    return out;
  }

  ReplicaAppend read(s::ReplicaAppend::Reader r) {
    ReplicaAppend x;
    x.expert_id = id(r.getExpertId(), "replicaAppend.expertId", Presence::required);
    x.term = r.getTerm();
    x.committed_lsn = r.getCommittedLsn();
    x.entries = entries(r.getEntries(), "replicaAppend.entries");
    return x;
  }

  ReplicaAck read(s::ReplicaAck::Reader r) {
    ReplicaAck x;
    x.expert_id = id(r.getExpertId(), "replicaAck.expertId", Presence::required);
    x.term = r.getTerm();
    x.lsn = r.getLsn();
    x.version = r.getVersion();
    x.checksum = r.getChecksum();
    x.refused = text(r.getRefused(), "replicaAck.refused");
    return x;
  }

  IsrChange read(s::IsrChange::Reader r) {
    IsrChange x;
    x.expert_id = id(r.getExpertId(), "isrChange.expertId", Presence::required);
    x.term = r.getTerm();
    x.in_sync = ids(r.getInSync(), "isrChange.inSync");
    x.reason = text(r.getReason(), "isrChange.reason");
    return x;
  }

  SnapshotReceipt read(s::SnapshotReceipt::Reader r) {
    SnapshotReceipt x;
    x.expert_id = id(r.getExpertId(), "snapshotReceipt.expertId", Presence::required);
    x.version = r.getVersion();
    x.tensor_count = r.getTensorCount();
    x.byte_count = r.getByteCount();
    x.checksum = r.getChecksum();
    x.lsn = r.getLsn();
    x.term = r.getTerm();
    return x;
  }

  UpdatePush read(s::UpdatePush::Reader r) {
    UpdatePush x;
    x.expert_id = id(r.getExpertId(), "updatePush.expertId", Presence::required);
    x.worker_id = id(r.getWorkerId(), "updatePush.workerId", Presence::required);
    x.update_id = id(r.getUpdateId(), "updatePush.updateId", Presence::required);
    x.base_version = r.getBaseVersion();
    x.sample_count = r.getSampleCount();
    x.train_loss = r.getTrainLoss();
    x.deltas = tensors(r.getDeltas(), "updatePush.deltas");
    x.local_steps = r.getLocalSteps();
    x.compute_seconds = r.getComputeSeconds();
    return x;
  }

  UpdateAck read(s::UpdateAck::Reader r) {
    UpdateAck x;
    x.expert_id = id(r.getExpertId(), "updateAck.expertId", Presence::required);
    x.update_id = id(r.getUpdateId(), "updateAck.updateId", Presence::required);
    x.new_version = r.getNewVersion();
    x.staleness = r.getStaleness();
    x.weight = r.getWeight();
    return x;
  }

  UpdateReject read(s::UpdateReject::Reader r) {
    UpdateReject x;
    // Optional: a push rejected as malformed may not have had readable ids.
    x.expert_id = id(r.getExpertId(), "updateReject.expertId", Presence::optional);
    x.update_id = id(r.getUpdateId(), "updateReject.updateId", Presence::optional);
    x.reason = enumeration(r.getReason(), RejectReason::storage_error, "updateReject.reason");
    x.detail = text(r.getDetail(), "updateReject.detail");
    x.current_version = r.getCurrentVersion();
    return x;
  }

  Replica read(s::Replica::Reader r) {
    Replica x;
    x.shard_id = id(r.getShardId(), "replica.shardId", Presence::required);
    x.endpoint = text(r.getEndpoint(), "replica.endpoint");
    x.version = r.getVersion();
    x.alive = r.getAlive();
    return x;
  }

  ExpertPlacement read(s::ExpertPlacement::Reader r) {
    ExpertPlacement x;
    x.expert_id = id(r.getExpertId(), "expertPlacement.expertId", Presence::required);
    x.replicas = list<Replica>(r.getReplicas(), "expertPlacement.replicas");
    x.term = r.getTerm();
    x.in_sync = ids(r.getInSync(), "expertPlacement.inSync");
    x.min_in_sync = r.getMinInSync();
    return x;
  }

  PlacementMap read(s::PlacementMap::Reader r) {
    PlacementMap x;
    x.epoch = r.getEpoch();
    x.placements = list<ExpertPlacement>(r.getPlacements(), "placementMap.placements");
    x.assignments = list<Assignment>(r.getAssignments(), "placementMap.assignments");
    return x;
  }

  Assignment read(s::Assignment::Reader r) {
    Assignment x;
    x.worker_id = id(r.getWorkerId(), "assignment.workerId", Presence::required);
    x.expert_id = id(r.getExpertId(), "assignment.expertId", Presence::required);
    return x;
  }

  ExpertRef read(s::ExpertRef::Reader r) {
    ExpertRef x;
    x.expert_id = id(r.getExpertId(), "expertRef.expertId", Presence::required);
    x.version = r.getVersion();
    return x;
  }

  RouteRequest read(s::RouteRequest::Reader r) {
    RouteRequest x;
    x.request_id = r.getRequestId();
    x.prompt = text(r.getPrompt(), "routeRequest.prompt");
    x.max_experts = r.getMaxExperts();
    return x;
  }

  RouteChoice read(s::RouteChoice::Reader r) {
    RouteChoice x;
    x.expert_id = id(r.getExpertId(), "routeChoice.expertId", Presence::required);
    x.version = r.getVersion();
    x.score = r.getScore();
    // Empty when the router chose an expert that no live shard serves yet.
    x.shard_id = id(r.getShardId(), "routeChoice.shardId", Presence::optional);
    x.reason = text(r.getReason(), "routeChoice.reason");
    return x;
  }

  RouteReply read(s::RouteReply::Reader r) {
    RouteReply x;
    x.request_id = r.getRequestId();
    x.choices = list<RouteChoice>(r.getChoices(), "routeReply.choices");
    return x;
  }

  GenerateRequest read(s::GenerateRequest::Reader r) {
    GenerateRequest x;
    x.request_id = r.getRequestId();
    x.prompt = text(r.getPrompt(), "generateRequest.prompt");
    x.experts = list<ExpertRef>(r.getExperts(), "generateRequest.experts");
    x.max_new_tokens = r.getMaxNewTokens();
    x.temperature = r.getTemperature();
    x.top_k = r.getTopK();
    x.top_p = r.getTopP();
    x.seed = r.getSeed();
    x.stream = r.getStream();
    x.max_experts = r.getMaxExperts();
    x.combine = text(r.getCombine(), "generateRequest.combine");
    return x;
  }

  GenerateReply read(s::GenerateReply::Reader r) {
    GenerateReply x;
    x.request_id = r.getRequestId();
    x.text = text(r.getText(), "generateReply.text");
    x.experts = list<ExpertRef>(r.getExperts(), "generateReply.experts");
    x.done = r.getDone();
    x.error = text(r.getError(), "generateReply.error");
    x.choices = list<RouteChoice>(r.getChoices(), "generateReply.choices");
    x.combine = text(r.getCombine(), "generateReply.combine");
    return x;
  }

  StatusRequest read(s::StatusRequest::Reader r) {
    StatusRequest x;
    x.request_id = r.getRequestId();
    x.verbose = r.getVerbose();
    return x;
  }

  StatusReply read(s::StatusReply::Reader r) {
    StatusReply x;
    x.request_id = r.getRequestId();
    x.node_id = id(r.getNodeId(), "statusReply.nodeId", Presence::required);
    x.role = enumeration(r.getRole(), Role::client, "statusReply.role");
    x.json = text(r.getJson(), "statusReply.json");
    return x;
  }

  ErrorReply read(s::ErrorReply::Reader r) {
    ErrorReply x;
    x.code = text(r.getCode(), "errorReply.code");
    x.detail = text(r.getDetail(), "errorReply.detail");
    return x;
  }

  RoundClose read(s::RoundClose::Reader r) {
    RoundClose x;
    x.expert_id = id(r.getExpertId(), "roundClose.expertId", Presence::required);
    x.round_version = r.getRoundVersion();
    return x;
  }

  VersionNotice read(s::VersionNotice::Reader r) {
    VersionNotice x;
    x.expert_id = id(r.getExpertId(), "versionNotice.expertId", Presence::required);
    x.version = r.getVersion();
    x.shard_id = id(r.getShardId(), "versionNotice.shardId", Presence::optional);
    return x;
  }

  const DecodeLimits& limits_;
  std::shared_ptr<const Buffer> buffer_;
};

Message decode_checked(std::shared_ptr<const Buffer> buffer, const DecodeLimits& limits) {
  if (!buffer) fail(DecodeErrc::truncated, "no buffer");
  check_framing(*buffer, limits);

  const size_t words = buffer->size() / sizeof(capnp::word);
  // Buffer storage is 64-byte aligned, as FlatArrayMessageReader requires of its words.
  const kj::ArrayPtr<const capnp::word> array(reinterpret_cast<const capnp::word*>(buffer->data()), words);
  capnp::ReaderOptions options;
  options.traversalLimitInWords =
      limits.traversal_limit_words != 0 ? limits.traversal_limit_words : 2 * uint64_t{words} + 1024;
  options.nestingLimit = limits.nesting_limit;

  // First walk every pointer of the message, fields this build does not know included, so that bad
  // pointers and limit violations surface before anything is converted or allocated.
  {
    capnp::FlatArrayMessageReader walk(array, options);
    walk.getRoot<s::Envelope>().totalSize();
  }
  // Each reader has its own traversal budget: the conversion reads every word the walk read once more,
  // and the limit bounds one pass over the message, not the two together.
  capnp::FlatArrayMessageReader reader(array, options);
  return MessageReader(limits, std::move(buffer)).envelope(reader.getRoot<s::Envelope>());
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

struct Encoded::Impl {
  capnp::MallocMessageBuilder builder;
  std::vector<std::shared_ptr<const void>> owners;  // of the tensor bytes the message references
  std::vector<uint32_t> segment_table;              // the stream framing, piece 0
};

Encoded::Encoded(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
  const auto segments = impl_->builder.getSegmentsForOutput();
  // Standard stream framing: segment count - 1, each segment's size in words, zero-padded to a word.
  auto& table = impl_->segment_table;
  table.assign((segments.size() + 2) & ~size_t{1}, 0);
  table[0] = static_cast<uint32_t>(segments.size() - 1);
  for (size_t i = 0; i < segments.size(); ++i) table[i + 1] = static_cast<uint32_t>(segments[i].size());

  pieces_.reserve(segments.size() + 1);
  pieces_.push_back({reinterpret_cast<const std::byte*>(table.data()), table.size() * sizeof(uint32_t)});
  for (const auto& segment : segments) {
    pieces_.push_back({reinterpret_cast<const std::byte*>(segment.begin()), segment.size() * sizeof(capnp::word)});
  }
  for (const Piece& p : pieces_) size_ += p.size;
}

Encoded::~Encoded() = default;
Encoded::Encoded(Encoded&&) noexcept = default;
Encoded& Encoded::operator=(Encoded&&) noexcept = default;

std::shared_ptr<Buffer> Encoded::flatten() const {
  auto buffer = Buffer::allocate(size_);
  copy_to(buffer->data());
  return buffer;
}

void Encoded::copy_to(std::byte* dst) const {
  for (const Piece& p : pieces_) {
    std::memcpy(dst, p.data, p.size);
    dst += p.size;
  }
}

Encoded encode(const Message& m) {
  auto impl = std::make_unique<Encoded::Impl>();
  try {
    auto root = impl->builder.initRoot<s::Envelope>();
    root.setSenderId(text(m.sender_id));
    root.setCorrelationId(m.correlation_id);
    root.setSentAtUnixMs(m.sent_at_unix_ms);
    TensorWriter tensors(impl->builder.getOrphanage(), impl->owners);
    std::visit(BodyWriter(root.getBody(), tensors), m.body);
  } catch (const kj::Exception& e) {
    // Cap'n Proto's own limits (a list or text too long for its size fields) are the caller's error.
    throw std::invalid_argument("encode: " + std::string(e.getDescription().cStr()));
  }
  return Encoded(std::move(impl));
}

Result<Message> decode(std::shared_ptr<const Buffer> bytes, const DecodeLimits& limits) {
  try {
    return decode_checked(std::move(bytes), limits);
  } catch (const DecodeFailure& f) {
    return f.error;
  } catch (const kj::Exception& e) {
    return from_kj(e);
  } catch (const std::exception& e) {
    return DecodeError{DecodeErrc::malformed, e.what()};
  } catch (...) {
    return DecodeError{DecodeErrc::malformed, "unknown exception"};
  }
}

Result<Message> decode_copy(const void* data, size_t size, const DecodeLimits& limits) {
  // Refuse before copying: the size check must not cost an allocation of the refused size.
  if (size > limits.max_message_bytes) {
    return DecodeError{DecodeErrc::too_large,
                       std::to_string(size) + " bytes, limit " + std::to_string(limits.max_message_bytes)};
  }
  std::shared_ptr<Buffer> buffer;
  try {
    buffer = Buffer::copy_of(data, size);
  } catch (const std::bad_alloc&) {
    return DecodeError{DecodeErrc::too_large, "cannot allocate " + std::to_string(size) + " bytes"};
  }
  return decode(std::move(buffer), limits);
}

}  // namespace fedmoe::net
