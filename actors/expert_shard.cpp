#include "actors/expert_shard.hpp"

#include <cstdio>

#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "net/checksum.hpp"

namespace fedmoe::actors {

namespace {

using Self = caf::stateful_actor<ExpertShardState>;

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
  StoredExpert stored;
  stored.snapshot = snap;
  stored.checksum = net::checksum(snap.tensors);
  for (const auto& t : snap.tensors) stored.byte_count += t.size_bytes;
  net::SnapshotReceipt receipt{snap.spec.expert_id, snap.version, static_cast<uint32_t>(snap.tensors.size()),
                               stored.byte_count, stored.checksum};
  auto& slot = self->state.experts[snap.spec.expert_id];
  if (slot.snapshot.spec.expert_id.empty() || snap.version >= slot.snapshot.version) slot = std::move(stored);
  ++self->state.snapshots_received;
  spdlog::info("{}: stored expert '{}' v{} ({} tensors, {} bytes) from {}", self->state.node_id,
               snap.spec.expert_id, snap.version, receipt.tensor_count, receipt.byte_count, m.sender_id);
  reply(self, m.correlation_id, receipt);
}

void on_pull(Self* self, const net::Message& m, const net::SnapshotRequest& req) {
  auto it = self->state.experts.find(req.expert_id);
  if (it == self->state.experts.end())
    return reply_error(self, m.correlation_id, "unknown_expert", "this shard holds no expert '" + req.expert_id + "'");
  if (it->second.snapshot.version < req.min_version)
    return reply_error(self, m.correlation_id, "version_unavailable",
                       "expert '" + req.expert_id + "' is at v" + std::to_string(it->second.snapshot.version) +
                           ", v" + std::to_string(req.min_version) + " was asked for");
  ++self->state.pulls_served;
  reply(self, m.correlation_id, it->second.snapshot);  // tensors still reference the stored buffer: no copy
}

std::string hex16(uint64_t v) {  // as `fedmoe-node push` prints checksums
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string status_json(Self* self) {
  nlohmann::json j;
  j["node_id"] = self->state.node_id;
  j["role"] = "shard";
  auto& experts = j["experts"] = nlohmann::json::array();
  for (const auto& [id, e] : self->state.experts)
    experts.push_back({{"expert_id", id},
                       {"version", e.snapshot.version},
                       {"tensors", e.snapshot.tensors.size()},
                       {"bytes", e.byte_count},
                       {"checksum", hex16(e.checksum)}});
  j["snapshots_received"] = self->state.snapshots_received;
  j["pulls_served"] = self->state.pulls_served;
  j["errors"] = self->state.errors;
  auto s = self->state.transport->stats();
  j["transport"] = {{"sent_local", s.sent_local}, {"sent_inline", s.sent_inline}, {"sent_bulk", s.sent_bulk},
                    {"received", s.received},     {"fetches", s.fetches},         {"fetch_failures", s.fetch_failures},
                    {"decode_errors", s.decode_errors}};
  return j.dump();
}

}  // namespace

caf::behavior expert_shard(Self* self, std::string node_id, std::shared_ptr<net::Transport> transport) {
  self->state.node_id = std::move(node_id);
  self->state.transport = std::move(transport);
  return {
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
        if (auto* st = std::get_if<net::StatusRequest>(&m.body))
          return reply(self, m.correlation_id, net::StatusReply{st->request_id, self->state.node_id, net::Role::shard,
                                                                status_json(self)});
        reply_error(self, m.correlation_id, "unsupported",
                    std::string("an expert shard does not handle ") + net::body_name(m.body) + " messages");
      },
  };
}

}  // namespace fedmoe::actors
