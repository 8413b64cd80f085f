#include "actors/worker.hpp"

#include <chrono>
#include <cmath>
#include <thread>

#include <caf/actor_cast.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "actors/dispatch.hpp"
#include "actors/tensor_bridge.hpp"
#include "model/errors.hpp"
#include "net/random_id.hpp"

namespace fedmoe::actors {

namespace {

using Self = caf::stateful_actor<WorkerState>;
using pull_atom = caf::atom_constant<caf::atom("pull")>;
using reply_timeout_atom = caf::atom_constant<caf::atom("rtimeout")>;
using push_again_atom = caf::atom_constant<caf::atom("pushagain")>;

// Simulated network latency: this actor runs detached, so sleeping only delays this worker.
void network_delay(Self* self) {
  const auto& o = self->state.options;
  if (o.latency_ms == 0 && o.jitter_ms == 0) return;
  std::uniform_int_distribution<int64_t> jitter(-int64_t(o.jitter_ms), int64_t(o.jitter_ms));
  int64_t ms = std::max<int64_t>(0, int64_t(o.latency_ms) + jitter(self->state.rng));
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

// Sends `body` to the current replica and arms the reply timeout.
void request(Self* self, net::Body body) {
  auto& st = self->state;
  if (st.options.replicas.empty()) {  // nowhere to go yet: the next placement map restarts the round
    st.stalled = true;
    return;
  }
  network_delay(self);
  st.awaiting = st.next_correlation++;
  st.awaiting_from = st.options.replicas[st.replica];
  st.transport->send(self, st.awaiting_from, st.options.worker_id, st.awaiting, std::move(body));
  self->delayed_send(self, std::chrono::milliseconds(st.options.reply_timeout_ms), reply_timeout_atom::value,
                     st.awaiting);
}

void pull(Self* self) {
  auto& st = self->state;
  if (st.finished) return;
  if (st.options.stop && st.options.stop->load()) {
    st.finished = true;
    spdlog::info("{}: stopped after {} rounds ({} accepted)", st.options.worker_id, st.rounds_done, st.accepted);
    return;
  }
  const uint64_t min_version =
      st.options.sync_rounds && !st.history.empty() ? st.history.back().base_version + 1 : 0;
  request(self, net::SnapshotRequest{st.options.expert_id, min_version});
}

void failover(Self* self, const std::string& why) {
  auto& st = self->state;
  ++st.failovers;
  const size_t from = st.replica;
  st.replica = (st.replica + 1) % std::max<size_t>(st.options.replicas.size(), 1);
  spdlog::warn("{}: replica {} of '{}' {}; trying replica {}", st.options.worker_id, from, st.options.expert_id, why,
               st.replica);
  st.awaiting = 0;
  self->delayed_send(self, std::chrono::milliseconds(st.options.retry_ms), pull_atom::value);
}

// Adopts the latest map's replicas of our expert, as far as their handles are known.
void follow_placement(Self* self) {
  auto& st = self->state;
  std::vector<std::string> ids;
  std::vector<caf::actor> handles;
  for (const auto& id : st.placed)
    if (auto p = st.peers.find(id); p != st.peers.end()) {
      ids.push_back(id);
      handles.push_back(p->second);
    }
  if (handles.empty()) return;
  if (ids == st.replica_ids) {
    // The same replicas, one with a new handle (restarted, or reached over a connection of its own):
    // later requests go there; one in flight keeps waiting (its answer is matched by correlation).
    st.options.replicas = std::move(handles);
    return;
  }
  std::string list;
  for (const auto& id : ids) list += (list.empty() ? "" : ", ") + id;
  spdlog::info("{}: replicas of '{}' are now {}", st.options.worker_id, st.options.expert_id, list);
  st.replica_ids = std::move(ids);
  st.options.replicas = std::move(handles);
  // The primary first: it replicates what it accepts. A request in flight to a replica still in the
  // list goes on; one to a replica that left is given up (its round starts again from a pull).
  auto in_flight = std::find(st.options.replicas.begin(), st.options.replicas.end(), st.awaiting_from);
  if (st.awaiting != 0 && in_flight != st.options.replicas.end()) {
    st.replica = static_cast<size_t>(in_flight - st.options.replicas.begin());
    return;
  }
  st.replica = 0;
  if (st.awaiting != 0 && !st.finished) {
    st.awaiting = 0;
    self->delayed_send(self, std::chrono::milliseconds(st.options.retry_ms), pull_atom::value);
    return;
  }
  if (st.stalled && !st.finished) {
    st.stalled = false;
    pull(self);
  }
}

// The fleet is being stopped (WorkerOptions::stop) while a round trains or waits out its device
// delay: that round pushes nothing.
void stopped_mid_round(Self* self, uint64_t round) {
  auto& st = self->state;
  st.finished = true;
  spdlog::info("{}: stopped during round {} ({} accepted)", st.options.worker_id, round, st.accepted);
}

void on_snapshot(Self* self, const net::Message& m, const net::ExpertSnapshot& snap) {
  auto& st = self->state;
  st.awaiting = 0;
  std::map<std::string, torch::Tensor> adapter;
  for (const auto& t : snap.tensors) adapter.emplace(t.name, from_wire(t));
  WorkerRoundRecord rec;
  rec.round = st.rounds_done + 1;
  rec.base_version = snap.version;
  rec.replica = m.sender_id;
  rec.wait_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - st.idle_since).count();
  model::LocalRound r;
  const auto train_start = std::chrono::steady_clock::now();
  try {
    r = st.options.trainer->train(lora_spec_of(snap.spec), adapter);
  } catch (const model::TrainingCancelled&) {
    return stopped_mid_round(self, rec.round);
  } catch (const std::exception& e) {
    // An expert this worker's base cannot train (shapes, targets): nothing to push; say so and stop.
    spdlog::error("{}: cannot train expert '{}' v{}: {}", st.options.worker_id, snap.spec.expert_id, snap.version,
                  model::describe(e));
    st.finished = true;
    return;
  }
  rec.train_loss = r.train_loss;
  rec.val_loss_before = r.val_loss_before;
  rec.val_loss_after = r.val_loss_after;
  rec.compute_seconds = r.compute_seconds;
  // Behave like a device F times slower than this machine: the round ends F x compute_seconds after
  // it started. Time the trainer spent waiting for a compute slot (model::ComputeSlots) counts
  // toward that, so an emulated device that shares cores with others is no slower than its factor
  // says as long as its slack covers the wait.
  const double train_wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - train_start).count();
  rec.slot_wait_seconds = std::max(0.0, train_wall - r.compute_seconds);
  if (st.options.speed_factor > 1.0 && st.options.speed_factor * r.compute_seconds > train_wall) {
    rec.delay_seconds = st.options.speed_factor * r.compute_seconds - train_wall;
    // In slices, so that a stop reaches a slow device mid-round as it reaches the trainer mid-round.
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                           std::chrono::duration<double>(rec.delay_seconds));
    while (std::chrono::steady_clock::now() < until) {
      if (st.options.stop && st.options.stop->load()) return stopped_mid_round(self, rec.round);
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(until - std::chrono::steady_clock::now(),
                                                                                std::chrono::milliseconds(50)));
    }
  }
  net::UpdatePush u;
  u.expert_id = snap.spec.expert_id;
  u.worker_id = st.options.worker_id;
  // 128 random bits: a restarted worker (same --seed, same id) never repeats an earlier id.
  u.update_id = st.options.worker_id + "-r" + std::to_string(rec.round) + "-" + net::random_id_128();
  u.base_version = snap.version;
  u.sample_count = r.samples;
  u.train_loss = static_cast<float>(r.train_loss);
  u.local_steps = static_cast<uint32_t>(r.steps);
  u.compute_seconds = r.compute_seconds * std::max(1.0, st.options.speed_factor);
  for (auto& [name, d] : r.delta) u.deltas.push_back(to_wire(name, d));
  st.current = rec;
  st.push = u;  // kept until its verdict: pushed again when the shard cannot take it yet
  st.push_retries = 0;
  request(self, std::move(u));
}

