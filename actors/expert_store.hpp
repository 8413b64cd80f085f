// What an expert shard holds for the experts it hosts, without the actor around it (so it is tested
// directly): per expert the weights (fp32 LibTorch tensors), the version, the aggregation policy
// (model/aggregation.hpp) that folds workers' updates in, the last few versions (FedAsync mixes with
// the weights an update was trained from), the ids of every accepted update (nothing is applied
// twice), and counters for status: accepted/rejected by reason, a staleness histogram, per-worker
// figures.
//
// Durability, with a state directory: per expert DIR/<expert>/snapshot.safetensors (weights, with
// version, log position, term and spec in the metadata), DIR/<expert>/updates.log (every log entry
// since that snapshot: an accepted update, or a new version with its weights, with a checksum) and DIR/<expert>/update_ids (the window of
// recently accepted ids as of the snapshot; the log's records carry the newer ones). An update is
// folded into a new version, appended to the log and flushed, and only then published (pulls, acks):
// write-ahead, as etcd's WAL. A write that fails (ENOSPC, EIO) is cut back off the log and the expert
// is reloaded from what the disk holds, so the store is as it was and push() throws StorageError; if
// even the cut fails the expert stops taking updates until a restart (fail-stop). A new store on the
// same directory replays the log through the same policy and reaches exactly the acknowledged state,
// buffered FedAvg/FedBuff updates included; a torn last record (a crash mid-write) is dropped, since it
// was never acknowledged, but a damaged record with valid ones after it is an error: recovery never
// drops an acknowledged record. Snapshots are rewritten every `snapshot_every` versions, when no update
// is pending, and the log restarts; a snapshot that cannot be written is retried at the next version
// (the log still holds everything). Files and directories are fsynced when created or renamed.
//
// Duplicate detection works within a bounded window: the `id_retention` most recent ids are kept
// (and persisted, and handed to seeded replicas), older ones are forgotten when a snapshot is taken.
// A snapshot appends the ids accepted since the last one to update_ids; the file is rewritten with
// the window only once it holds twice the retention, so its cost per update stays constant.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/aggregation.hpp"
#include "net/messages.hpp"

namespace fedmoe::actors {

struct ExpertStoreOptions {
  model::PolicyConfig policy;
  std::string state_dir;           // "" = memory only
  uint64_t history_versions = 4;   // versions kept for FedAsync's base weights
  uint64_t snapshot_every = 16;    // versions between snapshots; the log covers the rest
  bool fsync = true;               // flush each accepted update to disk before acknowledging it
  uint64_t id_retention = 65536;   // accepted update ids remembered for duplicate detection (at least)
  // Readers (pulls) see a version once it is durable. A replicated shard turns this off and releases
  // versions itself at its commit point (release()), so that no reader sees a version that a failover
  // could take back.
  bool release_on_durable = true;
};

// The store could not make an update durable (a full disk, an I/O error): nothing was applied.
struct StorageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct PushResult {
  bool accepted = false;
  net::UpdateAck ack;        // when accepted (buffered or applied)
  net::UpdateReject reject;  // when not: reason and detail
  bool applied = false;      // the expert moved to a new version with this call
  net::LogEntry entry;       // when accepted: the log entry written (what the replicas get)
};

// A replica cannot take a primary's entry: `code` says why (stale_term, need_snapshot, gap), for the
// ReplicaAck the primary reads; nothing was applied.
struct ReplicaRefusal : std::runtime_error {
  std::string code;
  ReplicaRefusal(std::string c, const std::string& detail) : std::runtime_error(detail), code(std::move(c)) {}
};

struct WorkerFigures {
  uint64_t accepted = 0;
  std::map<std::string, uint64_t> rejected;  // by reason
  uint64_t staleness_sum = 0, staleness_max = 0;
  double last_loss = 0;
  uint64_t samples = 0;
};

struct HostedExpert {
  net::ExpertSpec spec;
  model::ExpertWeights weights;                      // CPU, the snapshot's dtype; never changed in place
  std::unique_ptr<model::AggregationPolicy> policy;
  std::deque<std::pair<uint64_t, model::TensorMap>> history;  // (version, immutable weights), newest last
  net::ExpertSnapshot published;                     // the visible version for pulls; never changes after publishing
  mutable std::optional<uint64_t> published_checksum;  // of `published`, computed on demand
  uint64_t published_bytes = 0;
  // The expert's log (net/fedmoe.capnp LogEntry): the last entry held and the term it was written
  // under; the entries accepted since the current version (a primary's seed hands them on).
  uint64_t lsn = 0, term = 0;
  uint64_t durable_lsn = 0;   // entries flushed to disk (all of them without a state directory)
  uint64_t released_lsn = 0;  // entries readers may see (release(); with release_on_durable, the durable ones)
  std::deque<std::pair<uint64_t, net::ExpertSnapshot>> unreleased;  // versions written, not yet visible, by lsn
  int64_t synced_bytes = 0;   // the log's length at the last flush
  std::vector<net::LogEntry> pending_entries;
  std::set<std::string> seen;                        // accepted update ids (the retained window)
  std::deque<std::string> seen_order;                // the same ids, oldest first (for pruning)
  uint64_t ids_unsaved = 0;  // the newest ids of seen_order not yet in DIR/<expert>/update_ids
  uint64_t ids_in_file = 0;  // lines in update_ids (appended at snapshots, compacted past 2 x retention)
  // counters
  uint64_t accepted = 0, versions_applied = 0;
  std::map<std::string, uint64_t> rejected;          // by reason
  std::map<uint64_t, uint64_t> staleness_histogram;  // accepted updates by staleness
  std::map<std::string, WorkerFigures> workers;
  // durability
  uint64_t snapshot_version = 0, snapshot_lsn = 0;
  int log_fd = -1;
  uint64_t storage_errors = 0, snapshot_failures = 0;
  std::string failed;  // not empty: the log could not be restored after a write error; no more updates
};

class ExpertStore {
 public:
  // Recovers every expert found in options.state_dir. Throws std::runtime_error naming the file when
  // a snapshot cannot be read (a corrupt log tail is dropped with a warning instead).
  explicit ExpertStore(ExpertStoreOptions options);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  // Hosts the snapshot's expert, or replaces what is hosted when the snapshot is newer: a higher
  // term, or the same term and a later log position (without a term, as from `expert --add`: a
  // higher version). Otherwise nothing changes and the receipt names what is kept. The snapshot's
  // pending entries are taken into the pending set. Throws std::invalid_argument for tensors that
  // are not f32/f16/bf16 or pending entries that do not follow the snapshot's position.
  net::SnapshotReceipt install(const net::ExpertSnapshot& snapshot);

