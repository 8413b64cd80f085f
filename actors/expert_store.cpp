#include "actors/expert_store.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "actors/registry.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/atomic_file.hpp"
#include "model/checkpoint.hpp"
#include "model/safetensors.hpp"
#include "net/checksum.hpp"
#include "net/codec.hpp"

namespace fedmoe::actors {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// --- the update log ---------------------------------------------------------------------------------
// Record: magic "FMLG" (u32), kind (u32), pre_version (u64: the expert's version when the record was
// accepted), payload size (u64), payload, checksum of header fields + payload (u64). Kind 3, written
// today: the payload is an encoded net::Message holding a ReplicaAppend with the one LogEntry. Kinds
// 1 (an UpdatePush, replayed through the policy) and 2 (a round closed, no payload) are read so that
// state directories written before the log held entries still recover.
constexpr uint32_t kLogMagic = 0x474C4D46;  // "FMLG" little-endian
enum : uint32_t { kRecordUpdate = 1, kRecordRoundClosed = 2, kRecordEntry = 3 };
struct RecordHeader {
  uint32_t magic, kind;
  uint64_t pre_version, size;
};
static_assert(sizeof(RecordHeader) == 24);

std::string errno_text() { return std::strerror(errno); }

void append_record(int fd, uint32_t kind, uint64_t pre_version, const std::vector<std::byte>& payload,
                   const std::string& what) {
  RecordHeader h{kLogMagic, kind, pre_version, payload.size()};
  uint64_t sum = net::checksum(&h, sizeof h);
  sum = net::checksum(payload.data(), payload.size(), sum);
  // Three writes, no copy of the payload (megabytes for a large expert); a crash between them
  // leaves a torn record, which read_log drops like any other.
  model::write_all(fd, &h, sizeof h, what);
  model::write_all(fd, payload.data(), payload.size(), what);
  model::write_all(fd, &sum, sizeof sum, what);
}

struct LogRecord {
  uint32_t kind;
  uint64_t pre_version;
  std::vector<std::byte> payload;
};

// Whether a whole, valid record starts at bytes[pos].
bool record_at(const std::vector<char>& bytes, size_t pos, RecordHeader* header = nullptr) {
  RecordHeader h;
  if (bytes.size() - pos < sizeof h) return false;
  std::memcpy(&h, bytes.data() + pos, sizeof h);
  if (h.magic != kLogMagic || (h.kind != kRecordUpdate && h.kind != kRecordRoundClosed && h.kind != kRecordEntry))
    return false;
  if (h.size > bytes.size() - pos - sizeof h || bytes.size() - pos - sizeof h - h.size < sizeof(uint64_t)) return false;
  const char* payload = bytes.data() + pos + sizeof h;
  uint64_t stored;
  std::memcpy(&stored, payload + h.size, sizeof stored);
  uint64_t sum = net::checksum(&h, sizeof h);
  sum = net::checksum(payload, h.size, sum);
  if (sum != stored) return false;
  if (header) *header = h;
  return true;
}

// The valid records of a log and the byte length they span. A torn or corrupt tail ends it (a crash
// mid-write: never acknowledged); a damaged record followed by a valid one is an error, since the
// records after it were acknowledged and must not be dropped.
std::vector<LogRecord> read_log(const fs::path& path, uint64_t* good_bytes, std::string* problem) {
  std::vector<LogRecord> out;
  *good_bytes = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) return out;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  while (pos < bytes.size()) {
    RecordHeader h;
    if (!record_at(bytes, pos, &h)) {
      *problem = "a torn or damaged record at byte " + std::to_string(pos);
      for (size_t later = pos + 1; later + sizeof(RecordHeader) <= bytes.size(); ++later)
        if (record_at(bytes, later))
          throw std::runtime_error(path.string() + ": a damaged record at byte " + std::to_string(pos) +
                                   " is followed by a valid one at byte " + std::to_string(later) +
                                   "; refusing to drop acknowledged updates (the disk corrupted the log)");
      break;
    }
    const char* payload = bytes.data() + pos + sizeof h;
    LogRecord r{h.kind, h.pre_version, std::vector<std::byte>(h.size)};
    std::memcpy(r.payload.data(), payload, h.size);
    out.push_back(std::move(r));
    pos += sizeof h + h.size + sizeof(uint64_t);
    *good_bytes = pos;
  }
  return out;
}

// --- conversions ------------------------------------------------------------------------------------

net::RejectReason wire_reason(model::UpdateRejection r) {
  switch (r) {
    case model::UpdateRejection::too_stale: return net::RejectReason::too_stale;
    case model::UpdateRejection::non_finite: return net::RejectReason::non_finite;
    case model::UpdateRejection::shape_mismatch: return net::RejectReason::shape_mismatch;
    case model::UpdateRejection::bad_version:
    case model::UpdateRejection::empty:
    case model::UpdateRejection::none: return net::RejectReason::malformed;
  }
  return net::RejectReason::unknown;
}

