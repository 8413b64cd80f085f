#include "actors/membership.hpp"

#include <algorithm>
#include <chrono>
#include <set>

#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/io/middleman.hpp>
#include <caf/stateful_actor.hpp>
#include <spdlog/spdlog.h>

#include "net/endpoint.hpp"

namespace fedmoe::actors {

namespace {

using reconnect_atom = caf::atom_constant<caf::atom("reconnect")>;

struct LinkState {
  caf::actor owner;
  std::shared_ptr<net::Transport> transport;
  Membership m;
  float load = 0;
  double speed = 0;
  uint64_t backoff_ms = 0;  // 0: connected (or never had an endpoint)
  uint64_t reconnects = 0;
  static inline const char* name = "fedmoe.coordinator_link";
};
using Link = caf::stateful_actor<LinkState>;

// Sends `body` to the coordinator as the member: its replies go to the owner.
void send_as_member(Link* self, net::Body body) {
  auto& st = self->state;
  if (!st.m.coordinator) return;
  net::Message msg;
  msg.sender_id = st.m.hello.node_id;
  msg.sent_at_unix_ms = net::unix_ms_now();
  msg.body = std::move(body);
  st.transport->send(st.owner, st.m.coordinator, msg);
}

void schedule_reconnect(Link* self) {
  auto& st = self->state;
  if (st.m.coordinator_endpoint.empty()) return;  // in-process coordinator: nothing to reconnect to
  st.backoff_ms = st.backoff_ms == 0 ? st.m.reconnect_min_ms : std::min(st.backoff_ms * 2, st.m.reconnect_max_ms);
  self->delayed_send(self, std::chrono::milliseconds(st.backoff_ms), reconnect_atom::value);
}

void reconnect(Link* self) {
  auto ep = net::parse_endpoint(self->state.m.coordinator_endpoint);
  if (!ep) return;
  auto mm = self->home_system().middleman().actor_handle();
  self->request(mm, caf::infinite, caf::connect_atom::value, ep->host, ep->port)
      .then(
          [=](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
            auto& st = self->state;
            auto handle = caf::actor_cast<caf::actor>(ptr);
            if (!handle) return schedule_reconnect(self);  // a node there, but no coordinator published
            st.m.coordinator = handle;
            self->monitor(handle);
            st.backoff_ms = 0;
            ++st.reconnects;
            spdlog::info("{}: reconnected to the coordinator at {}", st.m.hello.node_id, st.m.coordinator_endpoint);
            self->send(st.owner, coordinator_atom::value, handle);
            send_as_member(self, st.m.hello);
          },
          [=](caf::error&) { schedule_reconnect(self); });
}

caf::behavior coordinator_link(Link* self, caf::actor owner, std::shared_ptr<net::Transport> transport, Membership m) {
  auto& st = self->state;
  st.owner = std::move(owner);
  st.transport = std::move(transport);
  st.m = std::move(m);
  self->monitor(st.m.coordinator);
  self->set_down_handler([=](const caf::down_msg& down) {
    auto& st = self->state;
    if (down.source != st.m.coordinator.address()) return;
    spdlog::warn("{}: lost the coordinator{}", st.m.hello.node_id,
                 st.m.coordinator_endpoint.empty() ? "" : "; reconnecting to " + st.m.coordinator_endpoint);
    st.m.coordinator = nullptr;
    schedule_reconnect(self);
  });
  send_as_member(self, st.m.hello);
  self->delayed_send(self, std::chrono::milliseconds(st.m.heartbeat_ms), heartbeat_atom::value);
  return {
      [=](heartbeat_atom) {
        auto& st = self->state;
        send_as_member(self, net::Heartbeat{st.m.hello.node_id, ++st.m.seq, st.load, st.speed});
        self->delayed_send(self, std::chrono::milliseconds(st.m.heartbeat_ms), heartbeat_atom::value);
      },
      [=](reconnect_atom) { reconnect(self); },
      [=](rejoin_atom) { send_as_member(self, self->state.m.hello); },
      [=](load_atom, float load, double speed) {
        self->state.load = load;
        self->state.speed = speed;
      },
  };
}

}  // namespace

caf::actor spawn_coordinator_link(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport,
                                  Membership m) {
  if (!m.coordinator) return {};
  return owner->spawn<caf::linked>(coordinator_link, caf::actor_cast<caf::actor>(owner), std::move(transport),
                                   std::move(m));
}

void connect_peer(caf::event_based_actor* self, std::map<std::string, std::string>* endpoints, const std::string& shard,
                  const std::string& endpoint) {
  (*endpoints)[shard] = endpoint;
  auto ep = net::parse_endpoint(endpoint);
  if (!ep) return;
  auto retry = [=] {
    auto it = endpoints->find(shard);
    if (it != endpoints->end() && it->second == endpoint)
      self->delayed_send(self, std::chrono::milliseconds(500), reconnect_peer_atom::value, shard);
  };
  auto mm = self->home_system().middleman().actor_handle();
  self->request(mm, caf::infinite, caf::connect_atom::value, ep->host, ep->port)
      .then(
          [=](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
            auto it = endpoints->find(shard);
            if (it == endpoints->end() || it->second != endpoint) return;  // the shard moved on meanwhile
            auto handle = caf::actor_cast<caf::actor>(ptr);
            if (!handle) return retry();
            self->monitor(handle);
            spdlog::info("connected to shard {} at {}", shard, endpoint);
            self->send(self, direct_peer_atom::value, shard, std::move(handle));
          },
          [=](caf::error& err) {
            spdlog::warn("cannot connect to shard {} at {}: {}", shard, endpoint, caf::to_string(err));
            retry();
          });
}

void peer_down(caf::event_based_actor* self, const std::map<std::string, caf::actor>& peers,
               const std::map<std::string, std::string>& endpoints, const caf::actor_addr& source) {
  for (const auto& [shard, handle] : peers)
    if (handle && handle.address() == source && endpoints.count(shard)) {
      spdlog::info("lost the connection to shard {}; connecting again", shard);
      self->delayed_send(self, std::chrono::milliseconds(200), reconnect_peer_atom::value, shard);
    }
}

void join_federation(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport, Membership& m,
                     caf::actor& link, caf::actor coordinator, std::string endpoint, std::string coordinator_endpoint) {
  if (link) return;
  m.coordinator = std::move(coordinator);
  m.hello.endpoint = std::move(endpoint);
  m.coordinator_endpoint = std::move(coordinator_endpoint);
  link = spawn_coordinator_link(owner, std::move(transport), m);
}

}  // namespace fedmoe::actors