// The shard could not take the update now (too few in-sync replicas, a storage error): nothing was
// applied, so the same update (same id) goes again after a backoff that doubles up to 5 s.
void retry_push(Self* self, const net::UpdateReject& rej) {
  auto& st = self->state;
  st.awaiting = 0;
  ++st.push_retries;
  ++st.retried[net::to_string(rej.reason)];
  const uint64_t backoff = std::min<uint64_t>(5000, st.options.retry_ms << std::min<uint64_t>(st.push_retries, 5));
  spdlog::warn("{}: update '{}' of '{}' not taken ({}: {}); pushing it again in {} ms", st.options.worker_id,
               rej.update_id, rej.expert_id, net::to_string(rej.reason), rej.detail, backoff);
  self->delayed_send(self, std::chrono::milliseconds(backoff), push_again_atom::value);
}

// The coordinator link's figures: requests in flight, and samples per second of the last round (the
// measured speed the coordinator sees).
void report_figures(Self* self) {
  auto& st = self->state;
  if (!st.link) return;
  double speed = 0;
  if (!st.history.empty()) {
    const auto& last = st.history.back();
    const double seconds = last.compute_seconds + last.slot_wait_seconds + last.delay_seconds;
    if (last.compute_seconds > 0) speed = 1.0 / seconds;
  }
  self->send(st.link, load_atom::value, st.awaiting != 0 ? 1.0f : 0.0f, speed);
}