// A rejection of `u`, counted by reason for the expert and for its worker.
PushResult refused(HostedExpert& e, const net::UpdatePush& u, net::RejectReason reason, std::string detail) {
  PushResult r;
  r.reject.expert_id = u.expert_id;
  r.reject.update_id = u.update_id;
  r.reject.reason = reason;
  r.reject.detail = std::move(detail);
  r.reject.current_version = e.weights.version;
  ++e.rejected[net::to_string(reason)];
  ++e.workers[u.worker_id].rejected[net::to_string(reason)];
  return r;
}

std::vector<std::byte> encoded_entry(const std::string& expert_id, const net::LogEntry& entry) {
  net::Message m;
  m.body = net::ReplicaAppend{expert_id, entry.term, 0, {entry}};
  auto encoded = net::encode(m);
  std::vector<std::byte> payload(encoded.size_bytes());
  encoded.copy_to(payload.data());
  return payload;
}

model::ClientUpdate client_update_of(const net::UpdatePush& u) {
  model::ClientUpdate cu;
  cu.update_id = u.update_id;
  cu.worker_id = u.worker_id;
  cu.base_version = u.base_version;
  cu.sample_count = u.sample_count;
  cu.train_loss = u.train_loss;
  for (const auto& t : u.deltas) cu.delta.emplace(t.name, from_wire(t));
  return cu;
}

// Every weight of a version, as wire tensors viewing the same memory (no copy).
std::vector<net::Tensor> wire_tensors(const model::TensorMap& weights) {
  std::vector<net::Tensor> out;
  for (const auto& [name, t] : weights) out.push_back(to_wire(name, t));
  return out;
}

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// An expert id names a directory: refuse anything that could leave the state directory.
bool safe_dir_name(const std::string& id) {
  if (id.empty() || id == "." || id == ".." || id.size() > 200) return false;
  for (char c : id)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

}  // namespace

// --- ExpertStore ------------------------------------------------------------------------------------

ExpertStore::ExpertStore(ExpertStoreOptions options) : options_(std::move(options)) {
  model::make_policy(options_.policy);  // validates the configuration once, up front
  if (options_.state_dir.empty()) return;
  fs::create_directories(options_.state_dir);
  for (const auto& entry : fs::directory_iterator(options_.state_dir))
    if (entry.is_directory() && fs::exists(entry.path() / "snapshot.safetensors"))
      recover(entry.path().filename().string());
}

ExpertStore::~ExpertStore() {
  for (auto& [id, e] : experts_)
    if (e.log_fd >= 0) ::close(e.log_fd);
}

const HostedExpert* ExpertStore::find(const std::string& expert_id) const {
  auto it = experts_.find(expert_id);
  return it == experts_.end() ? nullptr : &it->second;
}

std::vector<std::string> ExpertStore::expert_ids() const {
  std::vector<std::string> out;
  for (const auto& [id, e] : experts_) out.push_back(id);
  return out;
}

void ExpertStore::publish(HostedExpert& e, std::vector<net::Tensor> tensors) {
  // Policies replace tensors instead of changing them (model/aggregation.cpp), so this version's
  // tensors stay as they are while pulls reference them and while FedAsync's history holds them.
  net::ExpertSnapshot snap;
  snap.spec = e.spec;
  snap.version = e.weights.version;
  if (tensors.empty()) tensors = wire_tensors(e.weights.weights);
  snap.tensors = std::move(tensors);
  e.history.emplace_back(e.weights.version, e.weights.weights);
  while (e.history.size() > std::max<uint64_t>(options_.history_versions, 1)) e.history.pop_front();
  // Visible once durable and released (make_visible); until then readers keep the version before.
  e.unreleased.emplace_back(e.lsn, std::move(snap));
  make_visible(e);
}

void ExpertStore::make_visible(HostedExpert& e) {
  if (options_.release_on_durable) e.released_lsn = std::max(e.released_lsn, e.durable_lsn);
  const uint64_t visible = std::min(e.released_lsn, e.durable_lsn);
  bool moved = false;
  while (!e.unreleased.empty() && e.unreleased.front().first <= visible) {
    e.published = std::move(e.unreleased.front().second);
    e.unreleased.pop_front();
    moved = true;
  }
  if (!moved) return;
  e.published_checksum.reset();  // computed when status or a receipt asks for it
  e.published_bytes = 0;
  for (const auto& t : e.published.tensors) e.published_bytes += t.size_bytes;
}

uint64_t ExpertStore::flush(const std::string& expert_id) {
  auto& e = experts_.at(expert_id);
  if (!e.failed.empty()) throw StorageError(e.failed);
  flush(e);
  return e.durable_lsn;
}

