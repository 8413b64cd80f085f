#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "model/atomic_file.hpp"

namespace fedmoe::model {

namespace fs = std::filesystem;
using nlohmann::json;

// Tensor bytes are handed out as stored, and the format stores them little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

// The reference implementation's limit (MAX_HEADER_SIZE): it bounds what a hostile header can make
// the parser allocate.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";
constexpr const char* kSingleFileName = "model.safetensors";
constexpr const char* kIndexFileName = "model.safetensors.index.json";

struct DtypeInfo {
  SafetensorsDtype dtype;
  const char* name;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {SafetensorsDtype::BOOL, "BOOL", 1},       {SafetensorsDtype::U8, "U8", 1},
    {SafetensorsDtype::I8, "I8", 1},           {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1}, {SafetensorsDtype::I16, "I16", 2},
    {SafetensorsDtype::U16, "U16", 2},         {SafetensorsDtype::F16, "F16", 2},
    {SafetensorsDtype::BF16, "BF16", 2},       {SafetensorsDtype::I32, "I32", 4},
    {SafetensorsDtype::U32, "U32", 4},         {SafetensorsDtype::F32, "F32", 4},
    {SafetensorsDtype::I64, "I64", 8},         {SafetensorsDtype::U64, "U64", 8},
    {SafetensorsDtype::F64, "F64", 8},
};

// to_string and dtype_size index the table by enumerator value.
constexpr bool dtype_table_in_enum_order() {
  for (size_t i = 0; i < std::size(kDtypes); ++i)
    if (static_cast<size_t>(kDtypes[i].dtype) != i) return false;
  return true;
}
static_assert(dtype_table_in_enum_order());
static_assert(std::size(kDtypes) == static_cast<size_t>(SafetensorsDtype::F64) + 1);

[[noreturn]] void fail(const fs::path& path, const std::string& problem) {
  throw SafetensorsError("safetensors: " + path.string() + ": " + problem);
}

[[noreturn]] void fail_tensor(const fs::path& path, std::string_view tensor, const std::string& problem) {
  fail(path, "tensor '" + std::string(tensor) + "': " + problem);
}

std::string errno_text(int err) { return std::generic_category().message(err); }

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// numel * dtype size, or nullopt when either product leaves int64 (so numel() and nbytes both fit).
std::optional<uint64_t> byte_size(const std::vector<int64_t>& shape, SafetensorsDtype dtype) {
  int64_t numel = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(numel, d, &numel)) return std::nullopt;
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(dtype_size(dtype)), &nbytes)) return std::nullopt;
  return static_cast<uint64_t>(nbytes);
}

