#include "actors/durable_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace fedmoe::actors {

namespace {

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void fsync_dir(const std::filesystem::path& dir) {
  const auto d = dir.empty() ? std::filesystem::path(".") : dir;
  int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + d.string() + " to flush it: " + errno_text());
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw std::runtime_error("cannot flush " + d.string() + ": " + std::strerror(err));
}

void write_file_durably(const std::filesystem::path& path, const std::string& text) {
  const auto tmp = path.string() + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + tmp + ": " + errno_text());
  const char* p = text.data();
  size_t left = text.size();
  std::string failure;
  while (left > 0 && failure.empty()) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) failure = "cannot write " + tmp + ": " + errno_text();
    else p += n, left -= static_cast<size_t>(n);
  }
  if (failure.empty() && ::fsync(fd) != 0) failure = "cannot flush " + tmp + ": " + errno_text();
  ::close(fd);
  if (failure.empty() && ::rename(tmp.c_str(), path.c_str()) != 0) failure = "cannot rename " + tmp + ": " + errno_text();
  if (!failure.empty()) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(failure);
  }
  fsync_dir(path.parent_path());
}

}  // namespace fedmoe::actors