void finish_round(Self* self, WorkerRoundRecord rec) {
  auto& st = self->state;
  st.awaiting = 0;
  ++st.rounds_done;
  rec.finished_unix_ms = net::unix_ms_now();
  st.idle_since = std::chrono::steady_clock::now();
  st.history.push_back(std::move(rec));
  if (st.history.size() > 1000) st.history.erase(st.history.begin());
  report_figures(self);
  if (st.options.rounds > 0 && st.rounds_done >= st.options.rounds) {
    st.finished = true;
    spdlog::info("{}: done after {} rounds ({} accepted)", st.options.worker_id, st.rounds_done, st.accepted);
    return;
  }
  pull(self);
}

std::string status_json(Self* self) {
  const auto& st = self->state;
  nlohmann::json rounds = nlohmann::json::array();
  uint64_t staleness_sum = 0, staleness_max = 0;
  for (const auto& r : st.history) {
    staleness_sum += r.staleness;
    staleness_max = std::max(staleness_max, r.staleness);
  }
  for (size_t i = st.history.size() > 20 ? st.history.size() - 20 : 0; i < st.history.size(); ++i) {
    const auto& r = st.history[i];
    rounds.push_back({{"round", r.round},           {"base_version", r.base_version}, {"verdict", r.verdict},
                      {"new_version", r.new_version}, {"staleness", r.staleness},     {"weight", r.weight},
                      {"train_loss", r.train_loss},   {"val_loss_before", r.val_loss_before},
                      {"val_loss_after", r.val_loss_after}, {"compute_seconds", r.compute_seconds},
                      {"delay_seconds", r.delay_seconds}, {"slot_wait_seconds", r.slot_wait_seconds},
                      {"wait_seconds", r.wait_seconds}, {"replica", r.replica},
                      {"finished_unix_ms", r.finished_unix_ms}});
  }
  nlohmann::json j = {{"node_id", st.options.worker_id},
                      {"role", "worker"},
                      {"expert", st.options.expert_id},
                      {"rounds_done", st.rounds_done},
                      {"accepted", st.accepted},
                      {"rejected", st.rejected},
                      {"failovers", st.failovers},
                      {"replica", st.replica},
                      {"finished", st.finished},
                      {"speed_factor", st.options.speed_factor},
                      {"latency_ms", st.options.latency_ms},
                      {"mean_staleness", st.history.empty() ? 0.0 : double(staleness_sum) / double(st.history.size())},
                      {"max_staleness", staleness_max},
                      {"placement_epoch", st.placement_epoch},
                      {"replicas", st.replica_ids},
                      {"assigned_expert", st.assigned_expert},
                      {"errors", st.errors},
                      {"pushes_retried", st.retried},
                      {"rounds", rounds}};
  return json_text(j);
}

