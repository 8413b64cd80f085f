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
#include <map>
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
// (shard id, actor[, endpoint]): the coordinator tells members how to reach the shards, in one
// process or across hosts alike (CAF carries actor handles between nodes), after every placement
// change; with the shard's published endpoint the member connects to it directly (connect_peer).
using peer_atom = caf::atom_constant<caf::atom("peer")>;
// (actor): the link reconnected; the member's coordinator is now this handle.
using coordinator_atom = caf::atom_constant<caf::atom("coord")>;
// (): the coordinator does not know the member (it restarted, or expired it): say Hello again.
using rejoin_atom = caf::atom_constant<caf::atom("rejoin")>;
// (load, measured speed): the member's latest figures, for its heartbeats.
using load_atom = caf::atom_constant<caf::atom("load")>;
// (shard id, actor): a shard reached over a connection of this node's own (connect_peer).
using direct_peer_atom = caf::atom_constant<caf::atom("dpeer")>;
// (shard id): connect to that shard again (its connection went down, or could not be made).
using reconnect_peer_atom = caf::atom_constant<caf::atom("repeer")>;

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

// Members reach shards over connections of their own, made from the endpoint each shard published
// (the coordinator's introduction, peer_atom with an endpoint, says where), not through the
// coordinator that introduced them: CAF 0.17 routes through the introducer otherwise, and a
// coordinator that dies or restarts would cut replication and pushes. `endpoints` (shard id ->
// endpoint) belongs to `self`'s state. On success `self` gets direct_peer_atom(shard, handle),
// monitored; on failure reconnect_peer_atom(shard) after 500 ms. A member's down handler calls
// peer_down() so that a dropped connection is made again.
void connect_peer(caf::event_based_actor* self, std::map<std::string, std::string>* endpoints, const std::string& shard,
                  const std::string& endpoint);
void peer_down(caf::event_based_actor* self, const std::map<std::string, caf::actor>& peers,
               const std::map<std::string, std::string>& endpoints, const caf::actor_addr& source);

// A member published at `endpoint` joins the federation of `coordinator` (reached again at
// `coordinator_endpoint` after a restart; "" in one process): completes `m` and spawns its `link`,
// unless it has one already (a member joins once).
void join_federation(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport, Membership& m,
                     caf::actor& link, caf::actor coordinator, std::string endpoint, std::string coordinator_endpoint);

}  // namespace fedmoe::actors
