#include "net/transport.hpp"

#include <caf/actor_system.hpp>
#include <caf/send.hpp>

namespace fedmoe::net {

struct Transport::Counters {
  std::atomic<uint64_t> sent_local{0}, sent_inline{0}, sent_bulk{0}, bytes_sent{0};
  std::atomic<uint64_t> received{0}, fetches{0}, fetch_failures{0}, decode_errors{0};
};

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int64_t steady_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Transport::Transport(caf::actor_system& system, Options options)
    : system_(system), options_(std::move(options)), counters_(std::make_unique<Counters>()) {
  options_.bulk_client.max_size = std::min<uint64_t>(options_.bulk_client.max_size, options_.limits.max_message_bytes);
  if (options_.enable_bulk) {
    bulk_server_ = std::make_unique<BulkServer>(options_.bulk_server);
    bulk_client_ = std::make_unique<BulkClient>(options_.bulk_client);
  }
}

Transport::~Transport() = default;

uint16_t Transport::bulk_port() const { return bulk_server_ ? bulk_server_->port() : 0; }

Transport::Stats Transport::stats() const {
  Stats s;
  s.sent_local = counters_->sent_local;
  s.sent_inline = counters_->sent_inline;
  s.sent_bulk = counters_->sent_bulk;
  s.bytes_sent = counters_->bytes_sent;
  s.received = counters_->received;
  s.fetches = counters_->fetches;
  s.fetch_failures = counters_->fetch_failures;
  s.decode_errors = counters_->decode_errors;
  return s;
}

void Transport::send(caf::local_actor* self, const caf::actor& dest, const Message& m) {
  send(caf::actor_cast<caf::actor>(self), dest, m);
}

void Transport::send(caf::local_actor* self, const caf::actor& dest, const std::string& sender_id,
                     uint64_t correlation_id, Body body) {
  if (!dest) return;
  Message m;
  m.sender_id = sender_id;
  m.correlation_id = correlation_id;
  m.sent_at_unix_ms = unix_ms_now();
  m.body = std::move(body);
  send(self, dest, m);
}

void Transport::send(const caf::actor& from, const caf::actor& dest, const Message& m) {
  send_encoded(from, dest, std::make_shared<const Encoded>(encode(m)));
}

void Transport::send_encoded(const caf::actor& from, const caf::actor& dest, std::shared_ptr<const Encoded> encoded) {
  if (!dest) return;
  WireFrame frame;
  frame.sender_accepts_bulk = bulk_client_ != nullptr;
  counters_->bytes_sent += encoded->size_bytes();
  bool remote = dest.node() != system_.node();
  if (remote && bulk_server_ && encoded->size_bytes() >= options_.bulk_threshold && peer_accepts_bulk(dest.node())) {
    frame.kind = WireFrame::Kind::bulk_ticket;
    frame.ticket = bulk_server_->stage(std::move(encoded));
    ++counters_->sent_bulk;
  } else {
    frame.kind = WireFrame::Kind::message;
    frame.bytes = encoded->flatten();
    ++(remote ? counters_->sent_inline : counters_->sent_local);
  }
  caf::send_as(from, dest, std::move(frame));
}

bool Transport::peer_accepts_bulk(const caf::node_id& peer) const {
  std::lock_guard lock(peers_mu_);
  return no_bulk_peers_.count(peer) == 0;
}

Transport::Received Transport::receive(caf::local_actor* self, WireFrame& frame) {
  if (const auto& sender = self->current_sender(); sender && sender->node() != system_.node()) {
    std::lock_guard lock(peers_mu_);
    if (frame.sender_accepts_bulk) no_bulk_peers_.erase(sender->node());
    else no_bulk_peers_.insert(sender->node());
  }
  switch (frame.kind) {
    case WireFrame::Kind::message: {
      ++counters_->received;
      if (!frame.bytes) {
        ++counters_->decode_errors;
        return Result<Message>(DecodeError{DecodeErrc::truncated, "wire frame without a message"});
      }
      auto decoded = decode(frame.bytes, options_.limits);
      if (!decoded) ++counters_->decode_errors;
      return decoded;
    }
    case WireFrame::Kind::bulk_ticket:
      if (!bulk_client_)
        return Result<Message>(DecodeError{DecodeErrc::transfer_failed, "bulk ticket received but bulk transfers are disabled"});
      if (frame.ticket.size > options_.limits.max_message_bytes)
        return Result<Message>(DecodeError{DecodeErrc::too_large, "bulk message of " + std::to_string(frame.ticket.size) +
                                                                      " bytes exceeds the limit of " +
                                                                      std::to_string(options_.limits.max_message_bytes)});
      deliver_later(caf::actor_cast<caf::actor>(self), self->current_sender(), frame.ticket);
      return std::nullopt;
    case WireFrame::Kind::fetch_failed:
      return Result<Message>(DecodeError{DecodeErrc::transfer_failed, frame.error});
  }
  return Result<Message>(DecodeError{DecodeErrc::malformed, "wire frame of unknown kind"});
}

void Transport::deliver_later(const caf::actor& self, const caf::strong_actor_ptr& sender, const BulkTicket& ticket) {
  ++counters_->fetches;
  auto from = caf::actor_cast<caf::actor>(sender);
  Counters* counters = counters_.get();
  // The callback runs on a bulk client thread; send_as only enqueues into the actor's mailbox.
  bulk_client_->fetch(ticket, [self, from, ticket, counters](std::shared_ptr<Buffer> bytes, std::string error) {
    WireFrame frame;
    if (bytes) {
      frame.kind = WireFrame::Kind::message;
      frame.bytes = std::move(bytes);
    } else {
      ++counters->fetch_failures;
      frame.kind = WireFrame::Kind::fetch_failed;
      frame.ticket = ticket;
      frame.error = std::move(error);
    }
    caf::send_as(from, self, std::move(frame));
  });
}

std::optional<Result<Message>> Transport::await(caf::scoped_actor& self, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    std::optional<Result<Message>> out;
    bool timed_out = false;
    self->receive([&](WireFrame& frame) {
      auto r = receive(self.ptr(), frame);
      if (r) out = std::move(*r);
    },
                  caf::after(left) >> [&] { timed_out = true; });
    if (out) return out;
    if (timed_out) return std::nullopt;
  }
}

}  // namespace fedmoe::net