// Parses JSON and rejects duplicate keys at any level. nlohmann (like most parsers) silently keeps
// one of the duplicates, so a file naming a tensor twice would load whichever entry won; such a file
// is ambiguous and is rejected. Also rejects NUL bytes: nlohmann treats one as the end of input, so
// "{...}\0garbage" would otherwise parse. And stops at kMaxJsonDepth levels of nesting (serde_json's
// default limit, which the reference implementation inherits): each level costs nlohmann ~100 bytes
// of memory per byte of input, so a 100 MB header of brackets would take gigabytes.
json parse_json_strict(std::string_view text, const fs::path& path, const char* what) {
  constexpr size_t kMaxJsonDepth = 128;
  struct TooDeep {};
  if (text.find('\0') != std::string_view::npos) fail(path, std::string(what) + " contains a NUL byte");
  std::vector<std::set<std::string>> open_objects;  // keys seen so far in each object being parsed
  size_t nesting = 0;                               // objects and arrays open
  std::string top_key;                              // the top-level key whose value is being parsed
  std::string duplicate;                            // the first duplicate found
  auto callback = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (++nesting > kMaxJsonDepth) throw TooDeep{};
        if (event == json::parse_event_t::object_start) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end: open_objects.pop_back(); --nesting; break;
      case json::parse_event_t::array_end: --nesting; break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (open_objects.size() == 1) top_key = key;
        if (!open_objects.back().insert(key).second && duplicate.empty())
          duplicate = open_objects.size() == 1 ? "duplicate key '" + key + "'"
                                               : "duplicate key '" + key + "' inside '" + top_key + "'";
        break;
      }
      default: break;
    }
    return true;
  };
  json parsed;
  try {
    parsed = json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    fail(path, std::string(what) + " is not valid JSON: " + e.what());
  } catch (const TooDeep&) {
    fail(path, std::string(what) + " nests objects and arrays deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  }
  if (!duplicate.empty()) fail(path, std::string(what) + " has a " + duplicate);
  if (!parsed.is_object()) fail(path, std::string(what) + " is not a JSON object");
  return parsed;
}

// A tensor's header entry, checked against the data section; data_begin is relative to it.
struct ParsedEntry {
  TensorView view;  // data not yet set
  uint64_t data_begin = 0;
};

ParsedEntry parse_entry(const fs::path& path, const std::string& name, const json& value, uint64_t data_size) {
  if (!value.is_object()) fail_tensor(path, name, "entry is not a JSON object");
  ParsedEntry out;
  out.view.name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end()) fail_tensor(path, name, "missing \"dtype\"");
  if (!dtype_it->is_string()) fail_tensor(path, name, "\"dtype\" is not a string");
  const auto& dtype_name = dtype_it->get_ref<const std::string&>();
  auto dtype = dtype_from_string(dtype_name);
  if (!dtype) fail_tensor(path, name, "unknown dtype '" + dtype_name + "'");
  out.view.dtype = *dtype;

  auto shape_it = value.find("shape");
  if (shape_it == value.end()) fail_tensor(path, name, "missing \"shape\"");
  if (!shape_it->is_array()) fail_tensor(path, name, "\"shape\" is not an array");
  for (const auto& d : *shape_it) {
    if (d.is_number_unsigned()) {
      uint64_t dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(INT64_MAX))
        fail_tensor(path, name, "dimension " + std::to_string(dim) + " does not fit in int64");
      out.view.shape.push_back(static_cast<int64_t>(dim));
    } else if (d.is_number_integer()) {  // a signed integer here is negative: nlohmann parses the rest as unsigned
      fail_tensor(path, name, "negative dimension " + std::to_string(d.get<int64_t>()) + " in \"shape\"");
    } else {
      fail_tensor(path, name, "\"shape\" has an element that is not an integer: " + d.dump());
    }
  }
  auto nbytes = byte_size(out.view.shape, out.view.dtype);
  if (!nbytes)
    fail_tensor(path, name, "size of shape " + shape_text(out.view.shape) + " x " + dtype_name +
                                " overflows 64 bits");

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end()) fail_tensor(path, name, "missing \"data_offsets\"");
  const json& offsets = *offsets_it;
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    fail_tensor(path, name, "\"data_offsets\" is not [begin, end] with non-negative integers: " + offsets.dump());
  uint64_t begin = offsets[0].get<uint64_t>();
  uint64_t end = offsets[1].get<uint64_t>();
  std::string offsets_text = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
  if (begin > end) fail_tensor(path, name, offsets_text + " have begin > end");
  if (end > data_size)
    fail_tensor(path, name, offsets_text + " extend beyond the data section (" + std::to_string(data_size) + " bytes)");
  if (end - begin != *nbytes)
    fail_tensor(path, name, offsets_text + " span " + std::to_string(end - begin) + " bytes but shape " +
                                shape_text(out.view.shape) + " of " + dtype_name + " needs " + std::to_string(*nbytes));
  out.view.nbytes = static_cast<size_t>(*nbytes);
  out.data_begin = begin;
  return out;
}

// Closes a descriptor on every path out of a scope.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

// model/atomic_file's writer, its errors as SafetensorsError ("safetensors: PATH: what failed").
void write_checkpoint_file(const fs::path& path, const std::vector<FilePiece>& pieces) {
  try {
    write_file_atomically(path, pieces);
  } catch (const std::runtime_error& e) {
    throw SafetensorsError(std::string("safetensors: ") + e.what());
  }
}

// Name, shape and byte count checks shared by both writers.
void check_tensor_ref(const fs::path& path, const TensorRef& t) {
  if (t.name == kMetadataKey) fail_tensor(path, t.name, "the name is reserved for the metadata");
  for (int64_t d : t.shape)
    if (d < 0) fail_tensor(path, t.name, "negative dimension in shape " + shape_text(t.shape));
  auto nbytes = byte_size(t.shape, t.dtype);
  if (!nbytes) fail_tensor(path, t.name, "size of shape " + shape_text(t.shape) + " overflows 64 bits");
  if (*nbytes != t.nbytes)
    fail_tensor(path, t.name, "nbytes is " + std::to_string(t.nbytes) + " but shape " + shape_text(t.shape) + " of " +
                                  to_string(t.dtype) + " needs " + std::to_string(*nbytes));
  if (t.nbytes > 0 && t.data == nullptr) fail_tensor(path, t.name, "data is null");
}

