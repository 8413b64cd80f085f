// How an actor takes a peer's message, in one place for the four actors: decode the frame (bounded,
// net/codec.hpp), hand the message to the actor's handler, and make sure nothing a peer or a user
// sends can take the actor down. A frame that does not decode is answered with an ErrorReply naming
// the problem; an exception escaping the handler (a library's surprise, a bug, an allocation failure)
// is caught, answered with ErrorReply{"internal_error"} and counted, and the actor serves on.
#pragma once

#include <cstdint>
#include <exception>
#include <map>
#include <string>
#include <utility>
#include <variant>

#include <caf/actor.hpp>
#include <caf/actor_cast.hpp>
#include <caf/local_actor.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "net/messages.hpp"
#include "net/transport.hpp"
#include "net/wire_frame.hpp"

namespace fedmoe::actors {

// A status document as text. Strings that are not valid UTF-8 come out with U+FFFD instead of
// nlohmann's type_error.316 (which once killed a router whose status held a prompt cut mid-character).
inline std::string json_text(const nlohmann::json& j, int indent = -1) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Receives `frame` through `transport`; calls handle(const net::Message&) once the message is whole
// (not while a bulk fetch is under way). Errors are counted by code in `errors`. An ErrorReply is
// never answered with another.
template <class Handle>
void dispatch(caf::local_actor* self, net::Transport& transport, const std::string& node_id,
              std::map<std::string, uint64_t>& errors, net::WireFrame& frame, Handle&& handle) {
  auto answer = [&](uint64_t correlation_id, net::ErrorReply error) {
    if (auto to = caf::actor_cast<caf::actor>(self->current_sender()))
      transport.send(self, to, node_id, correlation_id, std::move(error));
  };
  auto received = transport.receive(self, frame);
  if (!received) return;  // a bulk fetch is under way; the frame comes back when it is done
  if (!*received) {
    const auto& e = received->error();
    ++errors[net::to_string(e.code)];
    spdlog::warn("{}: rejected a message: {}", node_id, e.message());
    return answer(0, {net::to_string(e.code), "rejected a message: " + e.detail});
  }
  const net::Message& m = received->value();
  std::string failure;
  try {
    handle(m);
    return;
  } catch (const std::exception& ex) {
    failure = ex.what();
  } catch (...) {
    failure = "an exception that is not a std::exception";
  }
  ++errors["internal_error"];
  spdlog::error("{}: handling a {} message from '{}' failed: {}", node_id, net::body_name(m.body), m.sender_id, failure);
  if (!std::holds_alternative<net::ErrorReply>(m.body))
    answer(m.correlation_id,
           {"internal_error", std::string("handling a ") + net::body_name(m.body) + " message failed: " + failure});
}

}  // namespace fedmoe::actors
