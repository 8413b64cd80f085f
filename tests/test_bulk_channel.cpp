// The bulk channel on its own: staged messages arrive intact, tickets are single-use and
// unguessable, and every failure (unknown ticket, dead or silent sender, lying size) is reported.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "net/bulk_channel.hpp"
#include "net/checksum.hpp"
#include "net/codec.hpp"

using namespace fedmoe::net;

namespace {

struct FetchOutcome {
  std::shared_ptr<Buffer> bytes;
  std::string error;
};

FetchOutcome fetch_sync(BulkClient& client, const BulkTicket& t) {
  std::promise<FetchOutcome> p;
  auto f = p.get_future();
  client.fetch(t, [&p](std::shared_ptr<Buffer> b, std::string e) { p.set_value({std::move(b), std::move(e)}); });
  return f.get();
}

Message snapshot_of(size_t bytes, uint64_t seed) {
  std::vector<std::byte> data(bytes);
  std::mt19937_64 rng(seed);
  for (auto& b : data) b = static_cast<std::byte>(rng());
  ExpertSnapshot s;
  s.spec.expert_id = "python";
  s.version = 3;
  s.tensors.push_back(Tensor::owning("w", DType::bf16, {bytes / 2}, std::move(data)));
  Message m;
  m.body = s;
  return m;
}

}  // namespace

TEST_CASE("a staged message arrives byte for byte and the ticket is then spent", "[bulk]") {
  BulkServer server({});
  BulkClient client({});
  auto encoded = std::make_shared<const Encoded>(encode(snapshot_of(3 << 20, 1)));
  auto flat = encoded->flatten();
  auto ticket = server.stage(encoded);
  CHECK(ticket.size == encoded->size_bytes());
  CHECK(server.staged_count() == 1);

  auto got = fetch_sync(client, ticket);
  REQUIRE(got.error.empty());
  REQUIRE(got.bytes->size() == flat->size());
  CHECK(std::memcmp(got.bytes->data(), flat->data(), flat->size()) == 0);
  auto decoded = decode(got.bytes);
  REQUIRE(decoded.ok());
  auto& snap = std::get<ExpertSnapshot>(decoded->body);
  CHECK(snap.tensors.at(0).size_bytes == size_t{3} << 20);

  // The receiver's ack removes the ticket: a second fetch (a replay) is refused.
  for (int i = 0; i < 100 && server.staged_count() != 0; ++i) usleep(10'000);
  CHECK(server.staged_count() == 0);
  CHECK(server.fetched_count() == 1);
  auto again = fetch_sync(client, ticket);
  CHECK(again.bytes == nullptr);
  CHECK_THAT(again.error, Catch::Contains("does not know this ticket"));
}

TEST_CASE("tickets are random and a guessed token is refused", "[bulk]") {
  BulkServer server({});
  BulkClient client({});
  auto encoded = std::make_shared<const Encoded>(encode(snapshot_of(1024, 2)));
  auto a = server.stage(encoded);
  auto b = server.stage(encoded);
  CHECK((a.token_hi != b.token_hi || a.token_lo != b.token_lo));
  auto guess = a;
  guess.token_lo ^= 1;
  auto got = fetch_sync(client, guess);
  CHECK(got.bytes == nullptr);
  CHECK_THAT(got.error, Catch::Contains("does not know this ticket"));
  CHECK(server.staged_count() == 2);  // the real tickets are untouched
}

TEST_CASE("many concurrent fetches all arrive intact", "[bulk]") {
  BulkServer server({});
  BulkClient client({});
  std::vector<std::shared_ptr<Buffer>> expected;
  std::vector<BulkTicket> tickets;
  for (int i = 0; i < 16; ++i) {
    auto e = std::make_shared<const Encoded>(encode(snapshot_of(size_t(64 + i) << 10, 100 + i)));
    expected.push_back(e->flatten());
    tickets.push_back(server.stage(e));
  }
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::vector<FetchOutcome> outcomes(tickets.size());
  for (size_t i = 0; i < tickets.size(); ++i)
    client.fetch(tickets[i], [&, i](std::shared_ptr<Buffer> b, std::string e) {
      std::lock_guard lock(mu);
      outcomes[i] = {std::move(b), std::move(e)};
      ++done;
      cv.notify_all();
    });
  std::unique_lock lock(mu);
  REQUIRE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return done == int(tickets.size()); }));
  for (size_t i = 0; i < tickets.size(); ++i) {
    INFO("fetch " << i);
    REQUIRE(outcomes[i].error.empty());
    REQUIRE(outcomes[i].bytes->size() == expected[i]->size());
    CHECK(checksum(outcomes[i].bytes->data(), outcomes[i].bytes->size()) ==
          checksum(expected[i]->data(), expected[i]->size()));
  }
}

TEST_CASE("consecutive fetches from one sender reuse the connection, and survive its loss", "[bulk]") {
  BulkServer::Options so;
  so.idle_timeout = std::chrono::seconds(1);
  BulkServer server(so);
  BulkClient client({});
  for (int i = 0; i < 3; ++i) {
    auto e = std::make_shared<const Encoded>(encode(snapshot_of(256 << 10, 40 + i)));
    auto got = fetch_sync(client, server.stage(e));
    REQUIRE(got.error.empty());
    CHECK(got.bytes->size() == e->size_bytes());
  }
  CHECK(server.connections_accepted() == 1);
  CHECK(client.idle_connections() == 1);
  // The server closes the idle connection; the next fetch notices and reconnects.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  auto e = std::make_shared<const Encoded>(encode(snapshot_of(4096, 50)));
  auto got = fetch_sync(client, server.stage(e));
  REQUIRE(got.error.empty());
  CHECK(server.connections_accepted() == 2);
}

TEST_CASE("a dead sender is reported, not waited on forever", "[bulk]") {
  BulkTicket t;
  t.host = "127.0.0.1";
  {
    BulkServer gone({});
    t.port = gone.port();
  }  // closed: nobody listens on that port any more
  t.size = 100;
  BulkClient client({});
  auto got = fetch_sync(client, t);
  CHECK(got.bytes == nullptr);
  CHECK_THAT(got.error, Catch::Contains("cannot connect"));
}

TEST_CASE("a sender that accepts but never answers times out", "[bulk]") {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(fd, 4) == 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  BulkTicket t;
  t.host = "127.0.0.1";
  t.port = ntohs(a.sin_port);
  t.size = 100;
  BulkClient::Options o;
  o.idle_timeout = std::chrono::milliseconds(300);
  BulkClient client(o);
  auto t0 = std::chrono::steady_clock::now();
  auto got = fetch_sync(client, t);  // the kernel completes the connect; nobody ever writes
  CHECK(got.bytes == nullptr);
  CHECK_THAT(got.error, Catch::Contains("timed out"));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  ::close(fd);
}

TEST_CASE("a ticket whose size disagrees with the sender is refused before allocating", "[bulk]") {
  BulkServer server({});
  BulkClient client({});
  auto encoded = std::make_shared<const Encoded>(encode(snapshot_of(4096, 3)));
  auto t = server.stage(encoded);
  auto lying = t;
  lying.size = t.size + 8;
  auto got = fetch_sync(client, lying);
  CHECK(got.bytes == nullptr);
  CHECK_THAT(got.error, Catch::Contains("announced"));

  BulkClient::Options small;
  small.max_size = 1000;
  BulkClient strict(small);
  auto t2 = server.stage(encoded);
  auto got2 = fetch_sync(strict, t2);
  CHECK(got2.bytes == nullptr);
  CHECK_THAT(got2.error, Catch::Contains("exceeds the limit"));
}
