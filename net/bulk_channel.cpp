#include "net/bulk_channel.hpp"

#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio.hpp>

namespace fedmoe::net {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr char kRequestMagic[8] = {'F', 'M', 'B', 'U', 'L', 'K', 'R', 'Q'};
constexpr char kOkMagic[8] = {'F', 'M', 'B', 'U', 'L', 'K', 'O', 'K'};
constexpr char kNoMagic[8] = {'F', 'M', 'B', 'U', 'L', 'K', 'N', 'O'};
constexpr char kAckMagic[8] = {'F', 'M', 'B', 'U', 'L', 'K', 'A', 'K'};

void put_u64(char* p, uint64_t v) { std::memcpy(p, &v, 8); }  // wire is little-endian, as is the host
uint64_t get_u64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void tune(tcp::socket& s) {
  boost::system::error_code ignored;
  s.set_option(tcp::no_delay(true), ignored);
}

using Token = std::pair<uint64_t, uint64_t>;

// Long enough for `size` bytes at a crawl of 20 MB/s, plus a minute: a peer slower than that is dead.
std::chrono::milliseconds transfer_deadline(uint64_t size) {
  return std::chrono::milliseconds(60'000 + size / 20'000);
}

}  // namespace

// --------------------------------------------------------------------------------------------------
// Server

struct BulkServer::Impl {
  struct Entry {
    std::shared_ptr<const Encoded> message;
    Clock::time_point expires;
  };

  Options options;
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  tcp::acceptor acceptor{io};
  asio::steady_timer sweeper{io};
  std::vector<std::thread> threads;

  mutable std::mutex mu;
  std::map<Token, Entry> staged;
  std::random_device entropy;  // tokens must be unguessable: /dev/urandom, not a seeded PRNG
  std::atomic<uint64_t> fetched{0};
  std::atomic<uint64_t> accepted{0};

  explicit Impl(Options o) : options(std::move(o)) {
    if (options.advertise_host.empty()) options.advertise_host = options.bind_host;
    boost::system::error_code ec;
    auto address = asio::ip::make_address(options.bind_host, ec);
    if (ec) throw std::runtime_error("bulk channel: bad bind address '" + options.bind_host + "': " + ec.message());
    tcp::endpoint ep(address, options.port);
    acceptor.open(ep.protocol(), ec);
    if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor.bind(ep, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("bulk channel: cannot listen on " + options.bind_host + ":" +
                               std::to_string(options.port) + ": " + ec.message());
    accept();
    sweep();
    for (int i = 0; i < std::max(1, options.threads); ++i) threads.emplace_back([this] { io.run(); });
  }

  ~Impl() {
    work.reset();
    io.stop();
    for (auto& t : threads) t.join();
  }

  std::shared_ptr<const Encoded> find(Token t) {
    std::lock_guard lock(mu);
    auto it = staged.find(t);
    return it == staged.end() ? nullptr : it->second.message;
  }

  void forget(Token t) {
    std::lock_guard lock(mu);
    if (staged.erase(t)) ++fetched;
  }

  void sweep() {
    sweeper.expires_after(std::chrono::seconds(5));
    sweeper.async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      auto now = Clock::now();
      {
        std::lock_guard lock(mu);
        for (auto it = staged.begin(); it != staged.end();)
          it = it->second.expires < now ? staged.erase(it) : std::next(it);
      }
      sweep();
    });
  }

  void accept();
};

namespace {

// One connection, served: requests one after another, each answered with the staged message, until
// the client hangs up or stays idle for options.idle_timeout.
class ServerSession : public std::enable_shared_from_this<ServerSession> {
 public:
  ServerSession(tcp::socket socket, BulkServer::Impl* server)
      : socket_(std::move(socket)), deadline_(socket_.get_executor()), server_(server) {}

  void start() {
    tune(socket_);
    read_request();
  }

 private:
  void read_request() {
    arm(std::chrono::duration_cast<std::chrono::milliseconds>(server_->options.idle_timeout));
    auto self = shared_from_this();
    asio::async_read(socket_, asio::buffer(request_), [self](boost::system::error_code ec, size_t) {
      if (!ec) self->on_request();
      else self->close();
    });
  }

