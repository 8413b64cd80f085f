#include "model/atomic_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <string>
#include <system_error>

namespace fedmoe::model {

namespace fs = std::filesystem;

namespace {

std::string errno_text(int err) { return std::generic_category().message(err); }

[[noreturn]] void fail(const fs::path& path, const std::string& problem) {
  throw std::runtime_error(path.string() + ": " + problem);
}

// Closes a descriptor on every path out of a scope.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

void write_all(int fd, const void* data, size_t n, std::string_view what) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    // Linux writes at most ~2 GiB per call; a large tensor takes several.
    ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string(what) + ": write failed: " + errno_text(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void write_file_atomically(const fs::path& path, const std::vector<FilePiece>& pieces) {
  std::string tmp = path.string() + ".tmp.XXXXXX";
  int fd = ::mkostemp(tmp.data(), O_CLOEXEC);
  if (fd < 0) fail(path, "cannot create a temporary file beside it: " + errno_text(errno));
  try {
    FdGuard guard{fd};
    // mkstemp creates 0600; a checkpoint is meant to be readable like any file save_pretrained writes.
    if (::fchmod(fd, 0644) != 0) fail(path, "fchmod of the temporary file failed: " + errno_text(errno));
    for (const auto& piece : pieces) write_all(fd, piece.data, piece.size, path.string());
    if (::fsync(fd) != 0) fail(path, "fsync failed: " + errno_text(errno));
    guard.fd = -1;
    if (::close(fd) != 0) fail(path, "close failed: " + errno_text(errno));
    if (::rename(tmp.c_str(), path.c_str()) != 0) fail(path, "rename from the temporary file failed: " + errno_text(errno));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  // The rename is durable only once the directory entry is.
  try {
    fsync_dir(path.parent_path());
  } catch (const std::runtime_error& e) {
    fail(path, e.what());
  }
}

void fsync_dir(const fs::path& dir) {
  const fs::path d = dir.empty() ? fs::path(".") : dir;
  int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open directory " + d.string() + " to fsync it: " + errno_text(errno));
  FdGuard guard{fd};
  if (::fsync(fd) != 0) throw std::runtime_error("fsync of directory " + d.string() + " failed: " + errno_text(errno));
}

}  // namespace fedmoe::model