void ExpertStore::flush(HostedExpert& e) {
  if (e.log_fd >= 0 && e.durable_lsn != e.lsn) {
    if (options_.fsync && ::fdatasync(e.log_fd) != 0) {
      const std::string why = "cannot flush the update log of " + e.spec.expert_id + ": " + errno_text();
      ++e.storage_errors;
      restore(e, e.synced_bytes, why);
      throw StorageError(why + " (the records since the last flush are cut off; the expert stays at v" +
                         std::to_string(e.weights.version) + ")");
    }
    const off_t end = ::lseek(e.log_fd, 0, SEEK_END);
    if (end >= 0) e.synced_bytes = end;
  }
  e.durable_lsn = e.lsn;
  make_visible(e);
}

void ExpertStore::release(const std::string& expert_id, uint64_t lsn) {
  auto it = experts_.find(expert_id);
  if (it == experts_.end()) return;
  lsn = std::min(lsn, it->second.durable_lsn);  // never what a failed flush could take back
  if (lsn <= it->second.released_lsn) return;
  it->second.released_lsn = lsn;
  make_visible(it->second);
}

uint64_t ExpertStore::checksum_of(const HostedExpert& e) const {
  if (!e.published_checksum) e.published_checksum = net::checksum(e.published.tensors);
  return *e.published_checksum;
}

net::SnapshotReceipt ExpertStore::receipt_of(const HostedExpert& e) const {
  return {e.spec.expert_id, e.published.version, static_cast<uint32_t>(e.published.tensors.size()), e.published_bytes,
          checksum_of(e), e.durable_lsn, e.term};
}

net::SnapshotReceipt ExpertStore::receipt(const std::string& expert_id) const { return receipt_of(experts_.at(expert_id)); }

net::ExpertSnapshot ExpertStore::seed(const std::string& expert_id) {
  auto& e = experts_.at(expert_id);
  if (!e.failed.empty()) throw StorageError(e.failed);
  flush(e);
  net::ExpertSnapshot snap;
  snap.spec = e.spec;
  snap.version = e.weights.version;
  // The tensors in the order this version is published in (an installed version keeps its sender's
  // order; versions made here follow the names): checksums are over tensors in order.
  if (e.unreleased.empty() && e.published.version == e.weights.version)
    snap.tensors = e.published.tensors;
  else
    snap.tensors = wire_tensors(e.weights.weights);
  snap.seen_update_ids.assign(e.seen_order.begin(), e.seen_order.end());
  snap.term = e.term;
  snap.lsn = e.lsn;
  snap.pending = e.pending_entries;
  return snap;
}

void ExpertStore::remember(HostedExpert& e, const std::string& update_id) {
  if (e.seen.insert(update_id).second) {
    e.seen_order.push_back(update_id);
    ++e.ids_unsaved;
  }
}

net::SnapshotReceipt ExpertStore::install(const net::ExpertSnapshot& snap) {
  const auto& id = snap.spec.expert_id;
  if (!options_.state_dir.empty() && !safe_dir_name(id))
    throw std::invalid_argument("expert id '" + id + "' cannot name a directory (letters, digits, - _ . only)");
  auto it = experts_.find(id);
  if (it != experts_.end()) {
    const auto& held = it->second;
    const bool newer = snap.term > 0 || held.term > 0
                           ? snap.term > held.term || (snap.term == held.term && snap.lsn > held.lsn)
                           : snap.version > held.weights.version;
    if (!newer) return receipt_of(held);
  }
  if (snap.pending.size() > snap.lsn)
    throw std::invalid_argument("the snapshot holds " + std::to_string(snap.pending.size()) +
                                " pending entries but names log position " + std::to_string(snap.lsn));
  const uint64_t base_lsn = snap.lsn - snap.pending.size();  // the position of the weights themselves
  for (size_t i = 0; i < snap.pending.size(); ++i)
    if (snap.pending[i].lsn != base_lsn + 1 + i || snap.pending[i].kind != net::EntryKind::buffered)
      throw std::invalid_argument("pending entry " + std::to_string(i) + " of the snapshot is not the buffered entry " +
                                  std::to_string(base_lsn + 1 + i));
  // The received tensors are immutable views of the message buffer: they serve pulls as they are
  // (no copy). Policies never change tensors in place (each version gets new ones), so they are
  // the weights as well.
  model::TensorMap weights;
  for (const auto& t : snap.tensors) {
    if (weights.count(t.name)) throw std::invalid_argument("tensor '" + t.name + "' appears twice in the snapshot");
    weights.emplace(t.name, from_wire(t));
  }
  HostedExpert fresh;
  if (it != experts_.end()) {  // a newer version of a hosted expert: keep its ids and counters (copies, so
                               // that a failed write below leaves the hosted expert as it was)
    fresh.seen = it->second.seen;
    fresh.seen_order = it->second.seen_order;  // (update_ids is rewritten below)
    fresh.accepted = it->second.accepted;
    fresh.rejected = it->second.rejected;
    fresh.staleness_histogram = it->second.staleness_histogram;
    fresh.workers = it->second.workers;
    fresh.storage_errors = it->second.storage_errors;
    fresh.snapshot_failures = it->second.snapshot_failures;
  }
  fresh.spec = snap.spec;
  fresh.lsn = fresh.durable_lsn = fresh.released_lsn = base_lsn;
  fresh.term = snap.term;
  fresh.weights.version = snap.version;
  fresh.weights.weights = weights;
  fresh.policy = model::make_policy(options_.policy);
  fresh.published = snap;
  fresh.published.seen_update_ids.clear();  // pulls carry weights only
  for (const auto& id_seen : snap.seen_update_ids) remember(fresh, id_seen);
  fresh.published_checksum = net::checksum(snap.tensors);
  for (const auto& t : snap.tensors) fresh.published_bytes += t.size_bytes;
  fresh.history.emplace_back(snap.version, std::move(weights));
  if (!options_.state_dir.empty()) {
    // Durable before it is hosted: the snapshot (with the ids it carries), then an empty log.
    write_snapshot(id, fresh, /*rewrite_ids=*/true);
    if (it != experts_.end()) fresh.log_fd = std::exchange(it->second.log_fd, -1);
    open_files(id, fresh, /*truncate_log=*/true);
  }
  // The pending updates follow the weights in the log, as they did on the primary.
  for (const auto& entry : snap.pending) apply_entry(fresh, entry, /*replaying=*/false);
  fresh.released_lsn = fresh.lsn;  // buffered entries make no version: nothing more to show
  auto& e = experts_[id] = std::move(fresh);
  return receipt_of(e);
}

