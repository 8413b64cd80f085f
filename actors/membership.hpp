// How a shard, worker or router belongs to a federation: Hello to the coordinator when it starts,
// then a Heartbeat every heartbeat_ms (well inside the lease the HelloAck grants), Leave when it stops
// cleanly. Shared by the member actors; each handles heartbeat_atom by calling send_heartbeat().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/event_based_actor.hpp>

#include "net/messages.hpp"
#include "net/transport.hpp"

namespace fedmoe::actors {

using heartbeat_atom = caf::atom_constant<caf::atom("heartbeat")>;
// (coordinator, endpoint): join a federation after the node knows where it is published.
using join_atom = caf::atom_constant<caf::atom("join")>;
// (shard id, actor): the coordinator tells shards how to reach their peers, in one process or across
// hosts alike (CAF carries actor handles between nodes), after every placement change.
using peer_atom = caf::atom_constant<caf::atom("peer")>;

struct Membership {
  caf::actor coordinator;     // invalid: not in a federation (standalone node)
  uint64_t heartbeat_ms = 1000;
  net::Hello hello;           // node id, role, endpoint, device, speed, wish
  uint64_t seq = 0;
};

// Sends Hello and schedules the first heartbeat. No-op without a coordinator.
void join(caf::event_based_actor* self, net::Transport& transport, Membership& m);
// Sends one Heartbeat (load, measured speed) and schedules the next.
void send_heartbeat(caf::event_based_actor* self, net::Transport& transport, Membership& m, float load = 0,
                    double measured_speed = 0);

// (load, measured speed): the member's latest figures, for its heartbeater.
using load_atom = caf::atom_constant<caf::atom("load")>;

// Heartbeats on behalf of a member whose own thread blocks for long stretches (a worker training):
// a small scheduled actor, linked to `owner`, sends m's Heartbeat every heartbeat_ms as if `owner`
// sent it (the coordinator's replies and its record of the member's handle go to `owner`). Send it
// load_atom messages to update the figures. Returns an invalid handle without a coordinator.
caf::actor spawn_heartbeater(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport, Membership m);

}  // namespace fedmoe::actors