  // One deadline per phase: an idle, slow or vanished client loses its connection, never the server.
  void arm(std::chrono::milliseconds d) {
    deadline_.expires_after(d);
    deadline_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (!ec) self->close();
    });
  }

  void close() {
    boost::system::error_code ignored;
    socket_.close(ignored);
    deadline_.cancel();
  }

  void on_request() {
    if (std::memcmp(request_.data(), kRequestMagic, 8) != 0) return close();  // not a fedmoe client
    token_ = {get_u64(request_.data() + 8), get_u64(request_.data() + 16)};
    message_ = server_->find(token_);
    auto self = shared_from_this();
    std::vector<asio::const_buffer> out;
    std::memcpy(head_.data(), message_ ? kOkMagic : kNoMagic, 8);
    put_u64(head_.data() + 8, message_ ? message_->size_bytes() : 0);
    out.emplace_back(asio::buffer(head_));
    if (!message_) {  // unknown ticket: say so, and stay ready for the next request
      asio::async_write(socket_, out, [self](boost::system::error_code ec, size_t) {
        if (ec) return self->close();
        self->read_request();
      });
      return;
    }
    out_ = std::move(out);
    for (const auto& p : message_->pieces()) out_.emplace_back(p.data, p.size);
    written_ = 0;
    total_ = asio::buffer_size(out_);
    arm(transfer_deadline(message_->size_bytes()));
    write_more();
  }

  // asio::async_write hands the kernel at most 64 KiB per call; a bulk message wants the opposite:
  // as much as the socket takes in each call, so that the sender does not wake up every 64 KiB.
  void write_more() {
    if (written_ == total_) return wait_for_ack();
    std::vector<asio::const_buffer> rest;
    size_t skip = written_;
    for (const auto& b : out_) {
      if (skip >= b.size()) {
        skip -= b.size();
        continue;
      }
      rest.push_back(b + skip);
      skip = 0;
      if (rest.size() == 64) break;  // well under IOV_MAX; the next call continues from there
    }
    auto self = shared_from_this();
    socket_.async_write_some(rest, [self](boost::system::error_code ec, size_t n) {
      if (ec) return self->close();
      self->written_ += n;
      self->write_more();
    });
  }

  void wait_for_ack() {
    auto self = shared_from_this();
    asio::async_read(socket_, asio::buffer(ack_), [self](boost::system::error_code ec, size_t) {
      if (ec || std::memcmp(self->ack_.data(), kAckMagic, 8) != 0) return self->close();
      self->server_->forget(self->token_);
      self->message_.reset();
      self->out_.clear();
      self->read_request();
    });
  }

  tcp::socket socket_;
  asio::steady_timer deadline_;
  BulkServer::Impl* server_;
  std::array<char, 24> request_{};
  std::array<char, 16> head_{};
  std::array<char, 8> ack_{};
  Token token_{};
  std::shared_ptr<const Encoded> message_;
  std::vector<asio::const_buffer> out_;  // header + the message's pieces
  size_t written_ = 0, total_ = 0;
};

}  // namespace

void BulkServer::Impl::accept() {
  // Each accepted socket gets its own strand: its timer and its I/O handlers never race.
  acceptor.async_accept(asio::make_strand(io), [this](boost::system::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (!ec) {
      ++accepted;
      std::make_shared<ServerSession>(std::move(socket), this)->start();
    }
    accept();
  });
}

BulkServer::BulkServer(Options options) : impl_(std::make_unique<Impl>(std::move(options))) {}
BulkServer::~BulkServer() = default;

uint16_t BulkServer::port() const { return impl_->acceptor.local_endpoint().port(); }

BulkTicket BulkServer::stage(std::shared_ptr<const Encoded> message) {
  BulkTicket t;
  t.host = impl_->options.advertise_host;
  t.port = port();
  t.size = message->size_bytes();
  std::lock_guard lock(impl_->mu);
  do {
    t.token_hi = (uint64_t{impl_->entropy()} << 32) | impl_->entropy();
    t.token_lo = (uint64_t{impl_->entropy()} << 32) | impl_->entropy();
  } while (impl_->staged.count({t.token_hi, t.token_lo}));
  impl_->staged[{t.token_hi, t.token_lo}] = {std::move(message), Clock::now() + impl_->options.ticket_ttl};
  return t;
}