PushResult ExpertStore::push(const net::UpdatePush& u, uint64_t term, bool defer) {
  PushResult r;
  r.reject.expert_id = u.expert_id;
  r.reject.update_id = u.update_id;
  auto it = experts_.find(u.expert_id);
  if (it == experts_.end()) {
    r.reject.reason = net::RejectReason::unknown_expert;
    r.reject.detail = "this shard hosts no expert '" + u.expert_id + "'";
    return r;
  }
  auto& e = it->second;
  if (!e.failed.empty()) throw StorageError(e.failed);
  if (e.seen.count(u.update_id))
    return refused(e, u, net::RejectReason::duplicate_update,
                   "update '" + u.update_id + "' was already accepted; it is not applied twice");
  if (term < e.term && term != 0)
    throw std::logic_error("expert '" + u.expert_id + "': a push under term " + std::to_string(term) +
                           " after term " + std::to_string(e.term));
  if (term > e.term) e.term = term;
  auto folded = fold(e, u, /*replaying=*/false);
  if (folded.accepted && !defer) flush(e);
  return folded;
}

PushResult ExpertStore::fold(HostedExpert& e, const net::UpdatePush& u, bool replaying) {
  std::set<std::string> names;
  for (const auto& t : u.deltas)
    if (!names.insert(t.name).second)
      return refused(e, u, net::RejectReason::shape_mismatch, "tensor '" + t.name + "' appears twice");
  const auto cu = client_update_of(u);
  const model::TensorMap* base = nullptr;
  for (const auto& [version, weights] : e.history)
    if (version == u.base_version) base = &weights;
  const uint64_t pre_version = e.weights.version;
  auto outcome = e.policy->submit(e.weights, cu, base);
  if (!outcome.accepted()) return refused(e, u, wire_reason(outcome.reason), outcome.detail);
  PushResult r;
  r.applied = outcome.verdict == model::Outcome::Verdict::applied;
  // The entry the replicas get: a buffered update as it came, or the new version's weights as computed.
  auto& entry = r.entry;
  entry.lsn = e.lsn + 1;
  entry.term = e.term;
  entry.kind = r.applied ? net::EntryKind::applied : net::EntryKind::buffered;
  entry.version = e.weights.version;
  entry.has_update = true;
  entry.update = u;
  entry.staleness = outcome.staleness;
  entry.weight = outcome.weight;
  if (r.applied) {
    entry.update.deltas.clear();
    entry.tensors = wire_tensors(e.weights.weights);
  }
  // Write-ahead: the new version (or the buffered update) is in memory but published nowhere yet; it
  // becomes visible only once its record is on disk. A failed write restores the expert (and throws).
  if (!replaying && e.log_fd >= 0) log_entry(e, entry, pre_version);
  e.lsn = entry.lsn;
  if (replaying || e.log_fd < 0) e.durable_lsn = e.lsn;  // on disk already, or nowhere to put it
  if (replaying) e.released_lsn = e.lsn;

  r.ack.expert_id = u.expert_id;
  r.ack.update_id = u.update_id;
  count_accepted(e, u, outcome.staleness);
  r.accepted = true;
  r.ack.staleness = outcome.staleness;
  r.ack.weight = outcome.weight;
  if (r.applied) {
    e.pending_entries.clear();
    after_apply(e, entry.tensors);
  } else {
    e.pending_entries.push_back(entry);
  }
  r.ack.new_version = e.weights.version;
  return r;
}