std::string json_string(const fs::path& path, const std::string& s, const char* what) {
  try {
    return json(s).dump();
  } catch (const json::exception&) {
    fail(path, std::string(what) + " '" + s + "' is not valid UTF-8");
  }
}

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

// --- dtypes -----------------------------------------------------------------------------------------

const char* to_string(SafetensorsDtype dtype) { return kDtypes[static_cast<size_t>(dtype)].name; }

std::optional<SafetensorsDtype> dtype_from_string(std::string_view s) {
  for (const auto& info : kDtypes)
    if (s == info.name) return info.dtype;
  return std::nullopt;
}

size_t dtype_size(SafetensorsDtype dtype) { return kDtypes[static_cast<size_t>(dtype)].size; }

// --- TensorView ---------------------------------------------------------------------------------------

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated at open(): cannot overflow
  return n;
}

bool TensorView::aligned() const { return reinterpret_cast<uintptr_t>(data) % dtype_size(dtype) == 0; }

// --- SafetensorsFile ----------------------------------------------------------------------------------

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(errno));
  FdGuard guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, "fstat failed: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  const auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) fail(path, "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");

  // Owned by the shared_ptr from here, so every failure below unmaps.
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  void* base = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (base == MAP_FAILED) fail(path, "mmap failed: " + errno_text(errno));
  file->base_ = static_cast<const std::byte*>(base);
  file->size_ = file_size;

  uint64_t n = 0;
  std::memcpy(&n, base, 8);  // little-endian, as the host (static_assert above)
  if (n > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeaderBytes) + "-byte limit");
  if (n > file_size - 8)
    fail(path, "header length " + std::to_string(n) + " exceeds the " + std::to_string(file_size - 8) +
                   " bytes after the length field (file truncated?)");
  file->header_size_ = n;
  const uint64_t data_size = file_size - 8 - n;
  const std::byte* data_start = file->base_ + 8 + n;

  std::string_view text(reinterpret_cast<const char*>(file->base_) + 8, n);
  // The reference implementation requires this too; it also keeps leading junk out.
  if (text.empty() || text.front() != '{') fail(path, "header does not start with '{'");
  json header = parse_json_strict(text, path, "header");

  std::vector<ParsedEntry> parsed;
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) fail(path, "\"__metadata__\" is not a JSON object");
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string()) fail(path, "\"__metadata__\" value of '" + key + "' is not a string: " + v.dump());
        file->metadata_[key] = v.get<std::string>();
      }
      continue;
    }
    parsed.push_back(parse_entry(path, name, value, data_size));
  }

  // File order: by offset, then by end so a zero-size tensor precedes a non-empty one at the same
  // begin, then by name for determinism.
  std::sort(parsed.begin(), parsed.end(), [](const ParsedEntry& a, const ParsedEntry& b) {
    return std::tie(a.data_begin, a.view.nbytes, a.view.name) < std::tie(b.data_begin, b.view.nbytes, b.view.name);
  });
  uint64_t covered = 0;  // the data section is covered up to here by the tensors so far
  const std::string* previous = nullptr;
  for (auto& e : parsed) {
    if (e.data_begin > covered)
      fail_tensor(path, e.view.name, "gap of " + std::to_string(e.data_begin - covered) +
                                         " bytes before it in the data section (tensors must be contiguous)");
    if (e.data_begin < covered)
      fail_tensor(path, e.view.name, "overlaps tensor '" + *previous + "' (begins at " + std::to_string(e.data_begin) +
                                         ", which ends at " + std::to_string(covered) + ")");
    covered = e.data_begin + e.view.nbytes;
    previous = &e.view.name;
  }
  if (covered != data_size)
    fail(path, std::to_string(data_size - covered) + " trailing bytes of the data section are not covered by any tensor");

  file->entries_.reserve(parsed.size());
  for (auto& e : parsed) {
    e.view.data = data_start + e.data_begin;
    file->index_.emplace(e.view.name, file->entries_.size());
    file->entries_.push_back(std::move(e.view));
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) ::munmap(const_cast<std::byte*>(base_), size_);
}

