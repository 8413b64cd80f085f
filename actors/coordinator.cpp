#include "actors/coordinator.hpp"

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include <caf/actor_cast.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>
#include <spdlog/spdlog.h>

#include "actors/dispatch.hpp"
#include "actors/membership.hpp"
#include "model/atomic_file.hpp"

namespace fedmoe::actors {

namespace {

namespace fs = std::filesystem;
using Self = caf::stateful_actor<CoordinatorState>;
using lease_tick_atom = caf::atom_constant<caf::atom("leasetick")>;
using status_timeout_atom = caf::atom_constant<caf::atom("stimeout")>;

void send_to(Self* self, const caf::actor& to, uint64_t correlation_id, net::Body body) {
  self->state.transport->send(self, to, self->state.options.node_id, correlation_id, std::move(body));
}

void reply(Self* self, uint64_t correlation_id, net::Body body) {
  send_to(self, caf::actor_cast<caf::actor>(self->current_sender()), correlation_id, std::move(body));
}

// Saves the registry (experts, placement, assignments, epoch) durably before anyone hears of a change:
// a restarted coordinator must never hand out an epoch it already used.
void persist(Self* self) {
  const auto& dir = self->state.options.state_dir;
  if (dir.empty()) return;
  try {
    fs::create_directories(dir);
    model::write_file_atomically(fs::path(dir) / "coordinator.json", self->state.registry->to_json().dump(2) + "\n");
  } catch (const std::exception& e) {
    ++self->state.errors["persist"];
    spdlog::error("{}: cannot save its state: {}", self->state.options.node_id, e.what());
  }
}

// Tells member `id` how to reach every other live shard: shards replicate to each other, routers
// and workers pull experts from them.
void send_peers(Self* self, const std::string& id) {
  auto to = self->state.handles.find(id);
  if (to == self->state.handles.end()) return;
  for (const auto& [peer, pm] : self->state.registry->members())
    if (peer != id && pm.alive && pm.role == net::Role::shard)
      if (auto h = self->state.handles.find(peer); h != self->state.handles.end())
        self->send(to->second, peer_atom::value, peer, h->second, pm.endpoint);
}

void share_peers(Self* self) {
  for (const auto& [id, m] : self->state.registry->members())
    if (m.alive && m.role != net::Role::coordinator) send_peers(self, id);
}

// Sends the placement map to every live member this coordinator can reach.
void broadcast(Self* self) {
  auto map = self->state.registry->placement();
  for (const auto& [id, m] : self->state.registry->members())
    if (m.alive)
      if (auto h = self->state.handles.find(id); h != self->state.handles.end()) send_to(self, h->second, 0, map);
  share_peers(self);
  spdlog::info("{}: placement epoch {} sent", self->state.options.node_id, map.epoch);
}

void changed(Self* self, bool placement_changed) {
  persist(self);
  if (placement_changed) broadcast(self);
}

void remember_sender(Self* self, const std::string& node_id) {
  if (auto h = caf::actor_cast<caf::actor>(self->current_sender())) self->state.handles[node_id] = h;
}

void finish_gathering(Self* self, uint64_t gid) {
  auto it = self->state.gatherings.find(gid);
  if (it == self->state.gatherings.end()) return;
  auto& g = it->second;
  auto j = self->state.registry->to_json();
  j["node_id"] = self->state.options.node_id;
  j["role"] = "coordinator";
  j["placement_map"] = nlohmann::json::array();
  for (const auto& p : self->state.registry->placement().placements) {
    nlohmann::json replicas = nlohmann::json::array();
    for (const auto& r : p.replicas) replicas.push_back({{"shard", r.shard_id}, {"alive", r.alive}});
    j["placement_map"].push_back({{"expert_id", p.expert_id},
                                  {"replicas", replicas},
                                  {"term", p.term},
                                  {"in_sync", p.in_sync},
                                  {"min_in_sync", p.min_in_sync}});
  }
  // Expert versions and checksums as the shards report them. Two replicas with the same version and
  // different bytes have diverged: listed under "divergent" (an error the test suite looks for).
  nlohmann::json versions = nlohmann::json::object(), checksums = nlohmann::json::object();
  nlohmann::json divergent = nlohmann::json::array();
  std::map<std::string, std::map<uint64_t, std::string>> first_seen;  // expert -> version -> checksum
  for (const auto& [shard, s] : g.shards.items())
    for (const auto& e : s.value("experts", nlohmann::json::array())) {
      const auto expert = e.value("expert_id", "?");
      const uint64_t version = e.value("version", uint64_t{0});
      const auto checksum = e.value("checksum", "");
      versions[expert][shard] = version;
      checksums[expert][shard] = checksum;
      auto [known, fresh] = first_seen[expert].emplace(version, checksum);
      if (!fresh && known->second != checksum)
        divergent.push_back({{"expert_id", expert}, {"version", version}, {"shard", shard}});
    }
  j["expert_versions"] = versions;
  j["expert_checksums"] = checksums;
  j["divergent"] = divergent;
  j["shards"] = g.shards;
  j["workers"] = g.workers;
  j["routers"] = g.routers;
  nlohmann::json unanswered = nlohmann::json::array();
  for (const auto& [corr, member] : g.waiting) {
    unanswered.push_back(member);
    self->state.gathering_of.erase(corr);
  }
  j["unanswered"] = unanswered;
  j["errors"] = self->state.errors;
  send_to(self, g.client, g.correlation_id,
          net::StatusReply{g.request_id, self->state.options.node_id, net::Role::coordinator, json_text(j)});
  self->state.gatherings.erase(it);
}

void on_status(Self* self, const net::Message& m, const net::StatusRequest& req) {
  auto& st = self->state;
  const uint64_t gid = st.next_correlation++;
  StatusGathering g;
  g.client = caf::actor_cast<caf::actor>(self->current_sender());
  g.correlation_id = m.correlation_id;
  g.request_id = req.request_id;
  for (const auto& [id, member] : st.registry->members()) {
    if (!member.alive || member.role == net::Role::coordinator) continue;
    auto h = st.handles.find(id);
    if (h == st.handles.end()) continue;
    const uint64_t corr = st.next_correlation++;
    g.waiting[corr] = id;
    st.gathering_of[corr] = gid;
    send_to(self, h->second, corr, net::StatusRequest{req.request_id, false});
  }
  const bool nothing_to_wait_for = g.waiting.empty();
  st.gatherings[gid] = std::move(g);
  if (nothing_to_wait_for) return finish_gathering(self, gid);
  self->delayed_send(self, std::chrono::milliseconds(st.options.status_timeout_ms), status_timeout_atom::value, gid);
}

void on_status_reply(Self* self, const net::Message& m, const net::StatusReply& r) {
  auto& st = self->state;
  auto it = st.gathering_of.find(m.correlation_id);
  if (it == st.gathering_of.end()) return;  // late: that status was already answered
  const uint64_t gid = it->second;
  st.gathering_of.erase(it);
  auto& g = st.gatherings.at(gid);
  const auto member = g.waiting[m.correlation_id];
  g.waiting.erase(m.correlation_id);
  nlohmann::json doc = nlohmann::json::parse(r.json, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) doc = {{"error", "unparsable status"}};
  (r.role == net::Role::shard ? g.shards : r.role == net::Role::router ? g.routers : g.workers)[member] = doc;
  if (g.waiting.empty()) finish_gathering(self, gid);
}

// Every message a member or a client sends to the coordinator.
void on_message(Self* self, const net::Message& m) {
  auto& st = self->state;
  if (auto* h = std::get_if<net::Hello>(&m.body)) {
    remember_sender(self, h->node_id);
    const bool moved = st.registry->join(*h, net::steady_ms_now());
    spdlog::info("{}: '{}' joined as {}", st.options.node_id, h->node_id, net::to_string(h->role));
    reply(self, m.correlation_id, net::HelloAck{true, st.options.registry.lease_ms, "", st.options.node_id});
    changed(self, moved);
    if (!moved) {  // the newcomer needs the map (and a router the shards) anyway
      if (h->role == net::Role::shard) share_peers(self);  // a restarted shard has a new handle
      if (h->role == net::Role::router || h->role == net::Role::worker) send_peers(self, h->node_id);
      reply(self, 0, st.registry->placement());
    }
    return;
  }
  if (auto* hb = std::get_if<net::Heartbeat>(&m.body)) {
    if (!st.registry->is_member(hb->node_id)) {  // e.g. expired and forgotten: ask it to join again
      return reply(self, m.correlation_id, net::ErrorReply{"not_a_member", "send hello first"});
    }
    remember_sender(self, hb->node_id);
    if (st.registry->heartbeat(*hb, net::steady_ms_now())) changed(self, true);
    // The answer renews the member's lease: a primary that hears nothing for half a lease stops
    // acknowledging (it may have been replaced on the other side of a partition).
    return reply(self, m.correlation_id, net::HelloAck{true, st.options.registry.lease_ms, "", st.options.node_id});
  }
  if (auto* isr = std::get_if<net::IsrChange>(&m.body)) {
    auto why = st.registry->isr_change(m.sender_id, *isr);
    if (!why.empty()) {
      ++st.errors["isr_change_refused"];
      spdlog::warn("{}: in-sync change of '{}' from {} refused: {}", st.options.node_id, isr->expert_id, m.sender_id, why);
      return reply(self, m.correlation_id, net::ErrorReply{"isr_change_refused", why});
    }
    spdlog::info("{}: in-sync set of '{}' is now [{}] ({})", st.options.node_id, isr->expert_id,
                 [&] { std::string out; for (const auto& s : isr->in_sync) out += (out.empty() ? "" : ", ") + s; return out; }(),
                 isr->reason);
    changed(self, true);  // durable before anyone hears of it; broadcast includes the sender
    return;
  }
  if (auto* leave = std::get_if<net::Leave>(&m.body)) {
    st.handles.erase(leave->node_id);
    spdlog::info("{}: '{}' left ({})", st.options.node_id, leave->node_id, leave->reason);
    return changed(self, st.registry->leave(leave->node_id));
  }
  if (auto* spec = std::get_if<net::ExpertSpec>(&m.body)) {
    const bool moved = spec->removed ? st.registry->remove_expert(spec->expert_id) : st.registry->add_expert(*spec);
    spdlog::info("{}: expert '{}' {}", st.options.node_id, spec->expert_id, spec->removed ? "removed" : "registered");
    changed(self, moved);
    return reply(self, m.correlation_id, st.registry->placement());
  }
  if (auto* req = std::get_if<net::StatusRequest>(&m.body)) return on_status(self, m, *req);
  if (auto* r = std::get_if<net::StatusReply>(&m.body)) return on_status_reply(self, m, *r);
  if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {  // never answer an error with an error
    ++st.errors["peer_error:" + err->code];
    return;
  }
  ++st.errors["unsupported"];
  reply(self, m.correlation_id,
        net::ErrorReply{"unsupported", std::string("a coordinator does not handle ") + net::body_name(m.body) +
                                           " messages"});
}

}  // namespace

caf::behavior coordinator(Self* self, std::shared_ptr<net::Transport> transport, CoordinatorOptions options) {
  auto& st = self->state;
  st.transport = std::move(transport);
  st.options = std::move(options);
  st.registry = std::make_unique<Registry>(st.options.registry);
  if (!st.options.state_dir.empty()) {
    auto path = fs::path(st.options.state_dir) / "coordinator.json";
    if (fs::exists(path)) {
      std::ifstream in(path);
      auto j = nlohmann::json::parse(in, nullptr, false);
      if (j.is_discarded()) throw std::runtime_error(path.string() + ": not valid JSON");
      st.registry = std::make_unique<Registry>(Registry::from_json(j, st.options.registry, net::steady_ms_now()));
      // A new epoch for a new incarnation: members accept maps only from epochs at least as new as
      // the last they saw, and this coordinator may have sent one more than it saved before dying.
      st.registry->advance_epoch();
      persist(self);
      spdlog::info("{}: resumed from {}: {} experts, {} members, epoch {}", st.options.node_id, path.string(),
                   st.registry->experts().size(), st.registry->members().size(), st.registry->epoch());
    }
  }
  self->delayed_send(self, std::chrono::milliseconds(std::max<uint64_t>(st.options.registry.lease_ms / 4, 10)),
                     lease_tick_atom::value);
  return {
      [=](lease_tick_atom) {
        std::vector<std::string> died;
        if (self->state.registry->expire(net::steady_ms_now(), &died)) {
          for (const auto& id : died) spdlog::warn("{}: '{}' missed its lease", self->state.options.node_id, id);
          changed(self, true);
        } else if (!died.empty()) {
          persist(self);
        }
        self->delayed_send(self, std::chrono::milliseconds(std::max<uint64_t>(self->state.options.registry.lease_ms / 4, 10)),
                           lease_tick_atom::value);
      },
      [=](status_timeout_atom, uint64_t gid) { finish_gathering(self, gid); },
      [=](net::WireFrame& frame) {
        dispatch(self, *self->state.transport, self->state.options.node_id, self->state.errors, frame,
                 [&](const net::Message& m) { on_message(self, m); });
      },
  };
}

}  // namespace fedmoe::actors
