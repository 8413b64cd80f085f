// Blocking client calls against an expert shard: push a snapshot and check the shard's receipt, pull a
// snapshot back, push a worker update. Used by `fedmoe-node push`, the wire benchmark and the tests.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include <caf/actor.hpp>

#include "net/messages.hpp"
#include "runtime/node_system.hpp"

namespace fedmoe::runtime {

struct PushResult {
  bool ok = false;
  std::string error;            // why not ok: timeout, the shard's error reply, checksum mismatch...
  net::SnapshotReceipt receipt;
  uint64_t local_checksum = 0;
  double seconds = 0;           // from encoding to the receipt
};

PushResult push_snapshot(NodeSystem& node, const caf::actor& shard, const net::ExpertSnapshot& snapshot,
                         std::chrono::milliseconds timeout);

struct PullResult {
  bool ok = false;
  std::string error;
  net::ExpertSnapshot snapshot;  // tensors point into the received buffer
  uint64_t checksum = 0;         // computed here over what arrived
  double seconds = 0;
};

PullResult pull_snapshot(NodeSystem& node, const caf::actor& shard, const std::string& expert_id,
                         uint64_t min_version, std::chrono::milliseconds timeout);

struct UpdateResult {
  bool ok = false;        // a verdict came back (accepted or rejected)
  bool accepted = false;
  std::string error;      // no verdict: timeout, the shard's error reply
  net::UpdateAck ack;
  net::UpdateReject reject;
  double seconds = 0;
};

// Sends one worker update and waits for the shard's verdict.
UpdateResult push_update(NodeSystem& node, const caf::actor& shard, const net::UpdatePush& update,
                         std::chrono::milliseconds timeout);

// Registers (or, with spec.removed, removes) an expert at the coordinator; returns its placement map,
// or nullopt with `error` set.
std::optional<net::PlacementMap> register_expert(NodeSystem& node, const caf::actor& coordinator,
                                                 const net::ExpertSpec& spec, std::chrono::milliseconds timeout,
                                                 std::string* error);

// Asks a router for a generation; returns its reply (whose `error` may be set), or nullopt with `error`
// set when no reply came.
std::optional<net::GenerateReply> ask_router(NodeSystem& node, const caf::actor& router, net::GenerateRequest request,
                                             std::chrono::milliseconds timeout, std::string* error);

// The node's status document (JSON text), or nullopt with `error` set. `verbose` asks for the
// bulky parts too (a shard's retained update ids).
std::optional<std::string> node_status(NodeSystem& node, const caf::actor& target, std::chrono::milliseconds timeout,
                                       std::string* error, bool verbose = false);

}  // namespace fedmoe::runtime