void ExpertStore::count_accepted(HostedExpert& e, const net::UpdatePush& u, uint64_t staleness) {
  remember(e, u.update_id);
  ++e.accepted;
  ++e.staleness_histogram[staleness];
  auto& w = e.workers[u.worker_id];
  ++w.accepted;
  w.staleness_sum += staleness;
  w.staleness_max = std::max(w.staleness_max, staleness);
  w.last_loss = u.train_loss;
  w.samples += u.sample_count;
}

void ExpertStore::log_entry(HostedExpert& e, const net::LogEntry& entry, uint64_t pre_version) {
  log_record(e, kRecordEntry, pre_version, encoded_entry(e.spec.expert_id, entry));
}

void ExpertStore::append(const std::string& expert_id, const net::LogEntry& entry, bool defer) {
  auto it = experts_.find(expert_id);
  if (it == experts_.end()) throw ReplicaRefusal("need_snapshot", "this shard holds no expert '" + expert_id + "'");
  auto& e = it->second;
  if (!e.failed.empty()) throw StorageError(e.failed);
  if (entry.term < e.term)
    throw ReplicaRefusal("stale_term", "entry " + std::to_string(entry.lsn) + " of '" + expert_id + "' is of term " +
                                           std::to_string(entry.term) + ", this replica is at term " +
                                           std::to_string(e.term));
  if (entry.lsn <= e.lsn) return;  // held already (a retransmission)
  if (entry.lsn != e.lsn + 1)
    throw ReplicaRefusal("gap", "entry " + std::to_string(entry.lsn) + " of '" + expert_id + "' after " +
                                    std::to_string(e.lsn));
  apply_entry(e, entry, /*replaying=*/false, defer);
}

void ExpertStore::apply_entry(HostedExpert& e, const net::LogEntry& entry, bool replaying, bool defer) {
  const uint64_t pre_version = e.weights.version;
  const bool log = !replaying && e.log_fd >= 0;
  if (entry.kind == net::EntryKind::buffered) {
    if (entry.version != e.weights.version)
      throw ReplicaRefusal("gap", "buffered entry " + std::to_string(entry.lsn) + " is for v" +
                                      std::to_string(entry.version) + ", this replica is at v" +
                                      std::to_string(e.weights.version));
    // Into the policy's pending set exactly as on the primary (same weights, same order); it must not
    // make a version here: only the primary's applied entry does that.
    const model::TensorMap* base = nullptr;
    for (const auto& [version, weights] : e.history)
      if (version == entry.update.base_version) base = &weights;
    auto scratch = e.weights;
    auto outcome = e.policy->submit(scratch, client_update_of(entry.update), base);
    if (outcome.verdict != model::Outcome::Verdict::buffered) {
      e.policy = model::make_policy(options_.policy);  // its pending set is no longer the primary's
      e.pending_entries.clear();
      throw ReplicaRefusal("need_snapshot", "buffered entry " + std::to_string(entry.lsn) + " was " +
                                                model::to_string(outcome.verdict) + " here: " + outcome.detail);
    }
    if (log) log_entry(e, entry, pre_version);
    e.lsn = entry.lsn;
    e.term = std::max(e.term, entry.term);
    if (!log) e.durable_lsn = e.lsn;
    if (replaying) e.released_lsn = e.lsn;
    e.pending_entries.push_back(entry);
    count_accepted(e, entry.update, entry.staleness);
    if (log && !defer) flush(e);
    return;
  }
  model::TensorMap weights;
  for (const auto& t : entry.tensors) weights.emplace(t.name, from_wire(t));
  if (weights.size() != e.weights.weights.size() || weights.size() != entry.tensors.size())
    throw ReplicaRefusal("need_snapshot", "entry " + std::to_string(entry.lsn) + " holds " +
                                              std::to_string(entry.tensors.size()) + " tensors, the expert has " +
                                              std::to_string(e.weights.weights.size()));
  if (log) log_entry(e, entry, pre_version);
  e.lsn = entry.lsn;
  e.term = std::max(e.term, entry.term);
  if (!log) e.durable_lsn = e.lsn;
  if (replaying) e.released_lsn = e.lsn;
  e.weights.weights = std::move(weights);
  e.weights.version = entry.version;
  if (!e.pending_entries.empty() || !e.policy->pending().empty())
    e.policy = model::make_policy(options_.policy);  // the version took every pending update
  e.pending_entries.clear();
  if (entry.has_update) count_accepted(e, entry.update, entry.staleness);
  after_apply(e, entry.tensors);
  if (log && !defer) flush(e);
}