TensorView SafetensorsFile::view(size_t i) const {
  TensorView v = entries_[i];
  v.file = shared_from_this();
  return v;
}

std::vector<TensorView> SafetensorsFile::tensors() const {
  std::vector<TensorView> out;
  out.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) out.push_back(view(i));
  return out;
}

std::optional<TensorView> SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return std::nullopt;
  return view(it->second);
}

TensorView SafetensorsFile::at(std::string_view name) const {
  auto v = find(name);
  if (!v) fail_tensor(path_, name, "no such tensor");
  return *v;
}

// --- SafetensorsCheckpoint ----------------------------------------------------------------------------

SafetensorsCheckpoint SafetensorsCheckpoint::open(const fs::path& path) {
  SafetensorsCheckpoint ckpt;
  std::error_code ec;
  fs::path single;
  fs::path index;
  if (fs::is_directory(path, ec)) {
    if (fs::exists(path / kSingleFileName, ec))
      single = path / kSingleFileName;
    else if (fs::exists(path / kIndexFileName, ec))
      index = path / kIndexFileName;
    else
      fail(path, std::string("directory has neither ") + kSingleFileName + " nor " + kIndexFileName);
  } else if (path.extension() == ".json") {
    index = path;
  } else {
    single = path;
  }

  if (!single.empty()) {
    ckpt.path_ = single;
    auto file = SafetensorsFile::open(single);
    for (const auto& v : file->tensors()) ckpt.shard_of_.emplace(v.name, 0);
    ckpt.shards_.push_back(std::move(file));
    return ckpt;
  }

  ckpt.path_ = index;
  std::ifstream in(index, std::ios::binary);
  if (!in) fail(index, "cannot open: " + errno_text(errno));
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) fail(index, "read failed");
  std::string text = buffer.str();
  json doc = parse_json_strict(text, index, "index");
  auto map_it = doc.find("weight_map");
  if (map_it == doc.end() || !map_it->is_object()) fail(index, "\"weight_map\" is missing or not a JSON object");

  std::map<std::string, std::string, std::less<>> shard_name_of;  // the weight_map, checked
  std::set<std::string> shard_names;                              // sorted: shard order
  for (const auto& [tensor, shard] : map_it->items()) {
    if (!shard.is_string()) fail_tensor(index, tensor, "weight_map value is not a string: " + shard.dump());
    const auto& shard_name = shard.get_ref<const std::string&>();
    if (!is_plain_file_name(shard_name))
      fail_tensor(index, tensor, "shard '" + shard_name + "' is not a plain file name in the index's directory");
    shard_name_of.emplace(tensor, shard_name);
    shard_names.insert(shard_name);
  }

  const fs::path dir = index.parent_path();
  for (const auto& shard_name : shard_names) {
    auto file = SafetensorsFile::open(dir / shard_name);
    for (const auto& v : file->tensors()) {
      auto listed = shard_name_of.find(v.name);
      if (listed == shard_name_of.end())
        fail_tensor(index, v.name, "is in shard '" + shard_name + "' but not in the weight_map");
      if (listed->second != shard_name)
        fail_tensor(index, v.name, "is in shard '" + shard_name + "' but the weight_map puts it in '" +
                                       listed->second + "' (a tensor must be in exactly one shard)");
      ckpt.shard_of_.emplace(v.name, ckpt.shards_.size());
    }
    ckpt.shards_.push_back(std::move(file));
  }
  // Every tensor found matched its weight_map entry, so any entry left unmatched is missing.
  for (const auto& [tensor, shard_name] : shard_name_of)
    if (!ckpt.contains(tensor)) fail_tensor(index, tensor, "is listed in shard '" + shard_name + "' but is not in it");
  return ckpt;
}

std::vector<TensorView> SafetensorsCheckpoint::tensors() const {
  std::vector<TensorView> out;
  out.reserve(size());
  for (const auto& shard : shards_) {
    auto views = shard->tensors();
    std::move(views.begin(), views.end(), std::back_inserter(out));
  }
  return out;
}