  // Validates and folds one update, as the expert's primary under `term` (0: the expert's own).
  // Unknown expert, repeated update id, and everything the policy refuses come back as a reject
  // with reason and detail; nothing throws on a peer's input. Throws StorageError when the update
  // cannot be made durable (the store is then as it was before).
  // With `defer`, the record is written but not flushed: a later flush() makes every deferred record
  // durable with one fdatasync (group commit); until then the version is not visible.
  PushResult push(const net::UpdatePush& update, uint64_t term = 0, bool defer = false);

  // FedAvg's round deadline for `expert_id`; true when a round closed (its entry in `entry`).
  // Throws StorageError like push.
  bool close_round(const std::string& expert_id, uint64_t term = 0, net::LogEntry* entry = nullptr);

  // As a replica: takes the primary's next entry, durably, without running the policy on it (a new
  // version takes the primary's weights as they are, so every replica holds the same bytes). An
  // entry already held is ignored. Throws ReplicaRefusal (older term, a gap, an expert not held)
  // or StorageError; nothing is applied then.
  void append(const std::string& expert_id, const net::LogEntry& entry, bool defer = false);

  // Makes every deferred record of the expert durable; returns the durable lsn. On failure every
  // record since the last flush is cut off, the expert reloaded from disk, and StorageError thrown.
  uint64_t flush(const std::string& expert_id);
  // Readers may see versions up to entry `lsn`, or up to the last durable entry if that is earlier.
  void release(const std::string& expert_id, uint64_t lsn);

  // What a primary seeds a replica with: the current version, its position and term, the pending
  // entries and the retained update ids, after flushing what is deferred (a seed never carries
  // what a failed flush could take back). Throws std::out_of_range for an expert not held, and
  // StorageError like flush().
  net::ExpertSnapshot seed(const std::string& expert_id);
  net::SnapshotReceipt receipt(const std::string& expert_id) const;

  bool contains(const std::string& expert_id) const { return experts_.count(expert_id) > 0; }
  const HostedExpert* find(const std::string& expert_id) const;
  std::vector<std::string> expert_ids() const;
  nlohmann::json status() const;
  const ExpertStoreOptions& options() const { return options_; }

 private:
  void publish(HostedExpert& e, std::vector<net::Tensor> tensors = {});
  uint64_t checksum_of(const HostedExpert& e) const;
  net::SnapshotReceipt receipt_of(const HostedExpert& e) const;  // what the current version is
  void after_apply(HostedExpert& e, std::vector<net::Tensor> tensors = {});
  void open_files(const std::string& expert_id, HostedExpert& e, bool truncate_log);
  // The snapshot of the current version, after the ids (all of them rewritten with `rewrite_ids`).
  void write_snapshot(const std::string& expert_id, HostedExpert& e, bool rewrite_ids = false);
  void write_ids(const std::string& expert_id, HostedExpert& e, bool rewrite);
  void remember(HostedExpert& e, const std::string& update_id);
  // Appends a record to the expert's log and flushes it; on failure cuts it back off, reloads the
  // expert from disk and throws StorageError.
  void log_record(HostedExpert& e, uint32_t kind, uint64_t pre_version, const std::vector<std::byte>& payload);
  void flush(HostedExpert& e);
  void make_visible(HostedExpert& e);
  // Cuts the log back to `length` and reloads the expert from disk, keeping its counters; sets
  // `failed` when even that is impossible. `why` says what went wrong first.
  void restore(HostedExpert& e, int64_t length, const std::string& why);
  void log_entry(HostedExpert& e, const net::LogEntry& entry, uint64_t pre_version);
  // Applies an entry to `e` in memory (and logs it first unless replaying): the one path by which
  // replicas, and every store replaying its log, reach the primary's exact state.
  void apply_entry(HostedExpert& e, const net::LogEntry& entry, bool replaying, bool defer = false);
  void count_accepted(HostedExpert& e, const net::UpdatePush& u, uint64_t staleness);
  HostedExpert load(const std::string& expert_id);
  void recover(const std::string& expert_id);
  PushResult fold(HostedExpert& e, const net::UpdatePush& update, bool replaying);

  ExpertStoreOptions options_;
  std::map<std::string, HostedExpert> experts_;
};

}  // namespace fedmoe::actors