void reply_status(Self* self, const net::Message& m, const net::StatusRequest& req) {
  self->state.transport->send(
      self, caf::actor_cast<caf::actor>(self->current_sender()), self->state.options.worker_id, m.correlation_id,
      net::StatusReply{req.request_id, self->state.options.worker_id, net::Role::worker, status_json(self)});
}

// Every message a shard or the coordinator sends to the worker.
void on_message(Self* self, const net::Message& m) {
  auto& st = self->state;
  if (auto* req = std::get_if<net::StatusRequest>(&m.body)) return reply_status(self, m, *req);
  if (auto* map = std::get_if<net::PlacementMap>(&m.body)) {
    if (map->epoch < st.placement_epoch) return;
    st.placement_epoch = map->epoch;
    for (const auto& a : map->assignments)
      if (a.worker_id == st.options.worker_id) st.assigned_expert = a.expert_id;
    st.placed.clear();
    for (const auto& p : map->placements)
      if (p.expert_id == st.options.expert_id)
        for (const auto& r : p.replicas)
          if (r.alive) st.placed.push_back(r.shard_id);
    return follow_placement(self);
  }
  if (std::holds_alternative<net::HelloAck>(m.body)) return;
  if (auto* err = std::get_if<net::ErrorReply>(&m.body); err && err->code == "not_a_member") {
    if (st.link) self->send(st.link, rejoin_atom::value);
    return;
  }
  if (m.correlation_id != st.awaiting || st.awaiting == 0) return;  // late: its request was given up
  if (auto* snap = std::get_if<net::ExpertSnapshot>(&m.body)) return on_snapshot(self, m, *snap);
  if (auto* ack = std::get_if<net::UpdateAck>(&m.body)) {
    auto rec = st.current;
    rec.verdict = "accepted";
    rec.new_version = ack->new_version;
    rec.staleness = ack->staleness;
    rec.weight = ack->weight;
    ++st.accepted;
    spdlog::info("{}: update '{}' of '{}' acknowledged at v{}", st.options.worker_id, ack->update_id, ack->expert_id,
                 ack->new_version);
    return finish_round(self, rec);
  }
  if (auto* rej = std::get_if<net::UpdateReject>(&m.body)) {
    // Not the primary (it says which): no verdict on the update, push it where it belongs.
    if (rej->reason == net::RejectReason::not_replica) return failover(self, "is not the primary: " + rej->detail);
    if (rej->reason == net::RejectReason::not_enough_replicas || rej->reason == net::RejectReason::storage_error)
      return retry_push(self, *rej);
    // Our own update id (random per update): a push repeated after a lost answer or a failover found
    // it held and committed already. It was applied once; that is an acknowledgement.
    if (rej->reason == net::RejectReason::duplicate_update) {
      auto rec = st.current;
      rec.verdict = "accepted";
      rec.new_version = rej->current_version;
      ++st.accepted;
      spdlog::info("{}: update '{}' of '{}' was held already: acknowledged", st.options.worker_id, rej->update_id,
                   rej->expert_id);
      return finish_round(self, rec);
    }
    auto rec = st.current;
    rec.verdict = net::to_string(rej->reason);
    rec.new_version = rej->current_version;
    ++st.rejected[rec.verdict];
    spdlog::info("{}: update of '{}' rejected: {} ({})", st.options.worker_id, rej->expert_id, rec.verdict,
                 rej->detail);
    return finish_round(self, rec);
  }
  if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {
    if (st.options.sync_rounds && err->code == "version_unavailable") {
      // The shard's round is still open: ask again shortly (not the replica's fault).
      st.awaiting = 0;
      self->delayed_send(self, std::chrono::milliseconds(st.options.sync_poll_ms), pull_atom::value);
      return;
    }
    return failover(self, "answered " + err->code + ": " + err->detail);
  }
}

}  // namespace

