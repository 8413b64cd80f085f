// Small files that must survive a crash whole (the coordinator's state, a shard's id window): written
// to a temporary file, fsynced, renamed over the old one, and the directory fsynced, so a crash leaves
// the old or the new content, never half of one, and never loses a rename it acknowledged.
#pragma once

#include <filesystem>
#include <string>

namespace fedmoe::actors {

// Replaces `path` with `text` atomically and durably. Throws std::runtime_error naming the file.
void write_file_durably(const std::filesystem::path& path, const std::string& text);

// Makes the entries of `dir` (files created or renamed in it) durable. Throws std::runtime_error.
void fsync_dir(const std::filesystem::path& dir);

}  // namespace fedmoe::actors