size_t BulkServer::staged_count() const {
  std::lock_guard lock(impl_->mu);
  return impl_->staged.size();
}

uint64_t BulkServer::fetched_count() const { return impl_->fetched.load(); }

uint64_t BulkServer::connections_accepted() const { return impl_->accepted.load(); }

// --------------------------------------------------------------------------------------------------
// Client

struct BulkClient::Impl {
  Options options;
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  // Kept-alive connections by "host:port". Touched only on the I/O thread, like everything else here.
  std::map<std::string, std::vector<tcp::socket>> idle;
  std::atomic<size_t> idle_count{0};
  std::thread thread;

  explicit Impl(Options o) : options(o), thread([this] { io.run(); }) {}
  ~Impl() {
    work.reset();
    io.stop();
    thread.join();
  }

  std::optional<tcp::socket> take_idle(const std::string& key) {
    auto it = idle.find(key);
    if (it == idle.end() || it->second.empty()) return std::nullopt;
    tcp::socket s = std::move(it->second.back());
    it->second.pop_back();
    --idle_count;
    return s;
  }

  void keep_idle(const std::string& key, tcp::socket s) {
    auto& list = idle[key];
    if (list.size() >= options.max_idle_per_sender) return;  // closes `s`
    list.push_back(std::move(s));
    ++idle_count;
  }
};

namespace {

class FetchOp : public std::enable_shared_from_this<FetchOp> {
 public:
  FetchOp(BulkClient::Impl* client, BulkTicket ticket, BulkClient::Callback done)
      : client_(client), options_(client->options), ticket_(std::move(ticket)), done_(std::move(done)),
        socket_(client->io), resolver_(client->io), watchdog_(client->io) {}

  void start() {
    last_progress_ = Clock::now();
    phase_timeout_ = options_.connect_timeout;
    watch();
    if (auto pooled = client_->take_idle(key())) {
      socket_ = std::move(*pooled);
      reused_ = true;
      return send_request();
    }
    connect();
  }

 private:
  std::string key() const { return ticket_.host + ":" + std::to_string(ticket_.port); }
  std::string where() const { return "bulk sender " + key(); }

  void connect() {
    auto self = shared_from_this();
    resolver_.async_resolve(ticket_.host, std::to_string(ticket_.port),
                            [self](boost::system::error_code ec, tcp::resolver::results_type results) {
                              if (ec) return self->fail("cannot resolve " + self->where() + ": " + ec.message());
                              asio::async_connect(self->socket_, results,
                                                  [self](boost::system::error_code ec, const tcp::endpoint&) {
                                                    if (ec) return self->fail("cannot connect to " + self->where() + ": " + ec.message());
                                                    tune(self->socket_);
                                                    self->send_request();
                                                  });
                            });
  }

  // A kept-alive connection may have been closed by the sender meanwhile (idle timeout, restart):
  // before any answer arrived, that is no failure of the fetch; try once more on a new connection.
  bool retry_fresh() {
    if (!reused_) return false;
    reused_ = false;
    boost::system::error_code ignored;
    socket_.close(ignored);
    socket_ = tcp::socket(client_->io);
    progress();
    phase_timeout_ = options_.connect_timeout;
    connect();
    return true;
  }