bool ExpertStore::close_round(const std::string& expert_id, uint64_t term, net::LogEntry* entry_out) {
  auto it = experts_.find(expert_id);
  if (it == experts_.end()) return false;
  auto& e = it->second;
  if (!e.failed.empty()) throw StorageError(e.failed);
  if (term > e.term) e.term = term;
  const uint64_t pre_version = e.weights.version;
  auto outcome = e.policy->on_deadline(e.weights);
  if (outcome.verdict != model::Outcome::Verdict::applied) return false;
  net::LogEntry entry;
  entry.lsn = e.lsn + 1;
  entry.term = e.term;
  entry.kind = net::EntryKind::round_closed;
  entry.version = e.weights.version;
  entry.tensors = wire_tensors(e.weights.weights);
  if (e.log_fd >= 0) log_entry(e, entry, pre_version);
  e.lsn = entry.lsn;
  if (e.log_fd < 0) e.durable_lsn = e.lsn;
  e.pending_entries.clear();
  after_apply(e, entry.tensors);
  flush(e);
  if (entry_out) *entry_out = std::move(entry);
  return true;
}

void ExpertStore::log_record(HostedExpert& e, uint32_t kind, uint64_t pre_version, const std::vector<std::byte>& payload) {
  const std::string what = "the update log of " + e.spec.expert_id;
  const off_t before = ::lseek(e.log_fd, 0, SEEK_END);
  try {
    if (before < 0) throw std::runtime_error("cannot find the end of " + what + ": " + errno_text());
    append_record(e.log_fd, kind, pre_version, payload, what);
  } catch (const std::exception& ex) {
    ++e.storage_errors;
    restore(e, before, ex.what());
    throw StorageError(std::string(ex.what()) + " (nothing applied; the expert stays at v" +
                       std::to_string(e.weights.version) + ")");
  }
}

void ExpertStore::restore(HostedExpert& e, int64_t length, const std::string& why) {
  const std::string expert_id = e.spec.expert_id;
  // Cut the log back (ftruncate frees blocks, so it works on a full disk) and reload the expert from
  // what the disk holds: memory then matches the durable state.
  if (length < 0 || ::ftruncate(e.log_fd, length) != 0 || (options_.fsync && ::fdatasync(e.log_fd) != 0)) {
    e.failed = "expert '" + expert_id + "' takes no more updates until the shard restarts: " + why +
               ", and the log could not be cut back (" + errno_text() + ")";
    spdlog::error("{}", e.failed);
    throw StorageError(e.failed);
  }
  const auto counters = std::make_tuple(e.accepted, e.versions_applied, e.rejected, e.staleness_histogram, e.workers,
                                        e.storage_errors, e.snapshot_failures);
  auto seen_by_readers = e.published;
  const uint64_t released = e.released_lsn;
  try {
    auto reloaded = load(expert_id);
    ::close(e.log_fd);
    e = std::move(reloaded);
    std::tie(e.accepted, e.versions_applied, e.rejected, e.staleness_histogram, e.workers, e.storage_errors,
             e.snapshot_failures) = counters;
    open_files(expert_id, e, /*truncate_log=*/false);
  } catch (const std::exception& reload) {
    e.failed = "expert '" + expert_id + "' takes no more updates until the shard restarts: " + why +
               ", and reloading it failed: " + reload.what();
    spdlog::error("{}", e.failed);
    throw StorageError(e.failed);
  }
  if (!options_.release_on_durable && released < e.lsn) {
    // Readers keep what they saw until the commit point passes what the disk holds beyond it.
    e.unreleased.clear();
    e.unreleased.emplace_back(e.lsn, std::move(e.published));
    e.published = std::move(seen_by_readers);
    e.published_checksum.reset();
    e.published_bytes = 0;
    for (const auto& t : e.published.tensors) e.published_bytes += t.size_bytes;
    e.released_lsn = released;
  }
}

void ExpertStore::after_apply(HostedExpert& e, std::vector<net::Tensor> tensors) {
  ++e.versions_applied;
  publish(e, std::move(tensors));
  if (e.log_fd >= 0 && e.weights.version - e.snapshot_version >= std::max<uint64_t>(options_.snapshot_every, 1) &&
      e.policy->pending().empty()) {
    // The version is durable in the log already: a snapshot that cannot be written (a full disk) is
    // not the update's failure. The log keeps growing and the next version tries again.
    try {
      write_snapshot(e.spec.expert_id, e);
    } catch (const std::exception& ex) {
      ++e.snapshot_failures;
      spdlog::warn("expert '{}': snapshot at v{} not written ({}); the log keeps every update", e.spec.expert_id,
                   e.weights.version, ex.what());
      return;
    }
    // Every logged record is folded into the snapshot now (nothing is pending): start the log over.
    // The snapshot is on disk (fsynced): every record, flushed or not, is durable through it.
    if (::ftruncate(e.log_fd, 0) != 0)
      spdlog::warn("expert '{}': cannot restart the update log: {}", e.spec.expert_id, errno_text());
    else
      e.synced_bytes = 0;
    e.durable_lsn = e.lsn;
    make_visible(e);
  }
}