std::optional<TensorView> SafetensorsCheckpoint::find(std::string_view name) const {
  auto it = shard_of_.find(name);
  if (it == shard_of_.end()) return std::nullopt;
  return shards_[it->second]->find(name);
}

TensorView SafetensorsCheckpoint::at(std::string_view name) const {
  auto v = find(name);
  if (!v) fail_tensor(path_, name, "no such tensor");
  return *v;
}

// --- writers ------------------------------------------------------------------------------------------

void write_safetensors(const fs::path& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // The header is assembled as text rather than as a json object so entries keep the given order
  // (nlohmann::json sorts keys; ordered_json looks keys up linearly).
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (header.back() != '{') header += ',';
      header += json_string(path, key, "metadata key");
      header += ':';
      header += json_string(path, value, "metadata value");
    }
    header += '}';
  }
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    check_tensor_ref(path, t);
    if (!names.insert(t.name).second) fail_tensor(path, t.name, "duplicate tensor name");
    if (header.size() > 1) header += ',';
    header += json_string(path, t.name, "tensor name");
    header += ":{\"dtype\":\"";
    header += to_string(t.dtype);
    header += "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.nbytes) + "]}";
    offset += t.nbytes;
  }
  header += "}";
  // Pad with spaces (JSON whitespace) so the data section starts 8-byte aligned, as the Python
  // implementation does.
  header.resize((header.size() + 7) / 8 * 8, ' ');
  if (header.size() > kMaxHeaderBytes)
    fail(path, "header would be " + std::to_string(header.size()) + " bytes, over the " +
                   std::to_string(kMaxHeaderBytes) + "-byte limit readers enforce");

  const uint64_t n = header.size();  // written as little-endian, as the host (static_assert above)
  std::vector<FilePiece> pieces{{&n, sizeof n}, {header.data(), header.size()}};
  for (const auto& t : tensors) pieces.push_back({t.data, t.nbytes});
  write_checkpoint_file(path, pieces);
}

std::vector<fs::path> write_sharded(const fs::path& dir, const std::vector<TensorRef>& tensors,
                                    uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  // Checked up front: a name repeated in two shards would not be caught by write_safetensors, and
  // nothing should be written for invalid input.
  std::set<std::string_view> names;
  for (const auto& t : tensors) {
    check_tensor_ref(dir, t);
    if (!names.insert(t.name).second) fail_tensor(dir, t.name, "duplicate tensor name");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(dir, "cannot create the directory: " + ec.message());

  std::vector<size_t> shard_starts{0};  // index into `tensors` where each shard begins
  uint64_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (i > shard_starts.back() && shard_bytes + tensors[i].nbytes > max_shard_bytes) {
      shard_starts.push_back(i);
      shard_bytes = 0;
    }
    shard_bytes += tensors[i].nbytes;
    total_bytes += tensors[i].nbytes;
  }

  auto remove_stale = [&](const fs::path& stale) {
    fs::remove(stale, ec);
    if (ec) fail(stale, "cannot remove the stale file: " + ec.message());
  };
  if (shard_starts.size() == 1) {
    write_safetensors(dir / kSingleFileName, tensors, metadata);
    remove_stale(dir / kIndexFileName);
    return {dir / kSingleFileName};
  }

  std::vector<fs::path> written;
  json weight_map = json::object();
  const size_t count = shard_starts.size();
  for (size_t s = 0; s < count; ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, count);
    const size_t end = s + 1 < count ? shard_starts[s + 1] : tensors.size();
    std::vector<TensorRef> shard(tensors.begin() + static_cast<ptrdiff_t>(shard_starts[s]),
                                 tensors.begin() + static_cast<ptrdiff_t>(end));
    write_safetensors(dir / name, shard, metadata);
    for (const auto& t : shard) weight_map[t.name] = name;
    written.push_back(dir / name);
  }
  // transformers' layout: metadata.total_size (tensor bytes, not file sizes) and a sorted weight_map.
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", std::move(weight_map)}};
  std::string text = index.dump(2) + "\n";
  write_checkpoint_file(dir / kIndexFileName, {{text.data(), text.size()}});
  written.push_back(dir / kIndexFileName);
  remove_stale(dir / kSingleFileName);
  return written;
}

}  // namespace fedmoe::model