model::LoraSpec lora_spec_of(const net::ExpertSpec& spec) {
  model::LoraSpec s;
  s.rank = spec.lora_rank;
  s.alpha = spec.lora_alpha;
  s.dropout = spec.lora_dropout;
  s.target_modules = spec.target_modules;
  s.use_rslora = spec.use_rslora;
  return s;
}

caf::behavior worker(Self* self, std::shared_ptr<net::Transport> transport, WorkerOptions options) {
  self->state.transport = std::move(transport);
  self->state.options = std::move(options);
  self->state.rng.seed(self->state.options.seed ^ std::hash<std::string>{}(self->state.options.worker_id));
  auto& mem = self->state.options.membership;
  mem.hello.node_id = self->state.options.worker_id;
  mem.hello.role = net::Role::worker;
  mem.hello.expert = self->state.options.expert_id;
  mem.hello.declared_speed = 1.0 / std::max(self->state.options.speed_factor, 1e-9);
  self->state.link = spawn_coordinator_link(self, self->state.transport, mem);
  self->send(self, pull_atom::value);
  self->set_down_handler([=](const caf::down_msg& down) {
    peer_down(self, self->state.peers, self->state.peer_endpoint, down.source);  // connected again
  });
  return {
      [=](pull_atom) { pull(self); },
      [=](push_again_atom) {
        auto& st = self->state;
        if (st.finished || st.awaiting != 0) return;
        if (st.options.stop && st.options.stop->load()) return stopped_mid_round(self, st.current.round);
        request(self, st.push);
      },
      [=](peer_atom, const std::string& shard, caf::actor handle) {
        self->state.peers[shard] = std::move(handle);
        follow_placement(self);
      },
      [=](peer_atom, const std::string& shard, caf::actor handle, const std::string& endpoint) {
        // A shard published at an endpoint is reached over a connection of the worker's own.
        auto& st = self->state;
        if (endpoint.empty() || !st.peers[shard]) {  // (until its own connection is up: the same actor)
          st.peers[shard] = handle;
          follow_placement(self);
          if (endpoint.empty()) return;
        }
        auto known = st.peer_endpoint.find(shard);
        if (known == st.peer_endpoint.end() || known->second != endpoint || !st.peers[shard])
          connect_peer(self, &st.peer_endpoint, shard, endpoint);
      },
      [=](direct_peer_atom, const std::string& shard, caf::actor handle) {
        self->state.peers[shard] = std::move(handle);
        follow_placement(self);
      },
      [=](reconnect_peer_atom, const std::string& shard) {
        auto it = self->state.peer_endpoint.find(shard);
        if (it != self->state.peer_endpoint.end()) connect_peer(self, &self->state.peer_endpoint, shard, it->second);
      },
      [=](coordinator_atom, caf::actor coordinator) {
        self->state.options.membership.coordinator = std::move(coordinator);
      },
      [=](reply_timeout_atom, uint64_t correlation) {
        if (self->state.awaiting == correlation && !self->state.finished)
          failover(self, "did not answer within " + std::to_string(self->state.options.reply_timeout_ms) + " ms");
      },
      [=](net::WireFrame& frame) {
        dispatch(self, *self->state.transport, self->state.options.worker_id, self->state.errors, frame,
                 [&](const net::Message& m) { on_message(self, m); });
      },
  };
}

}  // namespace fedmoe::actors