  // Fails the fetch when no byte arrived for a whole phase timeout (dead or wedged sender).
  void watch() {
    watchdog_.expires_after(std::chrono::milliseconds(200));
    watchdog_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec || self->finished_) return;
      if (Clock::now() - self->last_progress_ > self->phase_timeout_)
        return self->fail("timed out: no data from " + self->where() + " for " +
                          std::to_string(self->phase_timeout_.count()) + " ms");
      self->watch();
    });
  }

  void progress() { last_progress_ = Clock::now(); }

  void send_request() {
    progress();
    phase_timeout_ = options_.idle_timeout;
    std::memcpy(request_.data(), kRequestMagic, 8);
    put_u64(request_.data() + 8, ticket_.token_hi);
    put_u64(request_.data() + 16, ticket_.token_lo);
    auto self = shared_from_this();
    asio::async_write(socket_, asio::buffer(request_), [self](boost::system::error_code ec, size_t) {
      if (ec) {
        if (self->retry_fresh()) return;
        return self->fail("cannot send request to " + self->where() + ": " + ec.message());
      }
      asio::async_read(self->socket_, asio::buffer(self->head_), [self](boost::system::error_code ec, size_t) {
        if (ec) {
          if (self->retry_fresh()) return;
          return self->fail("no answer from " + self->where() + ": " + ec.message());
        }
        self->on_head();
      });
    });
  }

  void on_head() {
    progress();
    if (std::memcmp(head_.data(), kNoMagic, 8) == 0) {
      keep_connection();
      return fail(where() + " does not know this ticket (expired, already fetched, or never staged)");
    }
    if (std::memcmp(head_.data(), kOkMagic, 8) != 0) return fail(where() + " answered with a bad header");
    uint64_t size = get_u64(head_.data() + 8);
    if (size != ticket_.size)
      return fail(where() + " announced " + std::to_string(size) + " bytes, the ticket said " +
                  std::to_string(ticket_.size));
    if (size > options_.max_size)
      return fail("bulk message of " + std::to_string(size) + " bytes exceeds the limit of " +
                  std::to_string(options_.max_size));
    buffer_ = Buffer::allocate(size);
    read_more();
  }

  void read_more() {
    if (received_ == buffer_->size()) return send_ack();
    auto self = shared_from_this();
    socket_.async_read_some(asio::buffer(buffer_->data() + received_, buffer_->size() - received_),
                            [self](boost::system::error_code ec, size_t n) {
                              if (ec)
                                return self->fail("transfer from " + self->where() + " broke after " +
                                                  std::to_string(self->received_) + " of " +
                                                  std::to_string(self->buffer_->size()) + " bytes: " + ec.message());
                              self->received_ += n;
                              self->progress();
                              self->read_more();
                            });
  }

  void send_ack() {
    std::memcpy(ack_.data(), kAckMagic, 8);
    auto self = shared_from_this();
    asio::async_write(socket_, asio::buffer(ack_), [self](boost::system::error_code ec, size_t) {
      // The bytes are complete whatever happens to the ack: a lost ack only lets the ticket expire.
      if (!ec) self->keep_connection();
      self->succeed();
    });
  }

  void keep_connection() {
    if (socket_.is_open()) client_->keep_idle(key(), std::move(socket_));
  }

  void succeed() {
    if (std::exchange(finished_, true)) return;
    shutdown();
    done_(std::move(buffer_), {});
  }

  void fail(std::string why) {
    if (std::exchange(finished_, true)) return;
    shutdown();
    done_(nullptr, std::move(why));
  }

  void shutdown() {
    boost::system::error_code ignored;
    if (socket_.is_open()) socket_.close(ignored);
    resolver_.cancel();
    watchdog_.cancel();
  }

  BulkClient::Impl* client_;
  BulkClient::Options options_;
  BulkTicket ticket_;
  BulkClient::Callback done_;
  tcp::socket socket_;
  tcp::resolver resolver_;
  asio::steady_timer watchdog_;
  std::array<char, 24> request_{};
  std::array<char, 16> head_{};
  std::array<char, 8> ack_{};
  std::shared_ptr<Buffer> buffer_;
  uint64_t received_ = 0;
  Clock::time_point last_progress_;
  std::chrono::milliseconds phase_timeout_{0};
  bool reused_ = false;
  bool finished_ = false;
};

}  // namespace

BulkClient::BulkClient(Options options) : impl_(std::make_unique<Impl>(options)) {}
BulkClient::~BulkClient() = default;

void BulkClient::fetch(const BulkTicket& ticket, Callback done) {
  auto op = std::make_shared<FetchOp>(impl_.get(), ticket, std::move(done));
  asio::post(impl_->io, [op] { op->start(); });
}

size_t BulkClient::idle_connections() const { return impl_->idle_count.load(); }

}  // namespace fedmoe::net
