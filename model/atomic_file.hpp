// Files that must survive a crash whole (checkpoints, a coordinator's state, a shard's id window):
// written to a temporary file beside the target, fsynced, renamed over it, and the directory fsynced,
// so readers and a restart see the old content or the whole new one, never half of one, and a rename
// that returned is never lost. Torch-free (part of fedmoe_safetensors).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string_view>
#include <vector>

namespace fedmoe::model {

struct FilePiece {
  const void* data;
  size_t size;
};

// Writes the pieces, in order, to `path` atomically and durably (mode 0644). Throws
// std::runtime_error "PATH: what failed: why"; the temporary file is removed on failure.
void write_file_atomically(const std::filesystem::path& path, const std::vector<FilePiece>& pieces);
inline void write_file_atomically(const std::filesystem::path& path, std::string_view text) {
  write_file_atomically(path, {{text.data(), text.size()}});
}

// Writes all `n` bytes to `fd` (retrying short writes and EINTR). Throws std::runtime_error
// "WHAT: write failed: why".
void write_all(int fd, const void* data, size_t n, std::string_view what);

// Makes the entries of `dir` (files created or renamed in it) durable. Throws std::runtime_error.
void fsync_dir(const std::filesystem::path& dir);

}  // namespace fedmoe::model
