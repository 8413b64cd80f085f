// safetensors files: a zero-copy mmap reader, an atomic writer, and Hugging Face sharded
// checkpoints (model.safetensors.index.json). Torch-free, so it builds and tests alone; the model
// code turns a TensorView into a tensor with torch::from_blob.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
//   {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {str: str}}
// then the data section; offsets are relative to its start, and the tensors, sorted by offset,
// cover it exactly once (contiguous, no overlap, no gap, nothing after the last). Data is stored
// little-endian, row-major, with no padding between tensors.
//
// Keys other than those three in a tensor entry are ignored, as the reference implementation does.
// The whole header is checked at open() (the reference implementation's checks, plus duplicate keys
// and NUL bytes), so a corrupt or truncated file is a SafetensorsError naming the file, the tensor
// where there is one, and the problem; it is never read out of bounds. (A file truncated by someone
// else *after* open() still raises SIGBUS on access, as with any mapping: replace files by rename,
// as write_safetensors does, never rewrite them in place.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fedmoe::model {

class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The safetensors dtypes with a fixed element size. (The sub-byte and exotic float formats some
// newer writers use are rejected as unknown dtypes.)
enum class SafetensorsDtype : uint8_t {
  BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64,
};

const char* to_string(SafetensorsDtype dtype);                          // "F32", ...
std::optional<SafetensorsDtype> dtype_from_string(std::string_view s);  // exact, case-sensitive
size_t dtype_size(SafetensorsDtype dtype);                              // bytes per element

class SafetensorsFile;

// One tensor of an open file. `data` points into the file's read-only mapping (never copied), and
// `file` keeps that mapping alive as long as the view (or a copy of `file`) exists: capture it in
// torch::from_blob's deleter to make a tensor that borrows the file.
struct TensorView {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape;     // [] for a scalar; dims may be 0
  const std::byte* data = nullptr;
  size_t nbytes = 0;              // == numel() * dtype_size(dtype)
  std::shared_ptr<const SafetensorsFile> file;

  int64_t numel() const;
  // Whether `data` is aligned to the element size. The format has no padding, so a file that mixes
  // dtypes may place e.g. an F32 tensor at an odd offset (our writer keeps the caller's order; the
  // Python library sorts by alignment first to avoid this). Copy before handing such data to code
  // that needs aligned loads.
  bool aligned() const;
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  // Maps `path` read-only (MAP_PRIVATE) and validates the whole header. Throws SafetensorsError.
  static std::shared_ptr<const SafetensorsFile> open(const std::filesystem::path& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"
  size_t size() const { return entries_.size(); }
  // All tensors in file order (by data offset; ties, which only zero-size tensors can have, by name).
  std::vector<TensorView> tensors() const;
  std::optional<TensorView> find(std::string_view name) const;
  TensorView at(std::string_view name) const;  // throws SafetensorsError naming the file and tensor
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  // The whole mapped file, and N (the JSON header's length): tensor data starts at 8 + N.
  std::span<const std::byte> bytes() const { return {base_, size_}; }
  uint64_t header_size() const { return header_size_; }

 private:
  SafetensorsFile() = default;
  TensorView view(size_t i) const;

  std::filesystem::path path_;
  const std::byte* base_ = nullptr;
  size_t size_ = 0;
  uint64_t header_size_ = 0;
  std::map<std::string, std::string> metadata_;
  // The views without `file` (a view holding its own file would be a reference cycle); view() fills
  // it in when handing one out.
  std::vector<TensorView> entries_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in entries_
};

// A model directory: either one model.safetensors, or shards listed by model.safetensors.index.json
// ({"metadata": {"total_size": ..}, "weight_map": {tensor: shard file name}}). The index must describe
// the shards exactly: every listed tensor is in the shard it names, every tensor of a listed shard is
// listed (so no tensor is in two shards), and shard names are plain file names in the same directory.
class SafetensorsCheckpoint {
 public:
  // `path`: a directory (model.safetensors is used when present, as transformers does, else
  // model.safetensors.index.json), an index .json file, or a single .safetensors file.
  static SafetensorsCheckpoint open(const std::filesystem::path& path);

  const std::vector<std::shared_ptr<const SafetensorsFile>>& shards() const { return shards_; }
  size_t size() const { return shard_of_.size(); }
  // Shards in file-name order, each in file order.
  std::vector<TensorView> tensors() const;
  std::optional<TensorView> find(std::string_view name) const;
  TensorView at(std::string_view name) const;  // throws SafetensorsError naming the checkpoint and tensor
  bool contains(std::string_view name) const { return shard_of_.find(name) != shard_of_.end(); }

 private:
  std::filesystem::path path_;
  std::vector<std::shared_ptr<const SafetensorsFile>> shards_;
  std::map<std::string, size_t, std::less<>> shard_of_;  // name -> position in shards_
};

// A tensor to write: the caller's bytes (little-endian, row-major), borrowed for the call.
struct TensorRef {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;  // must equal numel * dtype_size(dtype)
};

// Writes one safetensors file. Data offsets follow the order of `tensors` (no reordering, so mixed
// dtypes may end up unaligned: see TensorView::aligned); the header lists "__metadata__" (when
// non-empty) and then the tensors in that order, padded with spaces to a multiple of 8 bytes as the
// Python implementation does. Atomic: a temporary file in the same directory is written, fsynced and
// renamed over `path`, then the directory is fsynced. New files get mode 0644. Throws
// SafetensorsError naming the path (and the tensor for invalid input: duplicate or reserved name,
// negative dim, nbytes that does not match the shape, null data).
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `tensors` into directory `dir` (created if missing), as transformers' save_pretrained does:
// tensors fill shards in the given order, a new shard starting when the next tensor would take the
// current one past max_shard_bytes (a tensor larger than that gets a shard of its own). One shard is
// written as dir/model.safetensors; more as dir/model-00001-of-0000N.safetensors ... plus
// dir/model.safetensors.index.json (metadata.total_size = sum of tensor bytes). `metadata` goes into
// every shard's header. The other layout's entry file (a stale index, or a stale model.safetensors
// that open() would prefer) is removed afterwards. Returns the files written, index last.
std::vector<std::filesystem::path> write_sharded(const std::filesystem::path& dir, const std::vector<TensorRef>& tensors,
                                                 uint64_t max_shard_bytes,
                                                 const std::map<std::string, std::string>& metadata = {});

}  // namespace fedmoe::model
