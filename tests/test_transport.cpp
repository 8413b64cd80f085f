// Transport between actors: the same expert-shard actor and the same client code, with the peer in
// the same actor system (local, shared buffer), in another actor system reached through CAF's
// middleman (inline frames and bulk tickets), and with the bulk channel off.
#include <catch2/catch.hpp>

#include <random>

#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/dispatch.hpp"
#include "actors/expert_shard.hpp"
#include "net/checksum.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

using namespace fedmoe;

namespace {

net::ExpertSnapshot make_snapshot(const std::string& id, uint64_t version, size_t bytes_per_tensor, int tensors) {
  net::ExpertSnapshot s;
  s.spec.expert_id = id;
  s.spec.domain = id;
  s.spec.lora_rank = 8;
  s.spec.target_modules = {"q_proj", "v_proj"};
  s.version = version;
  std::mt19937_64 rng(version * 31 + tensors);
  for (int i = 0; i < tensors; ++i) {
    std::vector<std::byte> data(bytes_per_tensor);
    for (auto& b : data) b = static_cast<std::byte>(rng());
    s.tensors.push_back(
        net::Tensor::owning("t" + std::to_string(i), net::DType::f32, {bytes_per_tensor / 4}, std::move(data)));
  }
  return s;
}

const auto kTimeout = std::chrono::milliseconds(60'000);

void push_and_pull(runtime::NodeSystem& client, const caf::actor& shard, const net::ExpertSnapshot& snap) {
  auto pushed = runtime::push_snapshot(client, shard, snap, kTimeout);
  INFO(pushed.error);
  REQUIRE(pushed.ok);
  CHECK(pushed.receipt.expert_id == snap.spec.expert_id);
  CHECK(pushed.receipt.version == snap.version);
  CHECK(pushed.receipt.tensor_count == snap.tensors.size());
  CHECK(pushed.receipt.checksum == net::checksum(snap.tensors));

  auto pulled = runtime::pull_snapshot(client, shard, snap.spec.expert_id, snap.version, kTimeout);
  INFO(pulled.error);
  REQUIRE(pulled.ok);
  CHECK(pulled.checksum == pushed.local_checksum);
  CHECK(pulled.snapshot.spec.target_modules == snap.spec.target_modules);
  REQUIRE(pulled.snapshot.tensors.size() == snap.tensors.size());
  CHECK(pulled.snapshot.tensors[0].name == "t0");
}

}  // namespace

TEST_CASE("same actor code works in one actor system and across two", "[transport]") {
  runtime::NodeSystem server;
  auto shard = server.own(server.system().spawn(actors::expert_shard, std::string("shard-a"), server.transport()));
  uint16_t port = server.publish(shard, "127.0.0.1", 0);

  SECTION("local peer: the encoded buffer is handed over, never through a socket") {
    push_and_pull(server, shard, make_snapshot("python", 1, 1 << 20, 3));
    auto s = server.transport()->stats();
    CHECK(s.sent_local >= 4);  // push, receipt, pull, snapshot
    CHECK(s.sent_bulk == 0);
    CHECK(s.sent_inline == 0);
  }
  SECTION("remote peer: small messages inline, large ones through the bulk channel") {
    runtime::NodeSystem client;
    auto remote = client.connect("127.0.0.1", port);
    CHECK(remote.node() != client.system().node());
    push_and_pull(client, remote, make_snapshot("sql", 2, 4 << 20, 2));  // 8 MiB: bulk both ways
    push_and_pull(client, remote, make_snapshot("docs", 3, 4096, 2));    // 8 KiB: inline both ways
    auto c = client.transport()->stats();
    CHECK(c.sent_bulk == 1);      // the 8 MiB push
    CHECK(c.sent_inline == 3);    // two pull requests, the small push
    CHECK(c.fetches == 1);        // the 8 MiB snapshot pulled back
    auto s = server.transport()->stats();
    CHECK(s.sent_bulk == 1);      // the 8 MiB snapshot served
    CHECK(s.fetches == 1);        // the 8 MiB push fetched by the shard
    CHECK(s.fetch_failures == 0);
  }
  SECTION("remote peer with the bulk channel off: everything through CAF") {
    runtime::NodeSystemOptions o;
    o.enable_bulk = false;
    runtime::NodeSystem client(o);
    auto remote = client.connect("127.0.0.1", port);
    push_and_pull(client, remote, make_snapshot("sql", 4, 2 << 20, 2));
    auto c = client.transport()->stats();
    CHECK(c.sent_bulk == 0);
    CHECK(c.sent_inline == 2);
  }
}

TEST_CASE("a shard answers bad frames with the reason and keeps serving", "[transport]") {
  runtime::NodeSystem server;
  auto shard = server.own(server.system().spawn(actors::expert_shard, std::string("shard-b"), server.transport()));
  uint16_t port = server.publish(shard, "127.0.0.1", 0);
  runtime::NodeSystem client;
  auto remote = client.connect("127.0.0.1", port);
  caf::scoped_actor self{client.system()};

  auto expect_error = [&](net::WireFrame frame, const std::string& code) {
    self->send(remote, std::move(frame));
    auto reply = client.transport()->await(self, kTimeout);
    REQUIRE(reply);
    REQUIRE(reply->ok());
    auto* err = std::get_if<net::ErrorReply>(&reply->value().body);
    REQUIRE(err);
    CHECK(err->code == code);
  };

  std::mt19937_64 rng(5);
  auto garbage = net::Buffer::allocate(4096);
  for (size_t i = 0; i < garbage->size(); ++i) garbage->data()[i] = static_cast<std::byte>(rng());
  uint32_t huge_segment_count = 0xfffffff0u;  // segment table announcing 4 billion segments
  std::memcpy(garbage->data(), &huge_segment_count, 4);
  net::WireFrame bad;
  bad.bytes = garbage;
  expect_error(bad, "bad_segment_table");

  net::WireFrame odd;
  odd.bytes = net::Buffer::copy_of("abc", 3);
  expect_error(odd, "truncated");

  net::WireFrame dead_ticket;
  dead_ticket.kind = net::WireFrame::Kind::bulk_ticket;
  {
    net::BulkServer gone({});
    dead_ticket.ticket = {"127.0.0.1", gone.port(), 1, 2, 4096};
  }
  expect_error(dead_ticket, "transfer_failed");

  net::WireFrame too_big;
  too_big.kind = net::WireFrame::Kind::bulk_ticket;
  too_big.ticket = {"127.0.0.1", 1, 1, 2, uint64_t{1} << 40};
  expect_error(too_big, "too_large");

  // Unhandled message kinds are named in the answer.
  net::Message hb;
  hb.body = net::Heartbeat{"n1", 1, 0, 0};
  client.transport()->send(caf::actor{self}, remote, hb);
  auto reply = client.transport()->await(self, kTimeout);
  REQUIRE(reply);
  REQUIRE(reply->ok());
  auto* err = std::get_if<net::ErrorReply>(&reply->value().body);
  REQUIRE(err);
  CHECK(err->code == "unsupported");
  CHECK_THAT(err->detail, Catch::Contains("heartbeat"));

  // ... and the shard still serves an honest client, and counts what it refused.
  push_and_pull(client, remote, make_snapshot("python", 1, 1 << 20, 2));
  std::string error;
  auto status = runtime::node_status(client, remote, kTimeout, &error);
  REQUIRE(status);
  CHECK_THAT(*status, Catch::Contains("\"bad_segment_table\":1"));
  CHECK_THAT(*status, Catch::Contains("\"transfer_failed\":1"));
}

namespace {

struct ThrowingState {
  std::map<std::string, uint64_t> errors;
  uint64_t handled = 0;
};

// An actor whose handler throws on a Leave (a bug, a library's surprise) and answers StatusRequests
// with how many errors it counted.
caf::behavior throwing_actor(caf::stateful_actor<ThrowingState>* self, std::shared_ptr<net::Transport> transport) {
  return {[=](net::WireFrame& frame) {
    actors::dispatch(self, *transport, "thrower", self->state.errors, frame, [&](const net::Message& m) {
      ++self->state.handled;
      if (std::holds_alternative<net::Leave>(m.body)) throw std::runtime_error("a bug in the handler");
      if (auto* req = std::get_if<net::StatusRequest>(&m.body))
        transport->send(self, caf::actor_cast<caf::actor>(self->current_sender()), "thrower", m.correlation_id,
                        net::StatusReply{req->request_id, "thrower", net::Role::shard,
                                         actors::json_text({{"internal_error", self->state.errors["internal_error"]},
                                                            {"handled", self->state.handled}})});
    });
  }};
}

}  // namespace

TEST_CASE("dispatch: an exception in a handler is answered with internal_error and the actor serves on",
          "[transport][dispatch]") {
  runtime::NodeSystem node;
  auto actor = node.own(node.system().spawn(throwing_actor, node.transport()));
  caf::scoped_actor self{node.system()};
  for (int round = 0; round < 3; ++round) {
    net::Message leave;
    leave.correlation_id = 7 + round;
    leave.body = net::Leave{"n1", "bye"};
    node.transport()->send(caf::actor{self}, actor, leave);
    auto reply = node.transport()->await(self, kTimeout);
    REQUIRE(reply);
    REQUIRE(reply->ok());
    CHECK(reply->value().correlation_id == uint64_t(7 + round));
    auto* err = std::get_if<net::ErrorReply>(&reply->value().body);
    REQUIRE(err);
    CHECK(err->code == "internal_error");
    CHECK_THAT(err->detail, Catch::Contains("leave") && Catch::Contains("a bug in the handler"));
  }
  std::string error;
  auto status = runtime::node_status(node, actor, kTimeout, &error);
  INFO(error);
  REQUIRE(status);  // still alive, still answering
  auto j = nlohmann::json::parse(*status);
  CHECK(j["internal_error"] == 3);
  CHECK(j["handled"] == 4);
  // Invalid UTF-8 in a status document is replaced, not thrown.
  const auto text = actors::json_text({{"prompt", std::string("cut \xE8\xAF")}});
  CHECK_THAT(text, Catch::Contains("cut \xEF\xBF\xBD"));
  CHECK_FALSE(nlohmann::json::parse(text, nullptr, false).is_discarded());
}
