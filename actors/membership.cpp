#include "actors/membership.hpp"

#include <chrono>

#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

namespace fedmoe::actors {

namespace {

// Sends `body` to m's coordinator as member m, from actor `from` (replies go there).
void send_to_coordinator(const caf::actor& from, net::Transport& transport, const Membership& m, net::Body body) {
  net::Message msg;
  msg.sender_id = m.hello.node_id;
  msg.sent_at_unix_ms = net::unix_ms_now();
  msg.body = std::move(body);
  transport.send(from, m.coordinator, msg);
}

void send(caf::event_based_actor* self, net::Transport& transport, const Membership& m, net::Body body) {
  send_to_coordinator(caf::actor_cast<caf::actor>(self), transport, m, std::move(body));
}

}  // namespace

void join(caf::event_based_actor* self, net::Transport& transport, Membership& m) {
  if (!m.coordinator) return;
  send(self, transport, m, m.hello);
  self->delayed_send(self, std::chrono::milliseconds(m.heartbeat_ms),
                     heartbeat_atom::value);
}

void send_heartbeat(caf::event_based_actor* self, net::Transport& transport, Membership& m, float load,
                    double measured_speed) {
  if (!m.coordinator) return;
  send(self, transport, m, net::Heartbeat{m.hello.node_id, ++m.seq, load, measured_speed});
  self->delayed_send(self, std::chrono::milliseconds(m.heartbeat_ms),
                     heartbeat_atom::value);
}

namespace {

struct HeartbeaterState {
  caf::actor owner;
  std::shared_ptr<net::Transport> transport;
  Membership m;
  float load = 0;
  double speed = 0;
  static inline const char* name = "fedmoe.heartbeater";
};

caf::behavior heartbeater(caf::stateful_actor<HeartbeaterState>* self, caf::actor owner,
                          std::shared_ptr<net::Transport> transport, Membership m) {
  self->state.owner = std::move(owner);
  self->state.transport = std::move(transport);
  self->state.m = std::move(m);
  self->send(self, heartbeat_atom::value);
  return {
      [=](heartbeat_atom) {
        auto& st = self->state;
        send_to_coordinator(st.owner, *st.transport, st.m, net::Heartbeat{st.m.hello.node_id, ++st.m.seq, st.load, st.speed});
        self->delayed_send(self, std::chrono::milliseconds(st.m.heartbeat_ms), heartbeat_atom::value);
      },
      [=](load_atom, float load, double speed) {
        self->state.load = load;
        self->state.speed = speed;
      },
  };
}

}  // namespace

caf::actor spawn_heartbeater(caf::event_based_actor* owner, std::shared_ptr<net::Transport> transport, Membership m) {
  if (!m.coordinator) return {};
  return owner->spawn<caf::linked>(heartbeater, caf::actor_cast<caf::actor>(owner), std::move(transport), std::move(m));
}

}  // namespace fedmoe::actors
