// How a shard, worker or router belongs to a federation. Each member spawns one coordinator link: a
// small actor linked to it that says Hello for it, sends its Heartbeat every heartbeat_ms (well inside
// the lease the HelloAck grants) whatever the member is doing (a worker's training blocks its own
// thread for minutes), watches the coordinator, and when the coordinator goes away (killed, restarted,
// its host cut off) reconnects to its endpoint with a backoff that doubles up to reconnect_max_ms and
// says Hello again, so that a restarted coordinator finds its members within a heartbeat or two. The
// member hears of the new handle (coordinator_atom) and asks the link to say Hello again when the
// coordinator does not know it (rejoin_atom, after an ErrorReply "not_a_member").
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
// (coordinator, endpoint[, coordinator endpoint]): join a federation after the node knows where it is
// published; with the coordinator's HOST:PORT the member reconnects when the coordinator restarts.
using join_atom = caf::atom_constant<caf::atom("join")>;
// (shard id, actor): the coordinator tells shards how to reach their peers, in one process or across
// hosts alike (CAF carries actor handles between nodes), after every placement change.
using peer_atom = caf::atom_constant<caf::atom("peer")>;
// (actor): the link reconnected; the member's coordinator is now this handle.
using coordinator_atom = caf::atom_constant<caf::atom("coord")>;
// (): the coordinator does not know the member (it restarted, or expired it): say Hello again.
using rejoin_atom = caf::atom_constant<caf::atom("rejoin")>;
// (load, measured speed): the member's latest figures, for its heartbeats.
using load_atom = caf::atom_constant<caf::atom("load")>;

struct Membership {
  caf::actor coordinator;            // invalid: not in a federation (standalone node)
  std::string coordinator_endpoint;  // HOST:PORT to reconnect to ("" = in this process: no reconnecting)
  uint64_t heartbeat_ms = 1000;
  uint64_t reconnect_min_ms = 100, reconnect_max_ms = 5000;
  net::Hello hello;                  // node id, role, endpoint, device, speed, wish
  uint64_t seq = 0;
};

// Spawns `owner`'s link to its coordinator (linked: it lives and dies with the owner) and says Hello.
// Returns an invalid handle when `m` has no coordinator. The coordinator's replies go to `owner`.
caf::actor spawn_coordinator_link(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport,
                                  Membership m);

// A member published at `endpoint` joins the federation of `coordinator` (reached again at
// `coordinator_endpoint` after a restart; "" in one process): completes `m` and spawns its `link`,
// unless it has one already (a member joins once).
void join_federation(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport, Membership& m,
                     caf::actor& link, caf::actor coordinator, std::string endpoint, std::string coordinator_endpoint);

}  // namespace fedmoe::actors
