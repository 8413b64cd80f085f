#include "runtime/snapshot_client.hpp"

#include <atomic>

#include <caf/scoped_actor.hpp>

#include "net/checksum.hpp"

namespace fedmoe::runtime {

namespace {

using Clock = std::chrono::steady_clock;

uint64_t next_correlation_id() {
  static std::atomic<uint64_t> next{1};
  return next++;
}

// Sends `body` and waits for the reply carrying the same correlation id.
std::optional<net::Message> call(NodeSystem& node, const caf::actor& target, net::Body body,
                                 std::chrono::milliseconds timeout, std::string* error) {
  caf::scoped_actor self{node.system()};
  net::Message m;
  m.sender_id = "client";
  m.correlation_id = next_correlation_id();
  m.sent_at_unix_ms = net::unix_ms_now();
  m.body = std::move(body);
  node.transport()->send(caf::actor{self}, target, m);
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    auto r = node.transport()->await(self, std::max(left, std::chrono::milliseconds(0)));
    if (!r) {
      *error = "no reply within " + std::to_string(timeout.count()) + " ms";
      return std::nullopt;
    }
    if (!*r) {
      *error = "bad reply: " + r->error().message();
      return std::nullopt;
    }
    if (r->value().correlation_id != m.correlation_id) continue;  // a late reply to an earlier call
    if (auto* e = std::get_if<net::ErrorReply>(&r->value().body)) {
      *error = "peer answered " + e->code + ": " + e->detail;
      return std::nullopt;
    }
    return std::move(r->value());
  }
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

PushResult push_snapshot(NodeSystem& node, const caf::actor& shard, const net::ExpertSnapshot& snapshot,
                         std::chrono::milliseconds timeout) {
  PushResult out;
  out.local_checksum = net::checksum(snapshot.tensors);
  auto t0 = Clock::now();
  auto reply = call(node, shard, snapshot, timeout, &out.error);
  out.seconds = seconds_since(t0);
  if (!reply) return out;
  auto* receipt = std::get_if<net::SnapshotReceipt>(&reply->body);
  if (!receipt) {
    out.error = std::string("expected a snapshotReceipt, got ") + net::body_name(reply->body);
    return out;
  }
  out.receipt = *receipt;
  if (receipt->checksum != out.local_checksum) {
    out.error = "checksum mismatch: sent " + std::to_string(out.local_checksum) + ", shard computed " +
                std::to_string(receipt->checksum);
    return out;
  }
  out.ok = true;
  return out;
}

PullResult pull_snapshot(NodeSystem& node, const caf::actor& shard, const std::string& expert_id,
                         uint64_t min_version, std::chrono::milliseconds timeout) {
  PullResult out;
  auto t0 = Clock::now();
  auto reply = call(node, shard, net::SnapshotRequest{expert_id, min_version}, timeout, &out.error);
  if (!reply) return out;
  auto* snap = std::get_if<net::ExpertSnapshot>(&reply->body);
  if (!snap) {
    out.error = std::string("expected an expertSnapshot, got ") + net::body_name(reply->body);
    return out;
  }
  out.snapshot = std::move(*snap);
  out.checksum = net::checksum(out.snapshot.tensors);
  out.seconds = seconds_since(t0);
  out.ok = true;
  return out;
}

UpdateResult push_update(NodeSystem& node, const caf::actor& shard, const net::UpdatePush& update,
                         std::chrono::milliseconds timeout) {
  UpdateResult out;
  auto t0 = Clock::now();
  auto reply = call(node, shard, update, timeout, &out.error);
  out.seconds = seconds_since(t0);
  if (!reply) return out;
  if (auto* ack = std::get_if<net::UpdateAck>(&reply->body)) {
    out.ok = out.accepted = true;
    out.ack = *ack;
  } else if (auto* rej = std::get_if<net::UpdateReject>(&reply->body)) {
    out.ok = true;
    out.reject = *rej;
  } else {
    out.error = std::string("expected an updateAck or updateReject, got ") + net::body_name(reply->body);
  }
  return out;
}

std::optional<net::PlacementMap> register_expert(NodeSystem& node, const caf::actor& coordinator,
                                                 const net::ExpertSpec& spec, std::chrono::milliseconds timeout,
                                                 std::string* error) {
  auto reply = call(node, coordinator, spec, timeout, error);
  if (!reply) return std::nullopt;
  auto* map = std::get_if<net::PlacementMap>(&reply->body);
  if (!map) {
    *error = std::string("expected a placementMap, got ") + net::body_name(reply->body);
    return std::nullopt;
  }
  return *map;
}

std::optional<std::string> node_status(NodeSystem& node, const caf::actor& target, std::chrono::milliseconds timeout,
                                       std::string* error, bool verbose) {
  auto reply = call(node, target, net::StatusRequest{next_correlation_id(), verbose}, timeout, error);
  if (!reply) return std::nullopt;
  auto* st = std::get_if<net::StatusReply>(&reply->body);
  if (!st) {
    *error = std::string("expected a statusReply, got ") + net::body_name(reply->body);
    return std::nullopt;
  }
  return st->json;
}

std::optional<net::GenerateReply> ask_router(NodeSystem& node, const caf::actor& router, net::GenerateRequest request,
                                             std::chrono::milliseconds timeout, std::string* error) {
  if (request.request_id == 0) request.request_id = next_correlation_id();
  auto reply = call(node, router, std::move(request), timeout, error);
  if (!reply) return std::nullopt;  // an ErrorReply too: call() says which
  auto* g = std::get_if<net::GenerateReply>(&reply->body);
  if (!g) {
    *error = std::string("expected a generateReply, got ") + net::body_name(reply->body);
    return std::nullopt;
  }
  return *g;
}

}  // namespace fedmoe::runtime
