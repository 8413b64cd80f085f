// wire_bench: moves expert snapshots of 1, 16 and 256 MiB between two processes over loopback,
// through the fedmoe path (a Cap'n Proto ExpertSnapshot sent by Transport to an expert-shard actor in
// the other process, which decodes it, checksums the tensors and answers with a receipt) and through
// a plain TCP socket (size header + bytes; the other side reads them into a fresh buffer, checksums
// them and answers the checksum), alternating the two in the same run. Both sides allocate a fresh
// receive buffer per transfer and both verify the checksum. Also shown: CAF's own serialization path
// (bulk channel off), the baseline the bulk channel exists to beat.
//
// Last line: "wire ratio at 256MiB: X" (fedmoe MB/s / plain TCP MB/s, medians).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <caf/send.hpp>

#include "actors/expert_shard.hpp"
#include "net/checksum.hpp"
#include "runtime/node_system.hpp"
#include "runtime/snapshot_client.hpp"

extern char** environ;

using namespace fedmoe;
using Clock = std::chrono::steady_clock;

namespace {

bool write_all(int fd, const void* p, size_t n) {
  auto* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    c += w, n -= static_cast<size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* p, size_t n) {
  auto* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, c, n, 0);
    if (r <= 0) return false;
    c += r, n -= static_cast<size_t>(r);
  }
  return true;
}

int listen_loopback(uint16_t* port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 4) != 0) return -1;
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

// The plain-TCP receiver: per transfer, a fresh buffer, a full read, a checksum sent back.
void serve_raw(int listener) {
  for (;;) {
    int fd = ::accept(listener, nullptr, nullptr);
    if (fd < 0) return;
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t size = 0;
    while (read_all(fd, &size, 8) && size > 0) {
      auto buf = net::Buffer::allocate(size);
      if (!read_all(fd, buf->data(), size)) break;
      uint64_t sum = net::checksum(buf->data(), size);
      if (!write_all(fd, &sum, 8)) break;
    }
    ::close(fd);
  }
}

int serve() {
  uint16_t raw_port = 0;
  int raw = listen_loopback(&raw_port);
  std::thread(serve_raw, raw).detach();
  runtime::NodeSystem node;
  auto shard = node.own(node.system().spawn(actors::expert_shard, std::string("bench-shard"), node.transport()));
  uint16_t port = node.publish(shard, "127.0.0.1", 0);
  std::printf("ready %u %u\n", port, raw_port);
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {}  // the parent closes our stdin when it is done
  std::_Exit(0);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--serve") return serve();
  int reps_scale = 1;
  if (argc > 1 && std::string(argv[1]) == "--quick") reps_scale = 0;

  // Start the receiving process and learn its ports.
  int to_child[2], from_child[2];
  if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) return 1;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
  posix_spawn_file_actions_adddup2(&fa, from_child[1], 1);
  posix_spawn_file_actions_addclose(&fa, to_child[1]);
  posix_spawn_file_actions_addclose(&fa, from_child[0]);
  char serve_flag[] = "--serve";
  char* child_argv[] = {argv[0], serve_flag, nullptr};
  pid_t child = 0;
  if (posix_spawn(&child, "/proc/self/exe", &fa, nullptr, child_argv, environ) != 0) {
    std::perror("wire_bench: cannot start the receiver");
    return 1;
  }
  ::close(to_child[0]);
  ::close(from_child[1]);
  FILE* child_out = ::fdopen(from_child[0], "r");
  unsigned caf_port = 0, raw_port = 0;
  if (std::fscanf(child_out, "ready %u %u", &caf_port, &raw_port) != 2) {
    std::cerr << "wire_bench: the receiver did not start\n";
    return 1;
  }

  runtime::NodeSystem node;  // fedmoe path: bulk channel on
  runtime::NodeSystemOptions inline_opts;
  inline_opts.enable_bulk = false;  // CAF's own path, for reference
  runtime::NodeSystem inline_node(inline_opts);
  auto shard = node.connect("127.0.0.1", static_cast<uint16_t>(caf_port));
  auto inline_shard = inline_node.connect("127.0.0.1", static_cast<uint16_t>(caf_port));

  uint16_t rp = static_cast<uint16_t>(raw_port);
  int raw = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(rp);
  if (::connect(raw, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return 1;
  int one = 1;
  ::setsockopt(raw, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

  std::printf("%-8s %14s %14s %14s %10s %12s\n", "size", "plain TCP MB/s", "fedmoe MB/s", "CAF-only MB/s",
              "ratio", "CAF-only/TCP");
  double last_ratio = 0;
  std::mt19937_64 rng(7);
  for (size_t mib : {1, 16, 256}) {
    size_t bytes = mib << 20;
    std::vector<std::byte> data(bytes);
    for (size_t i = 0; i + 8 <= bytes; i += 8) {
      uint64_t r = rng();
      std::memcpy(&data[i], &r, 8);
    }
    net::ExpertSnapshot snap;
    snap.spec.expert_id = "bench";
    snap.spec.domain = "bench";
    snap.version = mib;
    snap.tensors.push_back(net::Tensor::owning("blob", net::DType::f32, {bytes / 4}, std::move(data)));
    const auto* raw_data = snap.tensors[0].data;
    uint64_t raw_sum = net::checksum(raw_data, bytes);

    int reps = mib == 256 ? 5 : mib == 16 ? 11 : 31;
    int inline_reps = mib == 256 ? 3 : 5;
    if (reps_scale == 0) reps = inline_reps = 1;
    std::vector<double> t_raw, t_fed, t_caf;
    auto timeout = std::chrono::milliseconds(120'000);
    for (int r = 0; r < reps + 1; ++r) {  // the first round warms up both paths and is not counted
      auto t0 = Clock::now();
      uint64_t header = bytes, sum = 0;
      if (!write_all(raw, &header, 8) || !write_all(raw, raw_data, bytes) || !read_all(raw, &sum, 8) ||
          sum != raw_sum) {
        std::cerr << "wire_bench: plain TCP transfer failed or checksum differs\n";
        return 1;
      }
      double raw_s = std::chrono::duration<double>(Clock::now() - t0).count();
      auto pushed = runtime::push_snapshot(node, shard, snap, timeout);
      if (!pushed.ok) {
        std::cerr << "wire_bench: fedmoe transfer failed: " << pushed.error << "\n";
        return 1;
      }
      if (r == 0) continue;
      t_raw.push_back(raw_s);
      t_fed.push_back(pushed.seconds);
    }
    for (int r = 0; r < inline_reps; ++r) {
      auto pushed = runtime::push_snapshot(inline_node, inline_shard, snap, timeout);
      if (!pushed.ok) {
        std::cerr << "wire_bench: CAF-only transfer failed: " << pushed.error << "\n";
        return 1;
      }
      t_caf.push_back(pushed.seconds);
    }
    double mb = bytes / 1e6;
    double raw_mbs = mb / median(t_raw), fed_mbs = mb / median(t_fed), caf_mbs = mb / median(t_caf);
    last_ratio = fed_mbs / raw_mbs;
    std::printf("%-8s %14.0f %14.0f %14.0f %10.2f %12.2f\n", (std::to_string(mib) + "MiB").c_str(), raw_mbs,
                fed_mbs, caf_mbs, last_ratio, caf_mbs / raw_mbs);
    std::fflush(stdout);
  }
  uint64_t end = 0;
  write_all(raw, &end, 8);
  ::close(raw);
  ::close(to_child[1]);
  int status = 0;
  ::waitpid(child, &status, 0);
  std::printf("wire ratio at 256MiB: %.2f\n", last_ratio);
  return 0;
}
