#include "actors/expert_shard.hpp"

#include <algorithm>
#include <cstdio>

#include <caf/actor_cast.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/dispatch.hpp"
#include "net/checksum.hpp"

namespace fedmoe::actors {

namespace {

using Self = caf::stateful_actor<ExpertShardState>;
// (expert id, version the round started at): FedAvg's round deadline, sent by the shard to itself.
using round_deadline_atom = caf::atom_constant<caf::atom("rdeadline")>;
// Periodic: replicas that stay silent leave the in-sync set, seeds are retried, waiters give up.
using replication_tick_atom = caf::atom_constant<caf::atom("rtick")>;
// Group commit: flush what the messages handled since the last flush wrote.
using flush_atom = caf::atom_constant<caf::atom("flush")>;

int64_t now_ms() { return net::steady_ms_now(); }

void schedule_flush(Self* self);
net::ReplicaAck replica_state(Self* self, const std::string& expert, std::string refused);

void send_to(Self* self, const caf::actor& to, uint64_t correlation_id, net::Body body) {
  self->state.transport->send(self, to, self->state.node_id, correlation_id, std::move(body));
}

void send_to_shard(Self* self, const std::string& shard, uint64_t correlation_id, net::Body body) {
  auto peer = self->state.peers.find(shard);
  if (peer != self->state.peers.end() && peer->second) send_to(self, peer->second, correlation_id, std::move(body));
}

// The expert's primary in the latest map, or nullptr when no map places it (a standalone shard).
const std::string* primary_of(Self* self, const std::string& expert) {
  auto it = self->state.primary.find(expert);
  return it == self->state.primary.end() ? nullptr : &it->second;
}

// Whether this shard decides for `expert`: its primary, or a shard outside any placement (standalone).
bool leads(Self* self, const std::string& expert) {
  const auto* p = primary_of(self, expert);
  return !p || *p == self->state.node_id;
}

// Tells subscribers of every expert whose version moved past the last announced one.
void announce_versions(Self* self) {
  auto& st = self->state;
  for (auto& [expert, subs] : st.subscribers) {
    const auto* e = st.store->find(expert);
    if (!e || subs.empty()) continue;
    auto& last = st.announced[expert];
    if (e->published.version <= last) continue;  // what readers can pull: committed versions
    last = e->published.version;
    for (const auto& s : subs) send_to(self, s, 0, net::VersionNotice{expert, last, st.node_id});
    st.notices_sent += subs.size();
  }
}

void subscribe(Self* self, const std::string& expert) {
  auto who = caf::actor_cast<caf::actor>(self->current_sender());
  if (!who) return;
  auto& subs = self->state.subscribers[expert];
  if (subs.size() >= 4096 || !subs.insert(who).second) return;  // bounded; already subscribed
  self->monitor(who);
  const auto* e = self->state.store->find(expert);
  auto& last = self->state.announced[expert];
  if (e) last = std::max(last, e->published.version);  // the subscriber has this one: it just pulled it
}

void reply(Self* self, uint64_t correlation_id, net::Body body) {
  auto to = caf::actor_cast<caf::actor>(self->current_sender());
  if (!to) return;  // an anonymous sender cannot be answered
  send_to(self, to, correlation_id, std::move(body));
}

void reply_error(Self* self, uint64_t correlation_id, const std::string& code, const std::string& detail) {
  ++self->state.errors[code];
  spdlog::warn("{}: {}: {}", self->state.node_id, code, detail);
  reply(self, correlation_id, net::ErrorReply{code, detail});
}


// --- the primary's side --------------------------------------------------------------------------

ExpertShardState::Leadership* leadership(Self* self, const std::string& expert) {
  auto it = self->state.leading.find(expert);
  return it == self->state.leading.end() ? nullptr : &it->second;
}

// Whether the coordinator answered within half a lease: past that, another primary may have been
// chosen on the other side of a partition, and this one must not acknowledge anything.
bool lease_holds(Self* self) {
  const auto& st = self->state;
  if (!st.membership.coordinator || st.lease_ms == 0) return true;  // standalone, or not joined yet
  return now_ms() - st.last_coordinator_ms <= st.lease_ms / 2;
}

// Sends `shard` our snapshot of `expert` under our term: its entries follow once it answers.
void seed(Self* self, const std::string& expert, const std::string& shard, const std::string& why) {
  auto& st = self->state;
  auto* l = leadership(self, expert);
  if (!l || !st.store->find(expert)) return;
  auto& f = l->followers[shard];
  if (f.seed_correlation != 0) ++st.counters.seeds_retried;
  f.synced = false;
  f.seed_correlation = st.next_correlation++;
  f.seed_sent_ms = now_ms();  // unanswered (or unsent) past the replication timeout: seeded again
  net::ExpertSnapshot snap;
  try {
    snap = st.store->seed(expert);
  } catch (const std::exception& ex) {
    spdlog::error("{}: cannot seed {} with '{}': {}", st.node_id, shard, expert, ex.what());
    return;
  }
  snap.term = l->term;
  f.sent_lsn = snap.lsn;
  ++st.counters.seeds_sent;
  spdlog::info("{}: seeding {} with '{}' v{} (entry {}, term {}): {}", st.node_id, shard, expert, snap.version, snap.lsn,
               l->term, why);
  send_to_shard(self, shard, f.seed_correlation, std::move(snap));
}

// Sends `shard` the entries it lacks, from the recent ones, or a seed when they reach back no further.
void pump(Self* self, const std::string& expert, const std::string& shard) {
  auto& st = self->state;
  auto* l = leadership(self, expert);
  const auto* e = st.store->find(expert);
  if (!l || !e) return;
  auto& f = l->followers[shard];
  if (!f.synced || f.sent_lsn >= e->durable_lsn) return;
  if (l->recent.empty() || l->recent.front().lsn > f.sent_lsn + 1)
    return seed(self, expert, shard, "entries after " + std::to_string(f.sent_lsn) + " are no longer kept");
  net::ReplicaAppend append{expert, l->term, l->committed, {}};
  uint64_t bytes = 0;
  for (const auto& entry : l->recent) {
    if (entry.lsn <= f.sent_lsn) continue;
    if (!append.entries.empty() && (append.entries.size() >= 64 || bytes >= (uint64_t{64} << 20))) break;  // the rest after its answer
    for (const auto& t : entry.tensors) bytes += t.size_bytes;
    for (const auto& t : entry.update.deltas) bytes += t.size_bytes;
    append.entries.push_back(entry);
  }
  if (append.entries.empty()) return;  // written, not yet flushed: sent once durable
  f.sent_lsn = append.entries.back().lsn;
  ++st.counters.appends_sent;
  st.counters.entries_sent += append.entries.size();
  send_to_shard(self, shard, 0, std::move(append));
}

void reject_waiter(Self* self, const ExpertShardState::Waiter& w, net::RejectReason reason, const std::string& detail) {
  const auto* e = self->state.store->find(w.ack.expert_id);
  send_to(self, w.worker, w.correlation,
          net::UpdateReject{w.ack.expert_id, w.ack.update_id, reason, detail, e ? e->weights.version : 0});
}

// Moves the commit point to the last entry the whole in-sync set holds, and acknowledges the workers
// whose entries it passed.
void advance_commit(Self* self, const std::string& expert) {
  auto& st = self->state;
  auto* l = leadership(self, expert);
  const auto* e = st.store->find(expert);
  if (!l || !e) return;
  const uint64_t before = l->committed;
  if (l->in_sync.size() >= l->min_in_sync && lease_holds(self)) {
    uint64_t committed = e->durable_lsn;
    for (const auto& shard : l->in_sync)
      if (shard != st.node_id) committed = std::min(committed, l->followers[shard].acked_lsn);
    l->committed = std::max(l->committed, committed);
  }
  if (l->committed > before) {
    // Readers may now see what committed, here and (told so) on the replicas.
    st.store->release(expert, l->committed);
    for (const auto& [shard, f] : l->followers)
      if (f.synced) send_to_shard(self, shard, 0, net::ReplicaAppend{expert, l->term, l->committed, {}});
  }
  while (!l->waiting.empty() && l->waiting.front().lsn <= l->committed) {
    auto& w = l->waiting.front();
    send_to(self, w.worker, w.correlation, w.ack);
    ++st.counters.committed_acks;
    l->waiting.pop_front();
  }
  // Entries every follower holds are not needed for catch-up any more; keep a bounded tail anyway.
  uint64_t needed = l->committed;
  for (const auto& [shard, f] : l->followers) needed = std::min(needed, f.acked_lsn);
  while (!l->recent.empty() && (l->recent.size() > st.recent_entries || l->recent.front().lsn + 8 <= needed)) {
    if (l->recent.front().has_update) l->lsn_of_update.erase(l->recent.front().update.update_id);
    l->recent.pop_front();
  }
}

// New entries of `expert`, written by this primary and durable here: kept for catch-up and sent to
// every synced replica, as one append.
void replicate(Self* self, const std::string& expert, const std::vector<net::LogEntry>& entries) {
  auto* l = leadership(self, expert);
  if (!l) return;
  for (const auto& entry : entries) {
    if (entry.term != l->term) continue;
    l->recent.push_back(entry);
    if (entry.has_update) l->lsn_of_update[entry.update.update_id] = entry.lsn;
  }
  for (auto& [shard, f] : l->followers) pump(self, expert, shard);
}

void request_isr(Self* self, const std::string& expert, std::vector<std::string> in_sync, const std::string& reason) {
  auto& st = self->state;
  auto* l = leadership(self, expert);
  if (!l || !st.membership.coordinator || in_sync == l->in_sync) return;
  l->isr_change_sent_ms = now_ms();
  spdlog::warn("{}: asking the coordinator for in-sync set of '{}' of {} replicas: {}", st.node_id, expert,
               in_sync.size(), reason);
  send_to(self, st.membership.coordinator, 0, net::IsrChange{expert, l->term, std::move(in_sync), reason});
}

// This shard no longer leads `expert` (a newer term, another primary): whoever waits is told to push
// to the primary; what was not committed is decided by the new primary (a retried push of an update it
// holds is acknowledged once committed there).
void step_down(Self* self, const std::string& expert, const std::string& why) {
  auto& st = self->state;
  auto* l = leadership(self, expert);
  if (!l) return;
  spdlog::warn("{}: no longer the primary of '{}' (term {}): {}", st.node_id, expert, l->term, why);
  ++st.counters.stepped_down;
  for (const auto& w : l->waiting) reject_waiter(self, w, net::RejectReason::not_replica, "this shard is no longer the primary: " + why);
  st.leading.erase(expert);
}

// The replication clock: silent in-sync replicas are reported, unanswered seeds resent, waiters that
// cannot commit get not_enough_replicas (their update stays in the log: a retry is acknowledged once
// it commits).
void replication_tick(Self* self) {
  auto& st = self->state;
  const int64_t now = now_ms();
  const int64_t timeout = static_cast<int64_t>(st.replication_timeout_ms);
  for (auto& [expert, l] : st.leading) {
    const auto* e = st.store->find(expert);
    if (!e) continue;
    for (auto& [shard, f] : l.followers) {
      if (!f.synced && f.seed_correlation != 0 && now - f.seed_sent_ms > timeout)
        seed(self, expert, shard, "no answer to the seed within " + std::to_string(timeout) + " ms");
      // Behind and silent: what was sent may be lost (a failed bulk transfer, a restarted link): again.
      if (f.synced && f.acked_lsn < e->durable_lsn && now - f.progress_ms > timeout) {
        f.sent_lsn = f.acked_lsn;
        f.progress_ms = now;
        ++st.counters.resent;
        pump(self, expert, shard);
      }
    }
    if (l.isr_change_sent_ms != 0 && now - l.isr_change_sent_ms > timeout) l.isr_change_sent_ms = 0;  // ask again
    if (!l.waiting.empty() && now - l.waiting.front().since_ms > timeout && l.isr_change_sent_ms == 0) {
      std::vector<std::string> keep;
      std::string laggards;
      for (const auto& shard : l.in_sync) {
        if (shard == st.node_id || l.followers[shard].acked_lsn >= l.waiting.front().lsn) keep.push_back(shard);
        else laggards += (laggards.empty() ? "" : ", ") + shard;
      }
      if (!laggards.empty()) {
        ++st.counters.isr_shrinks_asked;
        request_isr(self, expert, keep,
                    laggards + " did not acknowledge entry " + std::to_string(l.waiting.front().lsn) + " within " +
                        std::to_string(timeout) + " ms");
      }
    }
    // Caught-up replicas outside the set are proposed back in.
    if (l.isr_change_sent_ms == 0) {
      auto grown = l.in_sync;
      for (const auto& [shard, f] : l.followers)
        if (f.synced && f.acked_lsn >= e->durable_lsn && std::find(grown.begin(), grown.end(), shard) == grown.end())
          grown.push_back(shard);
      if (grown.size() > l.in_sync.size()) {
        ++st.counters.isr_expands_asked;
        request_isr(self, expert, grown, "caught up to entry " + std::to_string(e->durable_lsn));
      }
    }
    while (!l.waiting.empty() && now - l.waiting.front().since_ms > 2 * timeout) {
      ++st.counters.not_enough_replicas;
      reject_waiter(self, l.waiting.front(), net::RejectReason::not_enough_replicas,
                    "entry " + std::to_string(l.waiting.front().lsn) + " is not held by the in-sync set after " +
                        std::to_string(2 * timeout) + " ms; it commits when they catch up: push again later");
      l.waiting.pop_front();
    }
    advance_commit(self, expert);
  }
}

// A replica's handle: a new one (a restarted replica) may be behind and holds no seed of this term:
// it gets one.
void set_peer(Self* self, const std::string& shard, caf::actor handle) {
  auto& st = self->state;
  auto& known = st.peers[shard];
  const bool restarted = known && known != handle;
  known = std::move(handle);
  for (auto& [expert, l] : st.leading) {
    auto f = l.followers.find(shard);
    if (f == l.followers.end()) continue;
    if (restarted || (!f->second.synced && f->second.seed_correlation == 0))
      seed(self, expert, shard, restarted ? "it restarted" : "reachable now");
  }
}

// The coordinator's latest word on the experts this shard holds a replica of.
void on_placement(Self* self, const net::PlacementMap& map) {
  auto& st = self->state;
  if (map.epoch < st.placement_epoch) return;  // an older map overtaken by a newer one
  st.placement_epoch = map.epoch;
  st.last_coordinator_ms = now_ms();
  st.placed_experts.clear();
  st.replicas.clear();
  st.primary.clear();
  std::set<std::string> led;
  for (const auto& p : map.placements) {
    bool placed_here = false;
    for (const auto& r : p.replicas) {
      if (r.shard_id == st.node_id) placed_here = true;
      if (r.alive) st.replicas[p.expert_id].push_back(r.shard_id);
    }
    if (placed_here) st.placed_experts.push_back(p.expert_id);
    auto& known = st.known_term[p.expert_id];
    known = std::max(known, p.term);
    const bool primary_alive = !p.in_sync.empty() && std::any_of(p.replicas.begin(), p.replicas.end(), [&](const net::Replica& r) {
      return r.shard_id == p.in_sync.front() && r.alive;
    });
    st.primary[p.expert_id] = primary_alive ? p.in_sync.front() : std::string("(none: no in-sync replica is alive)");
    if (!primary_alive || p.in_sync.front() != st.node_id || p.term < known || !st.store->find(p.expert_id)) continue;
    led.insert(p.expert_id);
    auto* l = leadership(self, p.expert_id);
    if (l && l->term != p.term) {
      step_down(self, p.expert_id, "term " + std::to_string(p.term) + " begins");
      l = nullptr;
    }
    const bool fresh = !l;
    if (fresh) {
      l = &st.leading[p.expert_id];
      l->term = p.term;
      spdlog::info("{}: primary of '{}' under term {}", st.node_id, p.expert_id, p.term);
    }
    l->in_sync = p.in_sync;
    l->min_in_sync = std::max<uint32_t>(p.min_in_sync, 1);
    l->isr_change_sent_ms = 0;
    std::set<std::string> others;
    for (const auto& r : p.replicas)
      if (r.shard_id != st.node_id && r.alive) others.insert(r.shard_id);
    for (auto it = l->followers.begin(); it != l->followers.end();)
      it = others.count(it->first) ? std::next(it) : l->followers.erase(it);
    for (const auto& shard : others)
      if (!l->followers.count(shard)) seed(self, p.expert_id, shard, fresh ? "a new term" : "newly placed");
  }
  for (auto it = st.leading.begin(); it != st.leading.end();) {
    auto next = std::next(it);
    if (!led.count(it->first)) step_down(self, it->first, "the coordinator names another primary");
    it = next;
  }
  for (const auto& expert : led) advance_commit(self, expert);
  // A backup that became the primary owns the deadline of a round its old primary opened.
  const auto& policy = st.store->options().policy;
  if (policy.name == "fedavg" && policy.round_deadline_ms > 0)
    for (const auto& id : led)
      if (const auto* e = st.store->find(id); e && !e->policy->pending().empty())
        self->delayed_send(self, std::chrono::milliseconds(policy.round_deadline_ms), round_deadline_atom::value, id,
                           e->weights.version);
}

void on_update(Self* self, const net::Message& m, const net::UpdatePush& u) {
  auto& st = self->state;
  ++st.updates_received;
  const auto* held = st.store->find(u.expert_id);
  auto refuse = [&](net::RejectReason reason, const std::string& detail) {
    reply(self, m.correlation_id, net::UpdateReject{u.expert_id, u.update_id, reason, detail, held ? held->weights.version : 0});
  };
  // Only the primary takes updates (it writes the expert's log; the replicas copy it).
  if (!leads(self, u.expert_id)) {
    ++st.redirected;
    return refuse(net::RejectReason::not_replica, "the primary of '" + u.expert_id + "' is " + *primary_of(self, u.expert_id) + ": push there");
  }
  auto* l = leadership(self, u.expert_id);
  if (primary_of(self, u.expert_id) && !l)  // named primary, but not (yet) under a term of its own
    return refuse(net::RejectReason::not_replica, "this shard does not hold '" + u.expert_id + "' under the current term yet");
  if (l && !lease_holds(self)) {
    ++st.counters.lease_expired;
    return refuse(net::RejectReason::not_enough_replicas,
                  "no word from the coordinator for " + std::to_string(now_ms() - st.last_coordinator_ms) +
                      " ms (half the lease is " + std::to_string(st.lease_ms / 2) + "): this primary may have been replaced");
  }
  // A retried update this primary holds but has not committed yet (its own entry, or one from before
  // its term, which commits with everything it holds): acknowledged when it commits, not refused.
  if (l && held && held->seen.count(u.update_id)) {
    uint64_t lsn = held->lsn;
    net::UpdateAck ack{u.expert_id, u.update_id, held->weights.version, 0, 0};
    if (auto at = l->lsn_of_update.find(u.update_id); at != l->lsn_of_update.end()) {
      lsn = at->second;
      for (const auto& entry : l->recent)
        if (entry.lsn == lsn) ack = {u.expert_id, u.update_id, entry.version, entry.staleness, entry.weight};
    }
    if (lsn > l->committed) {
      ++st.counters.duplicates_acked;
      l->waiting.push_back({caf::actor_cast<caf::actor>(self->current_sender()), m.correlation_id, ack, lsn, now_ms()});
      return advance_commit(self, u.expert_id);
    }
  }
  if (l && l->in_sync.size() < l->min_in_sync) {
    ++st.counters.not_enough_replicas;
    return refuse(net::RejectReason::not_enough_replicas,
                  std::to_string(l->in_sync.size()) + " of '" + u.expert_id + "' replicas are in sync, " +
                      std::to_string(l->min_in_sync) + " are needed: push again later");
  }
  PushResult r;
  try {
    r = st.store->push(u, l ? l->term : 0, /*defer=*/true);  // flushed with whatever else waits (group commit)
  } catch (const std::exception& e) {  // storage trouble: nothing applied; say so, the worker retries later
    ++st.errors["storage_error"];
    spdlog::error("{}: update '{}' of '{}' not stored: {}", st.node_id, u.update_id, u.expert_id, e.what());
    held = st.store->find(u.expert_id);
    return refuse(net::RejectReason::storage_error, e.what());
  }
  if (!r.accepted) {
    spdlog::info("{}: rejected update '{}' of '{}' from {}: {} ({})", st.node_id, u.update_id, u.expert_id, u.worker_id,
                 net::to_string(r.reject.reason), r.reject.detail);
    return reply(self, m.correlation_id, r.reject);
  }
  const auto& policy = st.store->options().policy;
  if (!r.applied && policy.name == "fedavg" && policy.round_deadline_ms > 0) {
    const auto* e = st.store->find(u.expert_id);
    if (e && e->policy->pending().size() == 1)  // this update opened a round: its deadline starts now
      self->delayed_send(self, std::chrono::milliseconds(policy.round_deadline_ms), round_deadline_atom::value,
                         u.expert_id, e->weights.version);
  }
  auto& batch = st.unflushed[u.expert_id];
  batch.waiters.push_back({caf::actor_cast<caf::actor>(self->current_sender()), m.correlation_id, r.ack, r.entry.lsn, now_ms()});
  batch.entries.push_back(std::move(r.entry));
  schedule_flush(self);
}

// Group commit: the first deferred write asks for a flush, which runs after every message already
// waiting in the mailbox; all the records they wrote share its one fdatasync.
void schedule_flush(Self* self) {
  if (self->state.flush_scheduled) return;
  self->state.flush_scheduled = true;
  self->send(self, flush_atom::value);
}

void flush_all(Self* self) {
  auto& st = self->state;
  st.flush_scheduled = false;
  ++st.counters.flushes;
  // Pushes: durable here, then replicated (entries leave this shard only once it holds them: a
  // failed flush must not leave replicas with entries the primary lost).
  auto unflushed = std::move(st.unflushed);
  st.unflushed.clear();
  for (auto& [expert, batch] : unflushed) {
    uint64_t durable = 0;
    std::string failure;
    try {
      durable = st.store->flush(expert);
    } catch (const std::exception& e) {
      failure = e.what();
      ++st.errors["storage_error"];
      spdlog::error("{}: updates of '{}' not stored: {}", st.node_id, expert, failure);
      if (const auto* held = st.store->find(expert)) durable = held->durable_lsn;
    }
    auto* l = leadership(self, expert);
    std::erase_if(batch.entries, [&](const net::LogEntry& entry) { return entry.lsn > durable; });
    if (l) replicate(self, expert, batch.entries);
    for (auto& w : batch.waiters) {
      if (w.lsn > durable) {
        reject_waiter(self, w, net::RejectReason::storage_error, failure.empty() ? "not stored" : failure);
      } else if (l) {
        l->waiting.push_back(std::move(w));
      } else if (primary_of(self, expert)) {  // stepped down meanwhile: the new primary decides
        reject_waiter(self, w, net::RejectReason::not_replica, "this shard is no longer the primary of '" + expert + "'");
      } else {
        send_to(self, w.worker, w.correlation, w.ack);  // standalone: durable here is all there is
      }
    }
    if (l) advance_commit(self, expert);
    else if (!primary_of(self, expert)) st.store->release(expert, durable);
  }
  // Replicas: what the primary sent is durable here now; one answer per expert.
  auto acks = std::move(st.acks_due);
  st.acks_due.clear();
  for (auto& [expert, due] : acks) {
    std::string refused;
    try {
      st.store->flush(expert);
    } catch (const std::exception& e) {
      refused = std::string("storage_error: ") + e.what();
    }
    st.store->release(expert, due.committed);  // (the store shows no more than it holds on disk)
    send_to(self, due.primary, 0, replica_state(self, expert, refused));
  }
  announce_versions(self);
}

// A replica's answer to an append or a seed.
void on_replica_ack(Self* self, const net::Message& m, const net::ReplicaAck& ack) {
  auto& st = self->state;
  auto* l = leadership(self, ack.expert_id);
  if (!l) return;
  if (ack.term > l->term) return step_down(self, ack.expert_id, m.sender_id + " is at term " + std::to_string(ack.term));
  auto it = l->followers.find(m.sender_id);
  if (it == l->followers.end()) return;
  auto& f = it->second;
  if (!ack.refused.empty()) {
    ++st.counters.refusals_received[ack.refused];
    if (ack.refused == "stale_term") return step_down(self, ack.expert_id, m.sender_id + " refused term " + std::to_string(l->term));
    if (ack.refused == "gap" && f.synced) {  // an entry overtook another: send again from what it holds
      f.acked_lsn = std::max(f.acked_lsn, ack.lsn);
      f.sent_lsn = ack.lsn;
      return pump(self, ack.expert_id, m.sender_id);
    }
    if (ack.refused == "need_snapshot" || ack.refused == "gap")
      return seed(self, ack.expert_id, m.sender_id, m.sender_id + " answered " + ack.refused);
    return;  // storage_error: it leaves the in-sync set if it stays behind
  }
  if (m.correlation_id != 0 && m.correlation_id == f.seed_correlation) {
    f.progress_ms = now_ms();
    f.synced = true;
    f.seed_correlation = 0;
    f.sent_lsn = std::max(f.sent_lsn, ack.lsn);
  }
  if (!f.synced) return;  // an answer to entries sent before the seed
  if (ack.lsn > f.acked_lsn) f.progress_ms = now_ms();
  f.acked_lsn = std::max(f.acked_lsn, ack.lsn);
  const auto* e = st.store->find(ack.expert_id);
  if (e && ack.version == e->published.version && ack.checksum != st.store->receipt(ack.expert_id).checksum) {
    ++st.counters.diverged;
    spdlog::error("{}: replica {} of '{}' holds other bytes under v{}: seeding it again", st.node_id, m.sender_id,
                  ack.expert_id, ack.version);
    return seed(self, ack.expert_id, m.sender_id, "its checksum differs");
  }
  pump(self, ack.expert_id, m.sender_id);
  advance_commit(self, ack.expert_id);
}

// --- the replica's side ---------------------------------------------------------------------------

net::ReplicaAck replica_state(Self* self, const std::string& expert, std::string refused) {
  auto& st = self->state;
  net::ReplicaAck ack{expert, st.known_term[expert], 0, 0, 0, std::move(refused)};
  if (const auto* e = st.store->find(expert)) {
    ack.lsn = e->durable_lsn;
    ack.version = e->published.version;
    ack.checksum = st.store->receipt(expert).checksum;
  }
  if (!ack.refused.empty()) ++st.counters.refusals_sent[ack.refused.substr(0, ack.refused.find(':'))];
  return ack;
}

void on_snapshot(Self* self, const net::Message& m, const net::ExpertSnapshot& snap) {
  auto& st = self->state;
  const auto& expert = snap.spec.expert_id;
  if (snap.term > 0) {  // a primary seeding this replica
    auto& known = st.known_term[expert];
    if (snap.term < known) return reply(self, m.correlation_id, replica_state(self, expert, "stale_term"));
    if (leadership(self, expert)) step_down(self, expert, m.sender_id + " seeds it under term " + std::to_string(snap.term));
    known = snap.term;
  }
  net::SnapshotReceipt receipt;
  try {
    receipt = st.store->install(snap);
  } catch (const std::exception& e) {
    if (snap.term > 0) return reply(self, m.correlation_id, replica_state(self, expert, std::string("storage_error: ") + e.what()));
    return reply_error(self, m.correlation_id, "bad_snapshot", e.what());
  }
  ++st.snapshots_received;
  spdlog::info("{}: expert '{}' v{} (entry {}, term {}, {} tensors, {} bytes) from {}", st.node_id, expert,
               receipt.version, receipt.lsn, receipt.term, receipt.tensor_count, receipt.byte_count, m.sender_id);
  if (snap.term == 0) return reply(self, m.correlation_id, receipt);
  st.synced_term[expert] = snap.term;
  reply(self, m.correlation_id, replica_state(self, expert, ""));
}

void on_append(Self* self, const net::Message& m, const net::ReplicaAppend& a) {
  auto& st = self->state;
  auto& known = st.known_term[a.expert_id];
  if (a.term < known) return reply(self, 0, replica_state(self, a.expert_id, "stale_term"));
  known = a.term;
  if (leadership(self, a.expert_id)) step_down(self, a.expert_id, m.sender_id + " appends under term " + std::to_string(a.term));
  if (st.synced_term[a.expert_id] != a.term) return reply(self, 0, replica_state(self, a.expert_id, "need_snapshot"));
  if (a.entries.empty()) {  // the primary's commit point moved: readers may see what it covers
    st.store->release(a.expert_id, a.committed_lsn);
    return;
  }
  const auto* held = st.store->find(a.expert_id);
  if (!held) return reply(self, 0, replica_state(self, a.expert_id, "need_snapshot"));
  // Entries are applied strictly in log order. A large append travels the bulk channel and a small
  // one inline, so a later one may arrive first: it waits here (bounded) for the ones before it.
  auto& early = st.early[a.expert_id];
  for (const auto& entry : a.entries)
    if (entry.lsn > held->lsn) early.insert_or_assign(entry.lsn, entry);
  auto& due = st.acks_due[a.expert_id];
  due.primary = caf::actor_cast<caf::actor>(self->current_sender());
  due.committed = std::max(due.committed, a.committed_lsn);
  schedule_flush(self);  // answered once flushed, with whatever else arrived meanwhile (group commit)
  while (!early.empty()) {
    auto next = early.begin();
    if (next->first <= held->lsn) {
      early.erase(next);
      continue;
    }
    if (next->first != held->lsn + 1) break;  // a gap: the entries before it are still on their way
    try {
      st.store->append(a.expert_id, next->second, /*defer=*/true);
    } catch (const ReplicaRefusal& r) {
      spdlog::warn("{}: entry {} of '{}' refused: {}", st.node_id, next->first, a.expert_id, r.what());
      early.clear();
      return reply(self, 0, replica_state(self, a.expert_id, r.code));
    } catch (const std::exception& e) {
      spdlog::error("{}: entry {} of '{}' not stored: {}", st.node_id, next->first, a.expert_id, e.what());
      early.clear();
      return reply(self, 0, replica_state(self, a.expert_id, std::string("storage_error: ") + e.what()));
    }
    early.erase(next);
  }
  if (early.size() > st.recent_entries) early.clear();  // lost, not late: the primary sends them again
}

void on_pull(Self* self, const net::Message& m, const net::SnapshotRequest& req) {
  const auto* e = self->state.store->find(req.expert_id);
  if (!e) return reply_error(self, m.correlation_id, "unknown_expert", "this shard holds no expert '" + req.expert_id + "'");
  if (e->published.version < req.min_version)
    return reply_error(self, m.correlation_id, "version_unavailable",
                       "expert '" + req.expert_id + "' is at v" + std::to_string(e->published.version) + ", v" +
                           std::to_string(req.min_version) + " was asked for");
  ++self->state.pulls_served;
  if (req.subscribe) subscribe(self, req.expert_id);
  reply(self, m.correlation_id, e->published);  // immutable per version: later updates never change these bytes
}



std::string status_json(Self* self, bool verbose) {
  auto& st = self->state;
  nlohmann::json j;
  if (verbose) {  // the retained update ids per expert (what a chaos test checks exactly-once with)
    nlohmann::json ids = nlohmann::json::object();
    for (const auto& id : st.store->expert_ids()) ids[id] = st.store->find(id)->seen_order;
    j["update_ids"] = ids;
  }
  j["node_id"] = st.node_id;
  j["role"] = "shard";
  j["experts"] = st.store->status();
  j["policy"] = st.store->options().policy.name;
  j["placement_epoch"] = st.placement_epoch;
  j["placed_experts"] = st.placed_experts;
  nlohmann::json leading = nlohmann::json::object();
  for (const auto& [expert, l] : st.leading) {
    nlohmann::json followers = nlohmann::json::object();
    for (const auto& [shard, f] : l.followers)
      followers[shard] = {{"acked_lsn", f.acked_lsn}, {"sent_lsn", f.sent_lsn}, {"synced", f.synced}};
    const auto* e = st.store->find(expert);
    leading[expert] = {{"term", l.term},
                       {"in_sync", l.in_sync},
                       {"min_in_sync", l.min_in_sync},
                       {"lsn", e ? e->lsn : 0},
                       {"committed_lsn", l.committed},
                       {"waiting", l.waiting.size()},
                       {"followers", followers}};
  }
  const auto& c = st.counters;
  j["replication"] = {{"leading", leading},
                      {"known_terms", st.known_term},
                      {"synced_terms", st.synced_term},
                      {"lease_holds", lease_holds(self)},
                      {"appends_sent", c.appends_sent},
                      {"entries_sent", c.entries_sent},
                      {"seeds_sent", c.seeds_sent},
                      {"seeds_retried", c.seeds_retried},
                      {"flushes", c.flushes},
                      {"resent", c.resent},
                      {"committed_acks", c.committed_acks},
                      {"isr_shrinks_asked", c.isr_shrinks_asked},
                      {"isr_expands_asked", c.isr_expands_asked},
                      {"stepped_down", c.stepped_down},
                      {"not_enough_replicas", c.not_enough_replicas},
                      {"lease_expired", c.lease_expired},
                      {"duplicates_acked", c.duplicates_acked},
                      {"diverged", c.diverged},
                      {"refusals_received", c.refusals_received},
                      {"refusals_sent", c.refusals_sent}};
  j["snapshots_received"] = st.snapshots_received;
  j["pulls_served"] = st.pulls_served;
  size_t subscribers = 0;
  for (const auto& [expert, subs] : st.subscribers) subscribers += subs.size();
  j["subscribers"] = subscribers;
  j["version_notices_sent"] = st.notices_sent;
  j["updates_received"] = st.updates_received;
  j["redirected_to_primary"] = st.redirected;
  j["errors"] = st.errors;
  auto s = st.transport->stats();
  j["transport"] = {{"sent_local", s.sent_local}, {"sent_inline", s.sent_inline}, {"sent_bulk", s.sent_bulk},
                    {"received", s.received},     {"fetches", s.fetches},         {"fetch_failures", s.fetch_failures},
                    {"decode_errors", s.decode_errors}};
  return json_text(j);
}

// FedAvg's round deadline, on the primary (or a standalone shard): the round closes with what
// arrived, and the new version is an entry like any other.
void on_round_deadline(Self* self, const std::string& expert_id, uint64_t round_version) {
  auto& st = self->state;
  const auto* e = st.store->find(expert_id);
  if (!e || e->weights.version != round_version || e->policy->pending().empty()) return;  // closed already
  if (!leads(self, expert_id)) return;  // a backup now: the primary's entries decide
  auto* l = leadership(self, expert_id);
  if (primary_of(self, expert_id) && !l) return;
  try {
    net::LogEntry entry;
    if (st.store->close_round(expert_id, l ? l->term : 0, &entry)) {
      spdlog::info("{}: round of '{}' closed at its deadline: v{}", st.node_id, expert_id, entry.version);
      if (l) {
        replicate(self, expert_id, {entry});
        advance_commit(self, expert_id);
      } else {
        st.store->release(expert_id, entry.lsn);  // standalone: durable here is all there is
      }
      return announce_versions(self);
    }
  } catch (const std::exception& ex) {
    spdlog::error("{}: closing the round of '{}' failed: {}", st.node_id, expert_id, ex.what());
  }
  // Fewer than min_updates: wait another deadline.
  self->delayed_send(self, std::chrono::milliseconds(st.store->options().policy.round_deadline_ms),
                     round_deadline_atom::value, expert_id, round_version);
}

// Every message a peer sends to the shard.
void on_message(Self* self, const net::Message& m) {
  auto& st = self->state;
  if (auto* snap = std::get_if<net::ExpertSnapshot>(&m.body)) {
    on_snapshot(self, m, *snap);
    if (snap->term == 0) on_placement(self, st.map);  // an expert added here may be ours to lead
    return announce_versions(self);
  }
  if (auto* append = std::get_if<net::ReplicaAppend>(&m.body)) {
    on_append(self, m, *append);
    return announce_versions(self);
  }
  if (auto* ack = std::get_if<net::ReplicaAck>(&m.body)) return on_replica_ack(self, m, *ack);
  if (auto* pull = std::get_if<net::SnapshotRequest>(&m.body)) return on_pull(self, m, *pull);
  if (auto* push = std::get_if<net::UpdatePush>(&m.body)) {
    on_update(self, m, *push);
    return announce_versions(self);
  }
  if (auto* map = std::get_if<net::PlacementMap>(&m.body)) {
    if (map->epoch >= st.placement_epoch) st.map = *map;
    return on_placement(self, *map);
  }
  if (auto* hello = std::get_if<net::HelloAck>(&m.body)) {  // the coordinator answered: the lease is renewed
    st.lease_ms = static_cast<int64_t>(hello->lease_ms);
    st.last_coordinator_ms = now_ms();
    return;
  }
  if (std::holds_alternative<net::SnapshotReceipt>(m.body)) return;
  if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {  // never answer an error with an error
    if (err->code == "not_a_member" && st.link) self->send(st.link, rejoin_atom::value);
    if (err->code == "isr_change_refused") {
      ++st.errors["isr_change_refused"];
      spdlog::warn("{}: the coordinator refused an in-sync change: {}", st.node_id, err->detail);
    }
    return;
  }
  if (auto* req = std::get_if<net::StatusRequest>(&m.body))
    return reply(self, m.correlation_id, net::StatusReply{req->request_id, st.node_id, net::Role::shard, status_json(self, req->verbose)});
  reply_error(self, m.correlation_id, "unsupported",
              std::string("an expert shard does not handle ") + net::body_name(m.body) + " messages");
}

}  // namespace

caf::behavior expert_shard(Self* self, std::string node_id, std::shared_ptr<net::Transport> transport) {
  return expert_shard_with(self, std::move(node_id), std::move(transport), ExpertStoreOptions{});
}

caf::behavior expert_shard_with(Self* self, std::string node_id, std::shared_ptr<net::Transport> transport,
                                ExpertStoreOptions options) {
  ShardOptions o;
  o.store = std::move(options);
  return expert_shard_node(self, std::move(node_id), std::move(transport), std::move(o));
}

caf::behavior expert_shard_node(Self* self, std::string node_id, std::shared_ptr<net::Transport> transport,
                                ShardOptions options) {
  self->state.node_id = std::move(node_id);
  self->state.transport = std::move(transport);
  options.store.release_on_durable = false;  // readers see versions at the commit point (release())
  self->state.store = std::make_unique<ExpertStore>(std::move(options.store));
  self->state.membership = std::move(options.membership);
  self->state.replication_timeout_ms = std::max<uint64_t>(options.replication_timeout_ms, 1);
  self->state.membership.hello.node_id = self->state.node_id;
  self->state.membership.hello.role = net::Role::shard;
  self->state.link = spawn_coordinator_link(self, self->state.transport, self->state.membership);
  self->send(self, replication_tick_atom::value);
  self->set_down_handler([=](const caf::down_msg& down) {
    for (auto& [expert, subs] : self->state.subscribers)
      for (auto it = subs.begin(); it != subs.end();) it = it->address() == down.source ? subs.erase(it) : std::next(it);
    peer_down(self, self->state.peers, self->state.peer_endpoint, down.source);  // connected again
  });
  return {
      [=](join_atom, caf::actor coordinator, std::string endpoint) {
        join_federation(self, self->state.transport, self->state.membership, self->state.link, std::move(coordinator),
                        std::move(endpoint), "");
      },
      [=](join_atom, caf::actor coordinator, std::string endpoint, std::string coordinator_endpoint) {
        join_federation(self, self->state.transport, self->state.membership, self->state.link, std::move(coordinator),
                        std::move(endpoint), std::move(coordinator_endpoint));
      },
      [=](coordinator_atom, caf::actor coordinator) { self->state.membership.coordinator = std::move(coordinator); },
      [=](peer_atom, const std::string& shard, caf::actor handle) { set_peer(self, shard, std::move(handle)); },
      [=](peer_atom, const std::string& shard, caf::actor handle, const std::string& endpoint) {
        // The coordinator's introduction: a shard published at an endpoint is reached over a
        // connection of this shard's own (actors/membership.hpp), one in this process directly.
        auto& st = self->state;
        if (endpoint.empty()) return set_peer(self, shard, std::move(handle));
        if (!st.peers[shard]) set_peer(self, shard, handle);  // until its own connection is up (the same actor)
        auto known = st.peer_endpoint.find(shard);
        if (known == st.peer_endpoint.end() || known->second != endpoint || !st.peers[shard])
          connect_peer(self, &st.peer_endpoint, shard, endpoint);
      },
      [=](direct_peer_atom, const std::string& shard, caf::actor handle) { set_peer(self, shard, std::move(handle)); },
      [=](reconnect_peer_atom, const std::string& shard) {
        auto it = self->state.peer_endpoint.find(shard);
        if (it != self->state.peer_endpoint.end()) connect_peer(self, &self->state.peer_endpoint, shard, it->second);
      },
      [=](flush_atom) { flush_all(self); },
      [=](replication_tick_atom) {
        replication_tick(self);
        self->delayed_send(self, std::chrono::milliseconds(std::max<uint64_t>(self->state.replication_timeout_ms / 4, 10)),
                           replication_tick_atom::value);
      },
      [=](round_deadline_atom, const std::string& expert_id, uint64_t round_version) {
        on_round_deadline(self, expert_id, round_version);
      },
      [=](net::WireFrame& frame) {
        dispatch(self, *self->state.transport, self->state.node_id, self->state.errors, frame,
                 [&](const net::Message& m) { on_message(self, m); });
      },
  };
}

}  // namespace fedmoe::actors