void ExpertStore::write_snapshot(const std::string& expert_id, HostedExpert& e, bool rewrite_ids) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  if (!fs::exists(dir)) {
    fs::create_directories(dir);
    model::fsync_dir(dir.parent_path());
  }
  // The ids first: with the snapshot's records still in the log, a crash between the two files loses
  // no id (recovery takes the ids of every record in the log, replayed or not).
  write_ids(expert_id, e, rewrite_ids);
  model::write_safetensors((dir / "snapshot.safetensors").string(), e.weights.weights,
                           {{"fedmoe.version", std::to_string(e.weights.version)},
                            {"fedmoe.lsn", std::to_string(e.lsn)},
                            {"fedmoe.term", std::to_string(e.term)},
                            {"fedmoe.spec", expert_spec_to_json(e.spec).dump()}});
  e.snapshot_version = e.weights.version;
  e.snapshot_lsn = e.lsn;
}

void ExpertStore::write_ids(const std::string& expert_id, HostedExpert& e, bool rewrite) {
  const uint64_t keep = std::max<uint64_t>(options_.id_retention, 1);
  while (e.seen_order.size() > keep) {
    e.seen.erase(e.seen_order.front());
    e.seen_order.pop_front();
  }
  const uint64_t unsaved = std::min<uint64_t>(e.ids_unsaved, e.seen_order.size());
  const auto path = fs::path(options_.state_dir) / expert_id / "update_ids";
  std::string lines;
  if (rewrite || e.ids_in_file + unsaved > 2 * keep) {  // compact: the window alone
    for (const auto& id : e.seen_order) lines += id + "\n";
    model::write_file_atomically(path, lines);
    e.ids_in_file = e.seen_order.size();
  } else if (unsaved > 0) {  // append the newest ids; a failed append is cut back off
    for (auto it = e.seen_order.end() - static_cast<std::ptrdiff_t>(unsaved); it != e.seen_order.end(); ++it)
      lines += *it + "\n";
    const bool existed = fs::exists(path);
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error("cannot open " + path.string() + ": " + errno_text());
    const off_t before = ::lseek(fd, 0, SEEK_END);
    try {
      model::write_all(fd, lines.data(), lines.size(), path.string());
      if (options_.fsync && ::fdatasync(fd) != 0) throw std::runtime_error("cannot flush " + path.string() + ": " + errno_text());
    } catch (...) {
      if (before >= 0 && ::ftruncate(fd, before) != 0)
        spdlog::warn("{}: cannot cut a failed append back off: {}", path.string(), errno_text());
      ::close(fd);
      throw;
    }
    ::close(fd);
    if (!existed) model::fsync_dir(path.parent_path());
    e.ids_in_file += unsaved;
  }
  e.ids_unsaved = 0;
}

void ExpertStore::open_files(const std::string& expert_id, HostedExpert& e, bool truncate_log) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  const bool existed = fs::exists(dir / "updates.log");
  if (e.log_fd < 0) e.log_fd = ::open((dir / "updates.log").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (e.log_fd < 0) throw std::runtime_error("cannot open " + (dir / "updates.log").string() + ": " + errno_text());
  if (truncate_log && ::ftruncate(e.log_fd, 0) != 0)
    throw std::runtime_error("cannot restart " + (dir / "updates.log").string() + ": " + errno_text());
  if (!existed) model::fsync_dir(dir);
}

