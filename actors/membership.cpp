#include "actors/membership.hpp"

#include <chrono>

#include <caf/event_based_actor.hpp>

namespace fedmoe::actors {

namespace {

void send(caf::event_based_actor* self, net::Transport& transport, const Membership& m, net::Body body) {
  net::Message msg;
  msg.sender_id = m.hello.node_id;
  msg.sent_at_unix_ms = net::unix_ms_now();
  msg.body = std::move(body);
  transport.send(self, m.coordinator, msg);
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

}  // namespace fedmoe::actors
