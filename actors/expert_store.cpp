#include "actors/expert_store.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "actors/registry.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/checkpoint.hpp"
#include "model/safetensors.hpp"
#include "net/checksum.hpp"
#include "net/codec.hpp"

namespace fedmoe::actors {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// --- the update log ---------------------------------------------------------------------------------
// Record: magic "FMLG" (u32), kind (u32: 1 update, 2 round closed), pre_version (u64: the expert's
// version when the record was accepted), payload size (u64), payload (an encoded net::Message
// holding the UpdatePush; empty for kind 2), checksum of header fields + payload (u64).
constexpr uint32_t kLogMagic = 0x474C4D46;  // "FMLG" little-endian
enum : uint32_t { kRecordUpdate = 1, kRecordRoundClosed = 2 };
struct RecordHeader {
  uint32_t magic, kind;
  uint64_t pre_version, size;
};
static_assert(sizeof(RecordHeader) == 24);

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const void* data, size_t size, const std::string& what) {
  auto* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw std::runtime_error("cannot write " + what + ": " + errno_text());
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void append_record(int fd, uint32_t kind, uint64_t pre_version, const std::vector<std::byte>& payload, bool sync,
                   const std::string& what) {
  RecordHeader h{kLogMagic, kind, pre_version, payload.size()};
  uint64_t sum = net::checksum(&h, sizeof h);
  sum = net::checksum(payload.data(), payload.size(), sum);
  // Three writes, no copy of the payload (megabytes for a large expert); a crash between them
  // leaves a torn record, which read_log drops like any other.
  write_all(fd, &h, sizeof h, what);
  write_all(fd, payload.data(), payload.size(), what);
  write_all(fd, &sum, sizeof sum, what);
  if (sync && ::fdatasync(fd) != 0) throw std::runtime_error("cannot flush " + what + ": " + errno_text());
}

struct LogRecord {
  uint32_t kind;
  uint64_t pre_version;
  std::vector<std::byte> payload;
};

// The valid records of a log and the byte length they span (a torn or corrupt tail ends it).
std::vector<LogRecord> read_log(const fs::path& path, uint64_t* good_bytes, std::string* problem) {
  std::vector<LogRecord> out;
  *good_bytes = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) return out;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  while (pos < bytes.size()) {
    RecordHeader h;
    if (bytes.size() - pos < sizeof h) {
      *problem = "a truncated record header at byte " + std::to_string(pos);
      break;
    }
    std::memcpy(&h, bytes.data() + pos, sizeof h);
    if (h.magic != kLogMagic || (h.kind != kRecordUpdate && h.kind != kRecordRoundClosed)) {
      *problem = "no record at byte " + std::to_string(pos);
      break;
    }
    if (h.size > bytes.size() - pos - sizeof h || bytes.size() - pos - sizeof h - h.size < sizeof(uint64_t)) {
      *problem = "a truncated record at byte " + std::to_string(pos);
      break;
    }
    const char* payload = bytes.data() + pos + sizeof h;
    uint64_t stored;
    std::memcpy(&stored, payload + h.size, sizeof stored);
    uint64_t sum = net::checksum(&h, sizeof h);
    sum = net::checksum(payload, h.size, sum);
    if (sum != stored) {
      *problem = "a checksum mismatch at byte " + std::to_string(pos);
      break;
    }
    LogRecord r{h.kind, h.pre_version, std::vector<std::byte>(h.size)};
    std::memcpy(r.payload.data(), payload, h.size);
    out.push_back(std::move(r));
    pos += sizeof h + h.size + sizeof stored;
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
  for (auto& [id, e] : experts_) {
    if (e.log_fd >= 0) ::close(e.log_fd);
    if (e.ids_fd >= 0) ::close(e.ids_fd);
  }
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

void ExpertStore::publish(HostedExpert& e) {
  // Policies replace tensors instead of changing them (model/aggregation.cpp), so this version's
  // tensors stay as they are while pulls reference them and while FedAsync's history holds them.
  net::ExpertSnapshot snap;
  snap.spec = e.spec;
  snap.version = e.weights.version;
  for (const auto& [name, t] : e.weights.weights) snap.tensors.push_back(to_wire(name, t));
  e.published_checksum.reset();  // computed when status or a receipt asks for it
  e.published_bytes = 0;
  for (const auto& t : snap.tensors) e.published_bytes += t.size_bytes;
  e.published = std::move(snap);
  e.history.emplace_back(e.weights.version, e.weights.weights);
  while (e.history.size() > std::max<uint64_t>(options_.history_versions, 1)) e.history.pop_front();
}

uint64_t ExpertStore::checksum_of(const HostedExpert& e) const {
  if (!e.published_checksum) e.published_checksum = net::checksum(e.published.tensors);
  return *e.published_checksum;
}

net::SnapshotReceipt ExpertStore::receipt_of(const HostedExpert& e) const {
  return {e.spec.expert_id, e.weights.version, static_cast<uint32_t>(e.published.tensors.size()), e.published_bytes,
          checksum_of(e)};
}

net::SnapshotReceipt ExpertStore::install(const net::ExpertSnapshot& snap) {
  const auto& id = snap.spec.expert_id;
  if (!options_.state_dir.empty() && !safe_dir_name(id))
    throw std::invalid_argument("expert id '" + id + "' cannot name a directory (letters, digits, - _ . only)");
  auto it = experts_.find(id);
  if (it != experts_.end() && snap.version <= it->second.weights.version) {
    return receipt_of(it->second);
  }
  // The received tensors are immutable views of the message buffer: they serve pulls as they are
  // (no copy). Policies never change tensors in place (each version gets new ones), so they are
  // the weights as well.
  model::TensorMap weights;
  for (const auto& t : snap.tensors) {
    if (weights.count(t.name)) throw std::invalid_argument("tensor '" + t.name + "' appears twice in the snapshot");
    weights.emplace(t.name, from_wire(t));
  }
  HostedExpert fresh;
  if (it != experts_.end()) {  // a newer version of a hosted expert: keep its ids, counters and files
    fresh.seen = std::move(it->second.seen);
    fresh.accepted = it->second.accepted;
    fresh.rejected = std::move(it->second.rejected);
    fresh.staleness_histogram = std::move(it->second.staleness_histogram);
    fresh.workers = std::move(it->second.workers);
    fresh.log_fd = std::exchange(it->second.log_fd, -1);
    fresh.ids_fd = std::exchange(it->second.ids_fd, -1);
  }
  fresh.spec = snap.spec;
  fresh.weights.version = snap.version;
  fresh.weights.weights = weights;
  fresh.policy = model::make_policy(options_.policy);
  fresh.published = snap;
  fresh.published.seen_update_ids.clear();  // pulls carry weights only
  std::vector<std::string> new_ids;
  for (const auto& id_seen : snap.seen_update_ids)
    if (fresh.seen.insert(id_seen).second) new_ids.push_back(id_seen);
  fresh.published_checksum = net::checksum(snap.tensors);
  for (const auto& t : snap.tensors) fresh.published_bytes += t.size_bytes;
  fresh.history.emplace_back(snap.version, std::move(weights));
  auto& e = experts_[id] = std::move(fresh);
  if (!options_.state_dir.empty()) {
    write_snapshot(id, e);
    open_files(id, e, /*truncate_log=*/true);
    std::string lines;
    for (const auto& seen_id : new_ids) lines += seen_id + "\n";
    write_all(e.ids_fd, lines.data(), lines.size(), "the update ids of " + id);
    if (options_.fsync && !lines.empty() && ::fdatasync(e.ids_fd) != 0)
      throw std::runtime_error("cannot flush the update ids of " + id + ": " + errno_text());
  }
  return receipt_of(e);
}

PushResult ExpertStore::push(const net::UpdatePush& u) {
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
  if (e.seen.count(u.update_id))
    return refused(e, u, net::RejectReason::duplicate_update,
                   "update '" + u.update_id + "' was already accepted; it is not applied twice");
  return fold(e, u, /*replaying=*/false);
}

PushResult ExpertStore::fold(HostedExpert& e, const net::UpdatePush& u, bool replaying) {
  model::ClientUpdate cu;
  cu.update_id = u.update_id;
  cu.worker_id = u.worker_id;
  cu.base_version = u.base_version;
  cu.sample_count = u.sample_count;
  cu.train_loss = u.train_loss;
  for (const auto& t : u.deltas) {
    if (cu.delta.count(t.name))
      return refused(e, u, net::RejectReason::shape_mismatch, "tensor '" + t.name + "' appears twice");
    cu.delta.emplace(t.name, from_wire(t));
  }
  const model::TensorMap* base = nullptr;
  for (const auto& [version, weights] : e.history)
    if (version == u.base_version) base = &weights;
  const uint64_t pre_version = e.weights.version;
  auto outcome = e.policy->submit(e.weights, cu, base);
  if (!outcome.accepted()) return refused(e, u, wire_reason(outcome.reason), outcome.detail);

  PushResult r;
  r.ack.expert_id = u.expert_id;
  r.ack.update_id = u.update_id;
  e.seen.insert(u.update_id);
  if (!replaying && e.log_fd >= 0) {
    net::Message m;
    m.body = u;
    auto encoded = net::encode(m);
    std::vector<std::byte> payload(encoded.size_bytes());
    encoded.copy_to(payload.data());
    append_record(e.log_fd, kRecordUpdate, pre_version, payload, options_.fsync, "the update log of " + u.expert_id);
    std::string line = u.update_id + "\n";
    write_all(e.ids_fd, line.data(), line.size(), "the update ids of " + u.expert_id);
  }
  ++e.accepted;
  ++e.staleness_histogram[outcome.staleness];
  auto& w = e.workers[u.worker_id];
  ++w.accepted;
  w.staleness_sum += outcome.staleness;
  w.staleness_max = std::max(w.staleness_max, outcome.staleness);
  w.last_loss = u.train_loss;
  w.samples += u.sample_count;
  r.accepted = true;
  r.applied = outcome.verdict == model::Outcome::Verdict::applied;
  r.ack.staleness = outcome.staleness;
  r.ack.weight = outcome.weight;
  if (r.applied) after_apply(e);
  r.ack.new_version = e.weights.version;
  return r;
}

bool ExpertStore::close_round(const std::string& expert_id) {
  auto it = experts_.find(expert_id);
  if (it == experts_.end()) return false;
  auto& e = it->second;
  const uint64_t pre_version = e.weights.version;
  auto outcome = e.policy->on_deadline(e.weights);
  if (outcome.verdict != model::Outcome::Verdict::applied) return false;
  if (e.log_fd >= 0)
    append_record(e.log_fd, kRecordRoundClosed, pre_version, {}, options_.fsync, "the update log of " + expert_id);
  after_apply(e);
  return true;
}

void ExpertStore::after_apply(HostedExpert& e) {
  ++e.versions_applied;
  publish(e);
  if (e.log_fd >= 0 && e.weights.version - e.snapshot_version >= std::max<uint64_t>(options_.snapshot_every, 1) &&
      e.policy->pending().empty()) {
    write_snapshot(e.spec.expert_id, e);
    // Every logged record is folded into the snapshot now (nothing is pending): start the log over.
    if (::ftruncate(e.log_fd, 0) != 0) throw std::runtime_error("cannot restart the update log: " + errno_text());
  }
}

void ExpertStore::write_snapshot(const std::string& expert_id, HostedExpert& e) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  fs::create_directories(dir);
  model::write_safetensors((dir / "snapshot.safetensors").string(), e.weights.weights,
                           {{"fedmoe.version", std::to_string(e.weights.version)},
                            {"fedmoe.spec", expert_spec_to_json(e.spec).dump()}});
  e.snapshot_version = e.weights.version;
}

void ExpertStore::open_files(const std::string& expert_id, HostedExpert& e, bool truncate_log) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  if (e.log_fd < 0) e.log_fd = ::open((dir / "updates.log").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (e.ids_fd < 0) e.ids_fd = ::open((dir / "update_ids").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (e.log_fd < 0 || e.ids_fd < 0) throw std::runtime_error("cannot open the files of " + dir.string() + ": " + errno_text());
  if (truncate_log && ::ftruncate(e.log_fd, 0) != 0)
    throw std::runtime_error("cannot restart " + (dir / "updates.log").string() + ": " + errno_text());
}

void ExpertStore::recover(const std::string& expert_id) {
  auto dir = fs::path(options_.state_dir) / expert_id;
  auto snapshot_path = dir / "snapshot.safetensors";
  HostedExpert e;
  try {
    auto file = model::SafetensorsFile::open(snapshot_path);
    const auto& meta = file->metadata();
    if (!meta.count("fedmoe.version") || !meta.count("fedmoe.spec"))
      throw std::runtime_error("no fedmoe.version / fedmoe.spec metadata");
    e.weights.version = std::stoull(meta.at("fedmoe.version"));
    e.spec = expert_spec_from_json(json::parse(meta.at("fedmoe.spec")));
    for (auto& [name, t] : model::read_safetensors(snapshot_path.string())) e.weights.weights.emplace(name, t.clone());
  } catch (const std::exception& ex) {
    throw std::runtime_error(snapshot_path.string() + ": cannot recover expert '" + expert_id + "': " + ex.what());
  }
  e.snapshot_version = e.weights.version;
  e.policy = model::make_policy(options_.policy);
  publish(e);
  {
    std::ifstream ids(dir / "update_ids");
    for (std::string line; std::getline(ids, line);)
      if (!line.empty()) e.seen.insert(line);
  }
  uint64_t good = 0;
  std::string problem;
  auto records = read_log(dir / "updates.log", &good, &problem);
  size_t replayed = 0;
  for (const auto& rec : records) {
    if (rec.pre_version < e.snapshot_version) continue;  // folded into the snapshot already
    if (rec.kind == kRecordRoundClosed) {
      if (e.policy->on_deadline(e.weights).verdict == model::Outcome::Verdict::applied) {
        ++e.versions_applied;
        publish(e);
      }
      ++replayed;
      continue;
    }
    auto decoded = net::decode_copy(rec.payload.data(), rec.payload.size());
    const net::UpdatePush* u = decoded ? std::get_if<net::UpdatePush>(&decoded->body) : nullptr;
    if (!u) {
      problem = "an undecodable record";
      break;
    }
    auto r = fold(e, *u, /*replaying=*/true);
    if (!r.accepted) spdlog::warn("{}: replaying update '{}' was refused: {}", dir.string(), u->update_id, r.reject.detail);
    ++replayed;
  }
  if (!problem.empty()) {
    spdlog::warn("{}: the update log ends in {}; the unacknowledged tail is dropped", dir.string(), problem);
    ::truncate((dir / "updates.log").c_str(), static_cast<off_t>(good));
  }
  spdlog::info("{}: recovered expert '{}' at version {} (snapshot v{}, {} logged records replayed)", dir.string(),
               expert_id, e.weights.version, e.snapshot_version, replayed);
  auto& slot = experts_[expert_id] = std::move(e);
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
                       {"version", e.weights.version},
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
                       {"snapshot_version", e.snapshot_version}});
  }
  return experts;
}

}  // namespace fedmoe::actors