HostedExpert ExpertStore::load(const std::string& expert_id) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  auto snapshot_path = dir / "snapshot.safetensors";
  HostedExpert e;
  try {
    auto file = model::SafetensorsFile::open(snapshot_path);
    const auto& meta = file->metadata();
    if (!meta.count("fedmoe.version") || !meta.count("fedmoe.spec"))
      throw std::runtime_error("no fedmoe.version / fedmoe.spec metadata");
    e.weights.version = std::stoull(meta.at("fedmoe.version"));
    if (meta.count("fedmoe.lsn")) e.lsn = std::stoull(meta.at("fedmoe.lsn"));
    if (meta.count("fedmoe.term")) e.term = std::stoull(meta.at("fedmoe.term"));
    e.spec = expert_spec_from_json(json::parse(meta.at("fedmoe.spec")));
    for (auto& [name, t] : model::read_safetensors(snapshot_path.string())) e.weights.weights.emplace(name, t.clone());
  } catch (const std::exception& ex) {
    throw std::runtime_error(snapshot_path.string() + ": cannot recover expert '" + expert_id + "': " + ex.what());
  }
  e.snapshot_version = e.weights.version;
  e.snapshot_lsn = e.durable_lsn = e.released_lsn = e.lsn;
  e.policy = model::make_policy(options_.policy);
  publish(e);
  {
    // A last line without its newline is an append a crash interrupted: cut off (its ids are still in
    // the log, which restarts only after the ids are written).
    std::ifstream in(dir / "update_ids", std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t whole = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
    if (whole < text.size() && ::truncate((dir / "update_ids").c_str(), static_cast<off_t>(whole)) != 0)
      throw std::runtime_error("cannot cut a torn line off " + (dir / "update_ids").string() + ": " + errno_text());
    for (size_t at = 0; at < whole;) {
      const size_t nl = text.find('\n', at);
      if (nl > at) remember(e, text.substr(at, nl - at));
      ++e.ids_in_file;
      at = nl + 1;
    }
    e.ids_unsaved = 0;
  }
  uint64_t good = 0;
  std::string problem;
  auto records = read_log(dir / "updates.log", &good, &problem);
  size_t replayed = 0;
  for (const auto& rec : records) {
    if (rec.kind == kRecordEntry) {
      auto decoded = net::decode_copy(rec.payload.data(), rec.payload.size());
      const auto* a = decoded ? std::get_if<net::ReplicaAppend>(&decoded->body) : nullptr;
      if (!a || a->entries.size() != 1)
        throw std::runtime_error((dir / "updates.log").string() + ": an entry record that does not decode");
      const auto& entry = a->entries.front();
      if (entry.lsn <= e.snapshot_lsn) {  // in the snapshot already; its id still counts
        if (entry.has_update) remember(e, entry.update.update_id);
        continue;
      }
      if (entry.lsn != e.lsn + 1)
        throw std::runtime_error((dir / "updates.log").string() + ": entry " + std::to_string(entry.lsn) +
                                 " follows entry " + std::to_string(e.lsn));
      apply_entry(e, entry, /*replaying=*/true);
      ++replayed;
      continue;
    }
    if (rec.kind == kRecordRoundClosed) {
      if (rec.pre_version < e.snapshot_version) continue;  // folded into the snapshot already
      if (e.policy->on_deadline(e.weights).verdict == model::Outcome::Verdict::applied) {
        ++e.versions_applied;
        e.durable_lsn = e.released_lsn = ++e.lsn;
        publish(e);
      }
      ++replayed;
      continue;
    }
    auto decoded = net::decode_copy(rec.payload.data(), rec.payload.size());
    const net::UpdatePush* u = decoded ? std::get_if<net::UpdatePush>(&decoded->body) : nullptr;
    if (!u) throw std::runtime_error((dir / "updates.log").string() + ": a record that does not decode");
    if (rec.pre_version < e.snapshot_version) {  // in the snapshot already; its id still counts
      remember(e, u->update_id);
      continue;
    }
    auto r = fold(e, *u, /*replaying=*/true);
    if (!r.accepted) spdlog::warn("{}: replaying update '{}' was refused: {}", dir.string(), u->update_id, r.reject.detail);
    ++replayed;
  }
  if (!problem.empty()) {
    spdlog::warn("{}: the update log ends in {}; the unacknowledged tail is dropped", dir.string(), problem);
    if (::truncate((dir / "updates.log").c_str(), static_cast<off_t>(good)) != 0)
      throw std::runtime_error("cannot cut the torn tail off " + (dir / "updates.log").string() + ": " + errno_text());
  }
  e.synced_bytes = static_cast<int64_t>(good);
  spdlog::info("{}: loaded expert '{}' at version {} (snapshot v{}, {} logged records replayed)", dir.string(),
               expert_id, e.weights.version, e.snapshot_version, replayed);
  return e;
}

void ExpertStore::recover(const std::string& expert_id) {
  auto& slot = experts_[expert_id] = load(expert_id);
  open_files(expert_id, slot, /*truncate_log=*/false);
}

json ExpertStore::status() const {
  json experts = json::array();
  for (const auto& [id, e] : experts_) {
    json workers = json::object();
    for (const auto& [wid, w] : e.workers)
      workers[wid] = {{"accepted", w.accepted},
                      {"rejected", w.rejected},
                      {"mean_staleness", w.accepted ? double(w.staleness_sum) / double(w.accepted) : 0.0},
                      {"max_staleness", w.staleness_max},
                      {"last_loss", w.last_loss},
                      {"samples", w.samples}};
    json hist = json::object();
    for (const auto& [s, n] : e.staleness_histogram) hist[std::to_string(s)] = n;
    experts.push_back({{"expert_id", id},
                       {"domain", e.spec.domain},
                       {"version", e.published.version},  // what readers see, with "checksum"
                       {"tip_version", e.weights.version},
                       {"durable_lsn", e.durable_lsn},
                       {"released_lsn", e.released_lsn},
                       {"policy", e.policy->name()},
                       {"pending", e.policy->pending().size()},
                       {"tensors", e.published.tensors.size()},
                       {"bytes", e.published_bytes},
                       {"checksum", hex16(checksum_of(e))},
                       {"accepted", e.accepted},
                       {"versions_applied", e.versions_applied},
                       {"rejected", e.rejected},
                       {"staleness_histogram", hist},
                       {"workers", workers},
                       {"snapshot_version", e.snapshot_version},
                       {"lsn", e.lsn},
                       {"term", e.term},
                       {"retained_update_ids", e.seen.size()},
                       {"storage_errors", e.storage_errors},
                       {"snapshot_failures", e.snapshot_failures},
                       {"failed", e.failed}});
  }
  return experts;
}

}  // namespace fedmoe::actors
