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
using replication_timeout_atom = caf::atom_constant<caf::atom("rtimeout")>;
using seed_timeout_atom = caf::atom_constant<caf::atom("stimeout")>;

// The primary of `expert` in the latest map, or nullptr when no map places it (a standalone shard).
const std::string* primary_of(Self* self, const std::string& expert) {
  auto it = self->state.replicas.find(expert);
  return it == self->state.replicas.end() || it->second.empty() ? nullptr : &it->second.front();
}

bool is_primary(Self* self, const std::string& expert) {
  const auto* p = primary_of(self, expert);
  return p && *p == self->state.node_id;
}

// Whether this shard decides for `expert`: its primary, or a shard outside any placement (standalone).
bool leads(Self* self, const std::string& expert) {
  const auto* p = primary_of(self, expert);
  return !p || *p == self->state.node_id;
}

void send_to(Self* self, const caf::actor& to, uint64_t correlation_id, net::Body body) {
  self->state.transport->send(self, to, self->state.node_id, correlation_id, std::move(body));
}

// As the primary: give replicas that are new to an expert our current version (before any forwarded
// update, which then applies on top of it). Not while updates are pending in a FedAvg round or a
// FedBuff buffer: the snapshot would not carry them.
void seed_replicas(Self* self) {
  auto& st = self->state;
  for (const auto& [expert, shards] : st.replicas) {
    if (!is_primary(self, expert)) continue;
    const auto* e = st.store->find(expert);
    if (!e || !e->policy->pending().empty()) continue;
    for (const auto& shard : shards) {
      if (shard == st.node_id || st.seeded[expert].count(shard)) continue;
      auto peer = st.peers.find(shard);
      if (peer == st.peers.end()) continue;
      // With the update ids folded in so far: should the replica become primary, a repeated id is
      // still recognised.
      auto seed = e->published;
      seed.seen_update_ids.assign(e->seen_order.begin(), e->seen_order.end());
      const uint64_t corr = st.next_correlation++;
      send_to(self, peer->second, corr, std::move(seed));
      st.seeded[expert].insert(shard);
      st.seed_of[corr] = {expert, shard};
      ++st.seeds_sent;
      self->delayed_send(self, std::chrono::milliseconds(st.replication_timeout_ms), seed_timeout_atom::value, corr);
      spdlog::info("{}: seeded replica {} of '{}' with v{}", st.node_id, shard, expert, e->weights.version);
    }
  }
}

// `shard` needs our snapshot of `expert` again (its seed failed, it restarted, it fell out of order).
void reseed(Self* self, const std::string& expert, const std::string& shard, const std::string& why) {
  auto& st = self->state;
  if (!st.seeded[expert].erase(shard)) return;
  ++st.seeds_retried;
  spdlog::warn("{}: replica {} of '{}' is seeded again: {}", st.node_id, shard, expert, why);
  seed_replicas(self);
}

