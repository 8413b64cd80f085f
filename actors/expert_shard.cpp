#include "actors/expert_shard.hpp"

#include <cstdio>

#include <caf/actor_cast.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "net/checksum.hpp"

namespace fedmoe::actors {

namespace {

using Self = caf::stateful_actor<ExpertShardState>;
// (expert id, version the round started at): FedAvg's round deadline, sent by the shard to itself.
using round_deadline_atom = caf::atom_constant<caf::atom("rdeadline")>;

void reply(Self* self, uint64_t correlation_id, net::Body body) {
  auto to = caf::actor_cast<caf::actor>(self->current_sender());
  if (!to) return;  // an anonymous sender cannot be answered
  net::Message m;
  m.sender_id = self->state.node_id;
  m.correlation_id = correlation_id;
  m.sent_at_unix_ms = net::unix_ms_now();
  m.body = std::move(body);
  self->state.transport->send(self, to, m);
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
}

void on_pull(Self* self, const net::Message& m, const net::SnapshotRequest& req) {
  const auto* e = self->state.store->find(req.expert_id);
  if (!e) return reply_error(self, m.correlation_id, "unknown_expert", "this shard holds no expert '" + req.expert_id + "'");
  if (e->weights.version < req.min_version)
    return reply_error(self, m.correlation_id, "version_unavailable",
                       "expert '" + req.expert_id + "' is at v" + std::to_string(e->weights.version) + ", v" +
                           std::to_string(req.min_version) + " was asked for");
  ++self->state.pulls_served;
  reply(self, m.correlation_id, e->published);  // immutable per version: later updates never change these bytes
}

void on_update(Self* self, const net::Message& m, const net::UpdatePush& u) {
  ++self->state.updates_received;
  PushResult r;
  try {
    r = self->state.store->push(u);
  } catch (const std::exception& e) {  // storage trouble: say so, do not acknowledge
    return reply_error(self, m.correlation_id, "storage_error", e.what());
  }
  const auto& policy = self->state.store->options().policy;
  if (r.accepted && !r.applied && policy.name == "fedavg" && policy.round_deadline_ms > 0) {
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
  reply(self, m.correlation_id, r.ack);
}

std::string status_json(Self* self) {
  nlohmann::json j;
  j["node_id"] = self->state.node_id;
  j["role"] = "shard";
  j["experts"] = self->state.store->status();
  j["policy"] = self->state.store->options().policy.name;
  j["placement_epoch"] = self->state.placement_epoch;
  j["placed_experts"] = self->state.placed_experts;
  j["snapshots_received"] = self->state.snapshots_received;
  j["pulls_served"] = self->state.pulls_served;
  j["updates_received"] = self->state.updates_received;
  j["errors"] = self->state.errors;
  auto s = self->state.transport->stats();
  j["transport"] = {{"sent_local", s.sent_local}, {"sent_inline", s.sent_inline}, {"sent_bulk", s.sent_bulk},
                    {"received", s.received},     {"fetches", s.fetches},         {"fetch_failures", s.fetch_failures},
                    {"decode_errors", s.decode_errors}};
  return j.dump();
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
  join(self, *self->state.transport, self->state.membership);
  return {
      [=](join_atom, caf::actor coordinator, std::string endpoint) {
        self->state.membership.coordinator = std::move(coordinator);
        self->state.membership.hello.endpoint = std::move(endpoint);
        join(self, *self->state.transport, self->state.membership);
      },
      [=](heartbeat_atom) {
        send_heartbeat(self, *self->state.transport, self->state.membership,
                       static_cast<float>(self->state.store->expert_ids().size()));
      },
      [=](round_deadline_atom, const std::string& expert_id, uint64_t round_version) {
        const auto* e = self->state.store->find(expert_id);
        if (!e || e->weights.version != round_version || e->policy->pending().empty()) return;  // closed already
        try {
          if (self->state.store->close_round(expert_id)) {
            spdlog::info("{}: round of '{}' closed at its deadline: v{}", self->state.node_id, expert_id,
                         self->state.store->find(expert_id)->weights.version);
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
        auto received = self->state.transport->receive(self, frame);
        if (!received) return;  // a bulk fetch is under way; the frame comes back when it is done
        if (!*received) {
          const auto& e = received->error();
          return reply_error(self, 0, net::to_string(e.code), "rejected a message: " + e.detail);
        }
        const net::Message& m = received->value();
        if (auto* snap = std::get_if<net::ExpertSnapshot>(&m.body)) return on_snapshot(self, m, *snap);
        if (auto* pull = std::get_if<net::SnapshotRequest>(&m.body)) return on_pull(self, m, *pull);
        if (auto* push = std::get_if<net::UpdatePush>(&m.body)) return on_update(self, m, *push);
        if (auto* map = std::get_if<net::PlacementMap>(&m.body)) {
          if (map->epoch < self->state.placement_epoch) return;  // an older map overtaken by a newer one
          self->state.placement_epoch = map->epoch;
          self->state.placed_experts.clear();
          for (const auto& p : map->placements)
            for (const auto& r : p.replicas)
              if (r.shard_id == self->state.node_id) self->state.placed_experts.push_back(p.expert_id);
          return;
        }
        if (std::holds_alternative<net::HelloAck>(m.body)) return;
        if (auto* err = std::get_if<net::ErrorReply>(&m.body)) {  // never answer an error with an error
          if (err->code == "not_a_member") join(self, *self->state.transport, self->state.membership);
          return;
        }
        if (auto* st = std::get_if<net::StatusRequest>(&m.body))
          return reply(self, m.correlation_id, net::StatusReply{st->request_id, self->state.node_id, net::Role::shard,
                                                                status_json(self)});
        reply_error(self, m.correlation_id, "unsupported",
                    std::string("an expert shard does not handle ") + net::body_name(m.body) + " messages");
      },
  };
}

}  // namespace fedmoe::actors