// Tells subscribers of every expert whose version moved past the last announced one.
void announce_versions(Self* self) {
  auto& st = self->state;
  for (auto& [expert, subs] : st.subscribers) {
    const auto* e = st.store->find(expert);
    if (!e || subs.empty()) continue;
    auto& last = st.announced[expert];
    if (e->weights.version <= last) continue;
    last = e->weights.version;
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
  if (e) last = std::max(last, e->weights.version);  // the subscriber has this one: it just pulled it
}

void finish_replication(Self* self, uint64_t id) {
  auto it = self->state.replications.find(id);
  if (it == self->state.replications.end()) return;
  for (auto corr : it->second.waiting) self->state.replication_of.erase(corr);
  send_to(self, it->second.worker, it->second.worker_correlation, it->second.ack);
  self->state.replications.erase(it);
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

void on_snapshot(Self* self, const net::Message& m, const net::ExpertSnapshot& snap) {
  net::SnapshotReceipt receipt;
  try {
    receipt = self->state.store->install(snap);
  } catch (const std::exception& e) {
    return reply_error(self, m.correlation_id, "bad_snapshot", e.what());
  }
  ++self->state.snapshots_received;
  spdlog::info("{}: expert '{}' v{} ({} tensors, {} bytes) from {}", self->state.node_id, snap.spec.expert_id,
               receipt.version, receipt.tensor_count, receipt.byte_count, m.sender_id);
  reply(self, m.correlation_id, receipt);
  seed_replicas(self);  // a primary that just got the expert hands it on
}

void on_pull(Self* self, const net::Message& m, const net::SnapshotRequest& req) {
  const auto* e = self->state.store->find(req.expert_id);
  if (!e) return reply_error(self, m.correlation_id, "unknown_expert", "this shard holds no expert '" + req.expert_id + "'");
  if (e->weights.version < req.min_version)
    return reply_error(self, m.correlation_id, "version_unavailable",
                       "expert '" + req.expert_id + "' is at v" + std::to_string(e->weights.version) + ", v" +
                           std::to_string(req.min_version) + " was asked for");
  ++self->state.pulls_served;
  if (req.subscribe) subscribe(self, req.expert_id);
  reply(self, m.correlation_id, e->published);  // immutable per version: later updates never change these bytes
}

void on_update(Self* self, const net::Message& m, const net::UpdatePush& u) {
  ++self->state.updates_received;
  // Only the primary takes updates from workers (a backup applying them too would diverge from it);
  // a backup takes the primary's forwarded copies. Without a placement map (a standalone shard) every
  // shard is its own primary.
  if (const auto* primary = primary_of(self, u.expert_id); primary && *primary != self->state.node_id &&
                                                              m.sender_id != *primary) {
    ++self->state.redirected;
    const auto* e = self->state.store->find(u.expert_id);
    return reply(self, m.correlation_id,
                 net::UpdateReject{u.expert_id, u.update_id, net::RejectReason::not_replica,
                                   "the primary of '" + u.expert_id + "' is " + *primary + ": push there",
                                   e ? e->weights.version : 0});
  }
  PushResult r;
  try {
    r = self->state.store->push(u);
  } catch (const std::exception& e) {  // storage trouble: nothing applied; say so, the worker retries later
    ++self->state.errors["storage_error"];
    spdlog::error("{}: update '{}' of '{}' not stored: {}", self->state.node_id, u.update_id, u.expert_id, e.what());
    const auto* held = self->state.store->find(u.expert_id);
    return reply(self, m.correlation_id,
                 net::UpdateReject{u.expert_id, u.update_id, net::RejectReason::storage_error, e.what(),
                                   held ? held->weights.version : 0});
  }
  const auto& policy = self->state.store->options().policy;
  if (r.accepted && !r.applied && policy.name == "fedavg" && policy.round_deadline_ms > 0 && leads(self, u.expert_id)) {
    const auto* e = self->state.store->find(u.expert_id);
    if (e && e->policy->pending().size() == 1)  // this update opened a round: its deadline starts now
      self->delayed_send(self, std::chrono::milliseconds(policy.round_deadline_ms), round_deadline_atom::value,
                         u.expert_id, e->weights.version);
  }
  if (!r.accepted) {
    spdlog::info("{}: rejected update '{}' of '{}' from {}: {} ({})", self->state.node_id, u.update_id, u.expert_id,
                 u.worker_id, net::to_string(r.reject.reason), r.reject.detail);
    return reply(self, m.correlation_id, r.reject);
  }
  auto& st = self->state;
  if (!is_primary(self, u.expert_id)) return reply(self, m.correlation_id, r.ack);  // a replica: the primary waits
  // The primary: forward to the other replicas, acknowledge when they have it.
  const uint64_t id = st.next_correlation++;
  ExpertShardState::Replication rep{caf::actor_cast<caf::actor>(self->current_sender()), m.correlation_id, r.ack, {}};
  for (const auto& shard : st.replicas[u.expert_id]) {
    if (shard == st.node_id) continue;
    auto peer = st.peers.find(shard);
    if (peer == st.peers.end()) continue;
    const uint64_t corr = st.next_correlation++;
    rep.waiting.insert(corr);
    st.replication_of[corr] = id;
    send_to(self, peer->second, corr, u);
  }
  if (rep.waiting.empty()) return reply(self, m.correlation_id, r.ack);
  ++st.replicated;
  st.replications[id] = std::move(rep);
  self->delayed_send(self, std::chrono::milliseconds(st.replication_timeout_ms), replication_timeout_atom::value, id);
}

// A replica's answer to a forwarded update.
void on_replica_answer(Self* self, const net::Message& m, bool accepted, const std::string& detail) {
  auto& st = self->state;
  auto it = st.replication_of.find(m.correlation_id);
  if (it == st.replication_of.end()) return;  // late, after the timeout
  const uint64_t id = it->second;
  st.replication_of.erase(it);
  auto rep = st.replications.find(id);
  if (!accepted) {
    ++st.replica_rejects;
    spdlog::warn("{}: replica {} refused a forwarded update: {}", st.node_id, m.sender_id, detail);
    if (rep != st.replications.end()) reseed(self, rep->second.ack.expert_id, m.sender_id, detail);
  }
  if (rep == st.replications.end()) return;
  rep->second.waiting.erase(m.correlation_id);
  if (rep->second.waiting.empty()) finish_replication(self, id);
}

std::string status_json(Self* self) {
  nlohmann::json j;
  j["node_id"] = self->state.node_id;
  j["role"] = "shard";
  j["experts"] = self->state.store->status();
  j["policy"] = self->state.store->options().policy.name;
  j["placement_epoch"] = self->state.placement_epoch;
  j["placed_experts"] = self->state.placed_experts;
  j["seeds"] = {{"sent", self->state.seeds_sent}, {"retried", self->state.seeds_retried},
                {"awaiting_receipt", self->state.seed_of.size()}};
  j["replication"] = {{"forwarded", self->state.replicated},
                      {"timeouts", self->state.replication_timeouts},
                      {"replica_rejects", self->state.replica_rejects}};
  j["snapshots_received"] = self->state.snapshots_received;
  j["pulls_served"] = self->state.pulls_served;
  size_t subscribers = 0;
  for (const auto& [expert, subs] : self->state.subscribers) subscribers += subs.size();
  j["subscribers"] = subscribers;
  j["version_notices_sent"] = self->state.notices_sent;
  j["updates_received"] = self->state.updates_received;
  j["redirected_to_primary"] = self->state.redirected;
  j["errors"] = self->state.errors;
  auto s = self->state.transport->stats();
  j["transport"] = {{"sent_local", s.sent_local}, {"sent_inline", s.sent_inline}, {"sent_bulk", s.sent_bulk},
                    {"received", s.received},     {"fetches", s.fetches},         {"fetch_failures", s.fetch_failures},
                    {"decode_errors", s.decode_errors}};
  return json_text(j);
}

// Every message a peer sends to the shard.
void on_message(Self* self, const net::Message& m) {
  if (auto* snap = std::get_if<net::ExpertSnapshot>(&m.body)) {
    on_snapshot(self, m, *snap);
    return announce_versions(self);
  }
  if (auto* pull = std::get_if<net::SnapshotRequest>(&m.body)) return on_pull(self, m, *pull);
  if (auto* push = std::get_if<net::UpdatePush>(&m.body)) {
    on_update(self, m, *push);
    return announce_versions(self);
  }
  if (auto* map = std::get_if<net::PlacementMap>(&m.body)) {
    if (map->epoch < self->state.placement_epoch) return;  // an older map overtaken by a newer one
    self->state.placement_epoch = map->epoch;
    self->state.placed_experts.clear();
    self->state.replicas.clear();
    for (const auto& p : map->placements) {
      for (const auto& r : p.replicas) {
        if (r.shard_id == self->state.node_id) self->state.placed_experts.push_back(p.expert_id);
        if (r.alive) self->state.replicas[p.expert_id].push_back(r.shard_id);
      }
    }
    // A replica that left an expert's placement is seeded again should it come back (it may be behind).
    for (auto& [expert, shards] : self->state.seeded) {
      auto live = self->state.replicas.find(expert);
      auto placed = [&](const std::string& shard) {
        return live != self->state.replicas.end() &&
               std::find(live->second.begin(), live->second.end(), shard) != live->second.end();
      };
      for (auto it = shards.begin(); it != shards.end();) it = placed(*it) ? std::next(it) : shards.erase(it);
    }
    // A backup that became the primary owns the deadline of a round its old primary opened.
    const auto& policy = self->state.store->options().policy;
    if (policy.name == "fedavg" && policy.round_deadline_ms > 0)
      for (const auto& id : self->state.store->expert_ids())
        if (const auto* e = self->state.store->find(id); e && leads(self, id) && !e->policy->pending().empty())
          self->delayed_send(self, std::chrono::milliseconds(policy.round_deadline_ms), round_deadline_atom::value,
                             id, e->weights.version);
    seed_replicas(self);
    return;
  }
  if (std::holds_alternative<net::HelloAck>(m.body)) return;
  if (auto* rc = std::get_if<net::RoundClose>(&m.body)) {
    if (const auto* primary = primary_of(self, rc->expert_id); !primary || *primary != m.sender_id)
      return reply_error(self, m.correlation_id, "not_primary",
                         "only the primary of '" + rc->expert_id + "' closes its rounds");
    const auto* e = self->state.store->find(rc->expert_id);
    if (!e || e->weights.version != rc->round_version || e->policy->pending().empty()) return;
    try {
      if (self->state.store->close_round(rc->expert_id))
        spdlog::info("{}: round of '{}' closed by its primary: v{}", self->state.node_id, rc->expert_id,
                     self->state.store->find(rc->expert_id)->weights.version);
    } catch (const std::exception& ex) {
      spdlog::error("{}: closing the round of '{}' failed: {}", self->state.node_id, rc->expert_id, ex.what());
    }
    return announce_versions(self);
  }
  if (std::holds_alternative<net::UpdateAck>(m.body)) return on_replica_answer(self, m, true, "");
  if (auto* rej = std::get_if<net::UpdateReject>(&m.body))
    return on_replica_answer(self, m, rej->reason == net::RejectReason::duplicate_update, rej->detail);
  if (std::holds_alternative<net::SnapshotReceipt>(m.body)) {  // a seeded replica's receipt
    self->state.seed_of.erase(m.correlation_id);
    return;
  }
  if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {  // never answer an error with an error
    if (err->code == "not_a_member" && self->state.link) self->send(self->state.link, rejoin_atom::value);
    if (auto seed = self->state.seed_of.find(m.correlation_id); seed != self->state.seed_of.end()) {
      auto [expert, shard] = seed->second;
      self->state.seed_of.erase(seed);
      reseed(self, expert, shard, err->code + ": " + err->detail);
    }
    return;
  }
  if (auto* st = std::get_if<net::StatusRequest>(&m.body))
    return reply(self, m.correlation_id, net::StatusReply{st->request_id, self->state.node_id, net::Role::shard,
                                                          status_json(self)});
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
  self->state.store = std::make_unique<ExpertStore>(std::move(options.store));
  self->state.membership = std::move(options.membership);
  self->state.membership.hello.node_id = self->state.node_id;
  self->state.membership.hello.role = net::Role::shard;
  self->state.link = spawn_coordinator_link(self, self->state.transport, self->state.membership);
  self->set_down_handler([=](const caf::down_msg& down) {
    for (auto& [expert, subs] : self->state.subscribers)
      for (auto it = subs.begin(); it != subs.end();) it = it->address() == down.source ? subs.erase(it) : std::next(it);
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
      [=](peer_atom, const std::string& shard, caf::actor handle) {
        auto& st = self->state;
        auto& known = st.peers[shard];
        const bool restarted = known && known != handle;
        known = std::move(handle);
        if (restarted)  // a restarted replica may be behind: it gets our snapshot again
          for (auto& [expert, shards] : st.seeded) st.seeds_retried += shards.erase(shard);
        seed_replicas(self);
      },
      [=](seed_timeout_atom, uint64_t corr) {
        auto& st = self->state;
        auto seed = st.seed_of.find(corr);
        if (seed == st.seed_of.end()) return;  // receipted
        auto [expert, shard] = seed->second;
        st.seed_of.erase(seed);
        reseed(self, expert, shard, "no receipt within " + std::to_string(st.replication_timeout_ms) + " ms");
      },
      [=](replication_timeout_atom, uint64_t id) {
        if (!self->state.replications.count(id)) return;
        ++self->state.replication_timeouts;
        spdlog::warn("{}: replicas did not answer a forwarded update in time; acknowledging anyway",
                     self->state.node_id);
        finish_replication(self, id);
      },
      [=](round_deadline_atom, const std::string& expert_id, uint64_t round_version) {
        const auto* e = self->state.store->find(expert_id);
        if (!e || e->weights.version != round_version || e->policy->pending().empty()) return;  // closed already
        if (!leads(self, expert_id)) return;  // a backup now: the primary's RoundClose decides
        try {
          if (self->state.store->close_round(expert_id)) {
            spdlog::info("{}: round of '{}' closed at its deadline: v{}", self->state.node_id, expert_id,
                         self->state.store->find(expert_id)->weights.version);
            // The backups hold the same buffered updates (forwarded in order, before this): they close too.
            for (const auto& shard : self->state.replicas[expert_id])
              if (shard != self->state.node_id)
                if (auto peer = self->state.peers.find(shard); peer != self->state.peers.end())
                  send_to(self, peer->second, 0, net::RoundClose{expert_id, round_version});
            announce_versions(self);
            return;
          }
        } catch (const std::exception& ex) {
          spdlog::error("{}: closing the round of '{}' failed: {}", self->state.node_id, expert_id, ex.what());
        }
        // Fewer than min_updates: wait another deadline.
        self->delayed_send(self, std::chrono::milliseconds(self->state.store->options().policy.round_deadline_ms),
                           round_deadline_atom::value, expert_id, round_version);
      },
      [=](net::WireFrame& frame) {
        dispatch(self, *self->state.transport, self->state.node_id, self->state.errors, frame,
                 [&](const net::Message& m) { on_message(self, m); });
      },
  };
}

}  // namespace fedmoe::actors
