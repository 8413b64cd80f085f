// safetensors reader, writer and sharded checkpoints: round trips, the zero-copy property, every
// validation error, truncation and random header corruption, and interop with an independent Python
// implementation (tests/reference/safetensors_check.py).
#include <sys/wait.h>
#include <unistd.h>

#include <bit>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "model/safetensors.hpp"

namespace fs = std::filesystem;
using namespace fedmoe::model;
using Catch::Matchers::Contains;

namespace {

// A fresh directory under the system temp dir, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "fedmoe-st-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

// --- the shared test table: keep in sync with CASES / METADATA / value() in reference/safetensors_check.py

struct Case {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
};

const std::vector<Case> kCases = {
    {"model.embed_tokens.weight", SafetensorsDtype::BF16, {4, 3}},
    {"model.layers.0.self_attn.q_proj.weight", SafetensorsDtype::F16, {2, 3}},
    {"model.layers.0.self_attn.q_proj.bias", SafetensorsDtype::F32, {6}},
    {"model.norm.weight", SafetensorsDtype::F64, {2, 2}},
    {"step", SafetensorsDtype::I64, {}},
    {"ids", SafetensorsDtype::I32, {2, 2, 2}},
    {"i16", SafetensorsDtype::I16, {3}},
    {"i8", SafetensorsDtype::I8, {5}},
    {"u8", SafetensorsDtype::U8, {7}},
    {"u16", SafetensorsDtype::U16, {3}},
    {"u32", SafetensorsDtype::U32, {2}},
    {"u64", SafetensorsDtype::U64, {2}},
    {"mask", SafetensorsDtype::BOOL, {2, 3}},
    {"f8.e5m2", SafetensorsDtype::F8_E5M2, {3}},
    {"f8.e4m3", SafetensorsDtype::F8_E4M3, {3}},
    {"empty", SafetensorsDtype::F32, {0, 4}},
    {"empty.i64", SafetensorsDtype::I64, {3, 0, 2}},
    {"emb.\xc3\xbc", SafetensorsDtype::F32, {2}},  // "emb.ü": the Python writer escapes it as \u00fc
};

const std::map<std::string, std::string> kMetadata = {{"format", "pt"},
                                                      {"note", "\xc3\xbc \xe2\x9c\x93 \"quoted\""}};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

template <class T>
void put(std::vector<std::byte>& out, T v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

// IEEE half of a float that is exactly a normal half or zero (all the table's values are).
uint16_t exact_half(float f) {
  uint32_t b = std::bit_cast<uint32_t>(f);
  auto sign = static_cast<uint16_t>((b >> 16) & 0x8000);
  if ((b & 0x7fffffff) == 0) return sign;
  int exponent = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exponent << 10) | ((b >> 13) & 0x3ff));
}

// The elements value() in the Python script defines, as little-endian bytes.
std::vector<std::byte> expected_bytes(SafetensorsDtype dtype, int64_t n) {
  std::vector<std::byte> out;
  for (int64_t k = 0; k < n; ++k) {
    switch (dtype) {
      case SafetensorsDtype::F32: put<float>(out, static_cast<float>(k - 3) * 0.25f); break;
      case SafetensorsDtype::F64: put<double>(out, static_cast<double>(k) * 1.5 - 2); break;
      case SafetensorsDtype::F16: put<uint16_t>(out, exact_half(static_cast<float>(k - 2) * 0.5f)); break;
      case SafetensorsDtype::BF16:
        put<uint16_t>(out, static_cast<uint16_t>(std::bit_cast<uint32_t>(static_cast<float>(k - 2) * 0.75f) >> 16));
        break;
      case SafetensorsDtype::I64: put<int64_t>(out, (k - 5) * 1000000007LL); break;
      case SafetensorsDtype::I32: put<int32_t>(out, static_cast<int32_t>((k - 5) * 100003)); break;
      case SafetensorsDtype::I16: put<int16_t>(out, static_cast<int16_t>((k - 5) * 301)); break;
      case SafetensorsDtype::I8: put<int8_t>(out, static_cast<int8_t>((k - 5) * 7)); break;
      case SafetensorsDtype::U8: put<uint8_t>(out, static_cast<uint8_t>((k * 37) % 256)); break;
      case SafetensorsDtype::U16: put<uint16_t>(out, static_cast<uint16_t>((k * 1001) % 65536)); break;
      case SafetensorsDtype::U32:  // (k * 100000007) mod 2^32: the cast wraps
        put<uint32_t>(out, static_cast<uint32_t>(static_cast<uint64_t>(k) * 100000007u));
        break;
      case SafetensorsDtype::U64: put<uint64_t>(out, (static_cast<uint64_t>(k) << 40) + 7); break;
      case SafetensorsDtype::BOOL: put<uint8_t>(out, k % 3 == 0 ? 1 : 0); break;
      case SafetensorsDtype::F8_E5M2:
      case SafetensorsDtype::F8_E4M3: put<uint8_t>(out, static_cast<uint8_t>((k * 29 + 3) % 256)); break;
    }
  }
  return out;
}

// The table's tensors, with their bytes kept alive for the writer.
struct CaseData {
  std::vector<std::vector<std::byte>> bytes;
  std::vector<TensorRef> refs;
  explicit CaseData(const std::vector<Case>& cases) {
    bytes.reserve(cases.size());
    for (const auto& c : cases) {
      bytes.push_back(expected_bytes(c.dtype, numel(c.shape)));
      refs.push_back({c.name, c.dtype, c.shape, bytes.back().data(), bytes.back().size()});
    }
  }
};

std::vector<std::byte> view_bytes(const TensorView& v) { return {v.data, v.data + v.nbytes}; }

// Checks that `lookup(name)` finds every case with the table's dtype, shape and bytes.
template <class Lookup>
void check_cases(const std::vector<Case>& cases, Lookup lookup) {
  for (const auto& c : cases) {
    INFO("tensor " << c.name);
    TensorView v = lookup(c.name);
    CHECK(v.name == c.name);
    CHECK(v.dtype == c.dtype);
    CHECK(v.shape == c.shape);
    CHECK(v.numel() == numel(c.shape));
    CHECK(v.nbytes == static_cast<size_t>(numel(c.shape)) * dtype_size(c.dtype));
    CHECK(view_bytes(v) == expected_bytes(c.dtype, numel(c.shape)));
  }
}

std::vector<std::byte> read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

void write_bytes(const fs::path& path, const void* data, size_t n) {
  // Unlink first: ext4 flushes a file truncated and rewritten in place (auto_da_alloc), which makes
  // the thousands of rewrites below take seconds.
  fs::remove(path);
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  REQUIRE(out.good());
}

// A file with header length `n` (the header's own length unless given), `header`, and `data_size`
// bytes of data.
void write_raw(const fs::path& path, const std::string& header, size_t data_size,
               std::optional<uint64_t> n = std::nullopt) {
  std::string bytes(8, '\0');
  uint64_t len = n.value_or(header.size());
  std::memcpy(bytes.data(), &len, 8);
  bytes += header;
  bytes.append(data_size, '\x5a');
  write_bytes(path, bytes.data(), bytes.size());
}

// The SafetensorsError message of opening `path`; fails the test on success or on any other exception.
std::string open_error(const fs::path& path) {
  try {
    SafetensorsFile::open(path);
  } catch (const SafetensorsError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("not a SafetensorsError: " << e.what());
  }
  FAIL("opened without error: " << path);
  return {};
}

std::string checkpoint_error(const fs::path& path) {
  try {
    SafetensorsCheckpoint::open(path);
  } catch (const SafetensorsError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("not a SafetensorsError: " << e.what());
  }
  FAIL("opened without error: " << path);
  return {};
}

std::string write_error(const fs::path& path, const std::vector<TensorRef>& tensors) {
  try {
    write_safetensors(path, tensors);
  } catch (const SafetensorsError& e) {
    return e.what();
  }
  FAIL("written without error: " << path);
  return {};
}

// --- the Python reference ---------------------------------------------------------------------------

const fs::path kReferenceScript = fs::path(__FILE__).parent_path() / "reference" / "safetensors_check.py";

// Runs the reference script; true when it exits 0. `quiet` drops its complaint, for runs meant to fail.
bool reference(const std::string& command, const fs::path& target, bool quiet = false) {
  INFO("__FILE__ must be absolute (a ccache base_dir would make it relative): " << kReferenceScript);
  REQUIRE(fs::exists(kReferenceScript));
  std::string line = "/usr/bin/python3 '" + kReferenceScript.string() + "' " + command + " '" + target.string() + "'" +
                     (quiet ? " 2>/dev/null" : "");
  int status = std::system(line.c_str());
  return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

TEST_CASE("dtype names and sizes", "[safetensors]") {
  const std::pair<const char*, size_t> expected[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"I64", 8},     {"U64", 8}, {"F64", 8},
  };
  for (const auto& [name, size] : expected) {
    auto dtype = dtype_from_string(name);
    REQUIRE(dtype);
    CHECK(std::string(to_string(*dtype)) == name);
    CHECK(dtype_size(*dtype) == size);
  }
  CHECK_FALSE(dtype_from_string("f32"));
  CHECK_FALSE(dtype_from_string("F4"));
  CHECK_FALSE(dtype_from_string(""));
}

TEST_CASE("write then read every dtype, scalars, zero-size dims and metadata", "[safetensors]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto path = dir / "all.safetensors";
  write_safetensors(path, cases.refs, kMetadata);

  auto file = SafetensorsFile::open(path);
  CHECK(file->path() == path);
  CHECK(file->metadata() == kMetadata);
  REQUIRE(file->size() == kCases.size());
  check_cases(kCases, [&](const std::string& name) { return file->at(name); });

  // File order is offset order; the writer keeps the given order, which here is also offset order
  // (the zero-size tensors sort by name among themselves and before the non-empty one at their offset).
  auto views = file->tensors();
  REQUIRE(views.size() == kCases.size());
  for (size_t i = 0; i < views.size(); ++i) CHECK(views[i].name == kCases[i].name);

  // Values, not only bytes: the scalar and a float tensor as the loader will interpret them.
  auto step = file->at("step");
  CHECK(step.shape.empty());
  CHECK(step.numel() == 1);
  int64_t step_value = 0;
  std::memcpy(&step_value, step.data, 8);
  CHECK(step_value == -5 * 1000000007LL);
  auto bias = file->at("model.layers.0.self_attn.q_proj.bias");
  float bias_values[6];
  std::memcpy(bias_values, bias.data, sizeof bias_values);
  CHECK(bias_values[0] == -0.75f);
  CHECK(bias_values[5] == 0.5f);
  CHECK(file->at("empty").nbytes == 0);
  CHECK(file->at("empty.i64").numel() == 0);

  CHECK(file->contains("step"));
  CHECK_FALSE(file->contains("nope"));
  CHECK_FALSE(file->find("nope"));
  CHECK_THROWS_WITH(file->at("nope"), Contains(path.string()) && Contains("'nope'") && Contains("no such tensor"));
}

TEST_CASE("an empty tensor list writes and reads back", "[safetensors]") {
  TempDir dir;
  write_safetensors(dir / "none.safetensors", {});
  auto file = SafetensorsFile::open(dir / "none.safetensors");
  CHECK(file->size() == 0);
  CHECK(file->metadata().empty());
  CHECK(file->bytes().size() == 16);  // length + "{}" padded to 8
}

TEST_CASE("views are zero-copy into the mapping and keep it alive", "[safetensors]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto path = dir / "zc.safetensors";
  write_safetensors(path, cases.refs, kMetadata);

  // N and each tensor's begin, computed from the raw file and the given order, not from the reader.
  auto raw = read_all(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  auto file = SafetensorsFile::open(path);
  CHECK(file->header_size() == n);
  auto mapping = file->bytes();
  REQUIRE(mapping.size() == raw.size());
  uint64_t begin = 0;
  for (const auto& c : cases.refs) {
    INFO("tensor " << c.name);
    auto v = file->at(c.name);
    CHECK(v.data == mapping.data() + 8 + n + begin);
    CHECK(v.data + v.nbytes <= mapping.data() + mapping.size());
    CHECK(v.file == file);
    begin += c.nbytes;
  }
  CHECK(8 + n + begin == raw.size());

  // The header is padded to 8 bytes, so the first tensor is aligned; the F64 after BF16+F16+F32
  // (24 + 12 + 24 bytes) is not.
  CHECK(file->at("model.embed_tokens.weight").aligned());
  CHECK_FALSE(file->at("model.norm.weight").aligned());

  // A view outlives the caller's handle: the mapping stays until the last view goes.
  std::weak_ptr<const SafetensorsFile> weak = file;
  auto bias = file->at("model.layers.0.self_attn.q_proj.bias");
  file.reset();
  REQUIRE_FALSE(weak.expired());
  CHECK(view_bytes(bias) == expected_bytes(SafetensorsDtype::F32, 6));
  bias = TensorView{};
  CHECK(weak.expired());
}

TEST_CASE("the writer pads the header with spaces and keeps the given order", "[safetensors]") {
  TempDir dir;
  const float a[3] = {1, 2, 3};
  const int64_t b = 42;
  const auto path = dir / "order.safetensors";
  write_safetensors(path, {{"z", SafetensorsDtype::F32, {3}, a, sizeof a}, {"a", SafetensorsDtype::I64, {}, &b, 8}},
                    {{"k", "v"}});
  auto raw = read_all(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  CHECK(n % 8 == 0);
  std::string header(reinterpret_cast<const char*>(raw.data()) + 8, n);
  CHECK(header.rfind("{\"__metadata__\":{\"k\":\"v\"},\"z\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                     "\"a\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[12,20]}}",
                     0) == 0);
  auto end = header.find_last_not_of(' ');
  CHECK(header[end] == '}');
  CHECK(header.size() - end - 1 < 8);
  auto file = SafetensorsFile::open(path);
  CHECK(file->tensors()[0].name == "z");
  CHECK(file->tensors()[1].name == "a");
}

TEST_CASE("the writer rejects invalid input, naming the path and the tensor, and writes nothing", "[safetensors]") {
  TempDir dir;
  const auto path = dir / "bad.safetensors";
  const float x[4] = {};
  using D = SafetensorsDtype;
  CHECK_THAT(write_error(path, {{"w", D::F32, {4}, x, 16}, {"w", D::F32, {4}, x, 16}}),
             Contains(path.string()) && Contains("'w'") && Contains("duplicate tensor name"));
  CHECK_THAT(write_error(path, {{"__metadata__", D::F32, {4}, x, 16}}),
             Contains(path.string()) && Contains("'__metadata__'") && Contains("reserved"));
  CHECK_THAT(write_error(path, {{"neg", D::F32, {-1, 4}, x, 16}}),
             Contains(path.string()) && Contains("'neg'") && Contains("negative dimension"));
  CHECK_THAT(write_error(path, {{"short", D::F32, {5}, x, 16}}),
             Contains(path.string()) && Contains("'short'") && Contains("nbytes is 16") && Contains("needs 20"));
  CHECK_THAT(write_error(path, {{"huge", D::F32, {int64_t{1} << 40, int64_t{1} << 40}, x, 16}}),
             Contains(path.string()) && Contains("'huge'") && Contains("overflows"));
  CHECK_THAT(write_error(path, {{"null", D::F32, {4}, nullptr, 16}}),
             Contains(path.string()) && Contains("'null'") && Contains("data is null"));
  CHECK_THAT(write_error(path, {{"bad\xff", D::F32, {4}, x, 16}}),
             Contains(path.string()) && Contains("not valid UTF-8"));
  CHECK(fs::is_empty(dir.path));  // no file, no leftover temporary

  const auto nowhere = dir / "missing" / "x.safetensors";
  CHECK_THAT(write_error(nowhere, {{"w", D::F32, {4}, x, 16}}),
             Contains(nowhere.string()) && Contains("temporary file"));
}

TEST_CASE("the writer replaces a file atomically", "[safetensors]") {
  TempDir dir;
  const auto path = dir / "w.safetensors";
  const float first[2] = {1, 2};
  const float second[3] = {3, 4, 5};
  write_safetensors(path, {{"t", SafetensorsDtype::F32, {2}, first, sizeof first}});
  auto old_file = SafetensorsFile::open(path);
  write_safetensors(path, {{"t", SafetensorsDtype::F32, {3}, second, sizeof second}});
  // The old mapping still sees the old inode; a new open sees the new file.
  auto old_view = old_file->at("t");
  CHECK(old_view.shape == std::vector<int64_t>{2});
  CHECK(std::memcmp(old_view.data, first, sizeof first) == 0);
  auto new_view = SafetensorsFile::open(path)->at("t");
  CHECK(new_view.shape == std::vector<int64_t>{3});
  CHECK(std::memcmp(new_view.data, second, sizeof second) == 0);
  CHECK((fs::status(path).permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write |
                                                             fs::perms::group_read | fs::perms::others_read));
  size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path)) ++entries;
  CHECK(entries == 1);
}

TEST_CASE("sharded write then open gives the same tensors", "[safetensors]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto model = dir / "model";
  // 40-byte shards: the table's tensors (24, 12, 24, 32, 8, 32, ... bytes) need six.
  auto written = write_sharded(model, cases.refs, 40, kMetadata);
  REQUIRE(written.size() >= 4);
  const size_t shard_count = written.size() - 1;
  for (size_t i = 0; i < shard_count; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shard_count);
    CHECK(written[i] == model / name);
    CHECK(fs::exists(written[i]));
  }
  CHECK(written.back() == model / "model.safetensors.index.json");
  CHECK_FALSE(fs::exists(model / "model.safetensors"));

  // The index names total_size = all tensor bytes.
  std::ifstream index_in(written.back());
  std::stringstream index_text;
  index_text << index_in.rdbuf();
  size_t total = 0;
  for (const auto& r : cases.refs) total += r.nbytes;
  CHECK_THAT(index_text.str(), Contains("\"total_size\": " + std::to_string(total)));

  for (const auto& target : {model, model / "model.safetensors.index.json"}) {
    INFO("open " << target);
    auto ckpt = SafetensorsCheckpoint::open(target);
    CHECK(ckpt.shards().size() == shard_count);
    REQUIRE(ckpt.size() == kCases.size());
    check_cases(kCases, [&](const std::string& name) { return ckpt.at(name); });
    auto views = ckpt.tensors();
    REQUIRE(views.size() == kCases.size());
    for (size_t i = 0; i < views.size(); ++i) CHECK(views[i].name == kCases[i].name);  // shards in order
    for (const auto& shard : ckpt.shards()) CHECK(shard->metadata() == kMetadata);
    // 40-byte shards in the given order: [24 + 12] [24] [32 + 8] ...: the F64 starts shard 3.
    CHECK(ckpt.at("model.norm.weight").file == ckpt.shards()[2]);
    CHECK_FALSE(ckpt.find("nope"));
    CHECK_THROWS_WITH(ckpt.at("nope"), Contains("'nope'") && Contains("no such tensor"));
  }

  // Everything fits in one shard: model.safetensors, and the stale index goes.
  auto single = write_sharded(model, cases.refs, 1u << 20, kMetadata);
  CHECK(single == std::vector<fs::path>{model / "model.safetensors"});
  CHECK_FALSE(fs::exists(model / "model.safetensors.index.json"));
  for (const auto& target : {model, model / "model.safetensors"}) {
    auto ckpt = SafetensorsCheckpoint::open(target);
    CHECK(ckpt.shards().size() == 1);
    check_cases(kCases, [&](const std::string& name) { return ckpt.at(name); });
  }

  // And back to shards: the stale model.safetensors (which open() would prefer) goes.
  write_sharded(model, cases.refs, 40, kMetadata);
  CHECK_FALSE(fs::exists(model / "model.safetensors"));
  CHECK(SafetensorsCheckpoint::open(model).shards().size() == shard_count);

  // Invalid input is rejected before anything is written.
  const float x[1] = {};
  const auto other = dir / "other";
  const std::vector<TensorRef> twice = {{"a", SafetensorsDtype::F32, {1}, x, 4}, {"a", SafetensorsDtype::F32, {1}, x, 4}};
  CHECK_THROWS_WITH(write_sharded(other, twice, 4),
                    Contains(other.string()) && Contains("'a'") && Contains("duplicate tensor name"));
  CHECK_FALSE(fs::exists(other));
}

TEST_CASE("a checkpoint index must describe its shards exactly", "[safetensors]") {
  TempDir dir;
  const float x[2] = {1, 2};
  write_safetensors(dir / "s1.safetensors", {{"a", SafetensorsDtype::F32, {2}, x, 8}, {"b", SafetensorsDtype::F32, {2}, x, 8}});
  write_safetensors(dir / "s2.safetensors", {{"c", SafetensorsDtype::F32, {2}, x, 8}, {"b", SafetensorsDtype::F32, {2}, x, 8}});
  const auto index = dir / "model.safetensors.index.json";
  auto index_error = [&](const std::string& text) {
    write_bytes(index, text.data(), text.size());
    return checkpoint_error(dir.path);
  };

  CHECK_THAT(index_error(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})"),
             Contains(index.string()) && Contains("'b'") && Contains("s2.safetensors") &&
                 Contains("exactly one shard"));
  // Shard files the index does not name are not part of the checkpoint.
  const std::string only_s1 = R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})";
  write_bytes(index, only_s1.data(), only_s1.size());
  CHECK(SafetensorsCheckpoint::open(dir.path).size() == 2);

  CHECK_THAT(index_error(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "z": "s1.safetensors"}})"),
             Contains(index.string()) && Contains("'z'") &&
                 Contains("is listed in shard 's1.safetensors' but is not in it"));
  CHECK_THAT(index_error(R"({"weight_map": {"a": "s1.safetensors"}})"),
             Contains(index.string()) && Contains("'b'") && Contains("not in the weight_map"));
  CHECK_THAT(index_error(R"({"weight_map": {"a": "../s1.safetensors"}})"),
             Contains(index.string()) && Contains("'a'") && Contains("not a plain file name"));
  CHECK_THAT(index_error(R"({"weight_map": {"a": 3}})"),
             Contains(index.string()) && Contains("'a'") && Contains("not a string"));
  CHECK_THAT(index_error(R"({"metadata": {}})"), Contains(index.string()) && Contains("weight_map"));
  CHECK_THAT(index_error(R"([1, 2])"), Contains(index.string()) && Contains("not a JSON object"));
  CHECK_THAT(index_error(R"({"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}})"),
             Contains(index.string()) && Contains("duplicate key 'a' inside 'weight_map'"));
  CHECK_THAT(index_error(R"({"weight_map": {"q": "gone.safetensors"}})"),
             Contains((dir / "gone.safetensors").string()) && Contains("cannot open"));

  fs::remove(index);
  CHECK_THAT(checkpoint_error(dir.path), Contains(dir.path.string()) && Contains("neither"));
}

TEST_CASE("every corruption is a SafetensorsError naming the file, the tensor and the problem", "[safetensors]") {
  TempDir dir;
  struct Corrupt {
    std::string header;
    size_t data_size;
    std::vector<std::string> expect;  // substrings of what(), besides the path
    std::optional<uint64_t> n = std::nullopt;
  };
  // F32 [2] = 8 bytes; T(...) is an entry for tensor 'x' unless the header spells it out.
  const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<Corrupt> cases = {
      {"{}", 0, {"header length 100000001 exceeds the 100000000-byte limit"}, 100'000'001},
      {"{}", 0, {"header length 64 exceeds the 2 bytes after the length field"}, 64},
      {R"({"x":)", 0, {"header is not valid JSON"}},
      {"{\"x\":1\xff}", 0, {"header is not valid JSON"}},
      {"[1]", 0, {"header does not start with '{'"}},
      {" {}", 0, {"header does not start with '{'"}},
      {std::string("{}\0junk", 7), 0, {"header contains a NUL byte"}},
      {R"({"x":5})", 0, {"'x'", "entry is not a JSON object"}},
      {R"({"x":{"shape":[2],"data_offsets":[0,8]}})", 8, {"'x'", "missing \"dtype\""}},
      {R"({"x":{"dtype":"F32","data_offsets":[0,8]}})", 8, {"'x'", "missing \"shape\""}},
      {R"({"x":{"dtype":"F32","shape":[2]}})", 8, {"'x'", "missing \"data_offsets\""}},
      {R"({"x":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8, {"'x'", "\"dtype\" is not a string"}},
      {R"({"x":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}})", 8, {"'x'", "unknown dtype 'F128'"}},
      {R"({"x":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8, {"'x'", "\"shape\" is not an array"}},
      {R"({"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, {"'x'", "not an integer"}},
      {R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, {"'x'", "negative dimension -2"}},
      {R"({"x":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", 8,
       {"'x'", "dimension 9223372036854775808 does not fit in int64"}},
      {R"({"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, {"'x'", "overflows 64 bits"}},
      {R"({"x":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8, {"'x'", "overflows 64 bits"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, {"'x'", "\"data_offsets\" is not [begin, end]"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", 8, {"'x'", "\"data_offsets\" is not [begin, end]"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[-1,7]}})", 8, {"'x'", "\"data_offsets\" is not [begin, end]"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}})", 16, {"'x'", "\"data_offsets\" is not [begin, end]"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, {"'x'", "data_offsets [8, 0] have begin > end"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4,
       {"'x'", "data_offsets [0, 8] extend beyond the data section (4 bytes)"}},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", 12,
       {"'x'", "data_offsets [0, 12] span 12 bytes but shape [2] of F32 needs 8"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12,
       {"'b'", "overlaps tensor 'a'"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8,
       {"'b'", "overlaps tensor 'a'"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20,
       {"'b'", "gap of 4 bytes"}},
      {R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, {"'b'", "gap of 4 bytes"}},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12, {"4 trailing bytes", "not covered by any tensor"}},
      {"{\"x\":" + ok_entry + ",\"x\":" + ok_entry + "}", 8, {"duplicate key 'x'"}},
      {R"({"x":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8, {"duplicate key 'dtype' inside 'x'"}},
      {R"({"__metadata__":{"k":"a","k":"b"}})", 0, {"duplicate key 'k' inside '__metadata__'"}},
      {R"({"__metadata__":["a"]})", 0, {"\"__metadata__\" is not a JSON object"}},
      {R"({"__metadata__":{"k":1}})", 0, {"\"__metadata__\" value of 'k' is not a string"}},
      {"{\"x\":" + std::string(200, '[') + std::string(200, ']') + "}", 0, {"deeper than 128 levels"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    const auto path = dir / ("corrupt-" + std::to_string(i) + ".safetensors");
    write_raw(path, c.header, c.data_size, c.n);
    INFO("case " << i << ": header " << c.header);
    std::string what = open_error(path);
    CHECK_THAT(what, Contains(path.string()));
    for (const auto& e : c.expect) CHECK_THAT(what, Contains(e));
  }

  // Too short for the length field, not a file, not there.
  for (size_t size : {0, 1, 7}) {
    const auto path = dir / ("short-" + std::to_string(size));
    write_bytes(path, "\x02\0\0\0\0\0\0", size);
    CHECK_THAT(open_error(path), Contains(path.string()) && Contains("shorter than the 8-byte header length"));
  }
  CHECK_THAT(open_error(dir.path), Contains(dir.path.string()) && Contains("not a regular file"));
  CHECK_THAT(open_error(dir / "absent"), Contains((dir / "absent").string()) && Contains("cannot open"));

  // The valid neighbours of these cases open: zero-size tensors may share an offset, the header may
  // carry trailing spaces, and unknown keys in an entry are ignored (as the reference implementation
  // does), nested up to the depth limit.
  const auto fine = dir / "fine.safetensors";
  write_raw(fine,
            R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("d":{"dtype":"I8","shape":[0,3],"data_offsets":[8,8],"extra":)" +
                std::string(126, '[') + std::string(126, ']') + "}}   ",
            8);
  auto file = SafetensorsFile::open(fine);
  REQUIRE(file->size() == 3);
  CHECK(file->tensors()[0].name == "e");
  CHECK(file->tensors()[1].name == "a");
  CHECK(file->tensors()[2].name == "d");
}

TEST_CASE("a truncated file is an error at every cut point", "[safetensors]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto full = dir / "full.safetensors";
  write_safetensors(full, cases.refs, kMetadata);
  const auto raw = read_all(full);
  const auto cut = dir / "cut.safetensors";
  for (size_t size = 0; size < raw.size(); ++size) {
    write_bytes(cut, raw.data(), size);
    INFO("cut at " << size << " of " << raw.size());
    CHECK_THAT(open_error(cut), Contains(cut.string()));
  }
  write_bytes(cut, raw.data(), raw.size());
  CHECK(SafetensorsFile::open(cut)->size() == kCases.size());
}

TEST_CASE("2000 random header mutations never crash: each is an error or a valid file", "[safetensors]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto path = dir / "m.safetensors";
  write_safetensors(path, cases.refs, kMetadata);
  const auto raw = read_all(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);

  std::mt19937_64 rng(20240611);
  // Half the mutations use JSON's structural characters, so some land on parseable variants.
  const std::string json_chars = "{}[]:,\"0123456789-.eE \\u";
  size_t errors = 0;
  size_t valid = 0;
  for (int iteration = 0; iteration < 2000; ++iteration) {
    auto bytes = raw;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t at = rng() % (8 + n);  // the length field included
      bytes[at] = rng() % 2 ? static_cast<std::byte>(json_chars[rng() % json_chars.size()])
                            : static_cast<std::byte>(rng() % 256);
    }
    write_bytes(path, bytes.data(), bytes.size());
    try {
      auto file = SafetensorsFile::open(path);
      auto mapping = file->bytes();
      unsigned sum = 0;
      for (const auto& v : file->tensors()) {
        REQUIRE(v.data >= mapping.data() + 8 + file->header_size());
        REQUIRE(v.data + v.nbytes <= mapping.data() + mapping.size());
        for (size_t i = 0; i < v.nbytes; ++i) sum += static_cast<unsigned>(v.data[i]);
      }
      (void)sum;
      ++valid;
    } catch (const SafetensorsError& e) {
      REQUIRE_THAT(e.what(), Contains(path.string()));
      ++errors;
    } catch (const std::exception& e) {
      FAIL("iteration " << iteration << ": not a SafetensorsError: " << e.what());
    }
  }
  INFO(valid << " valid, " << errors << " errors");
  CHECK(errors > 1000);
  CHECK(valid > 0);  // mutations inside names and values that keep the file consistent
}

TEST_CASE("a file the independent Python writer made reads identically", "[safetensors][python]") {
  TempDir dir;
  const auto path = dir / "py.safetensors";
  REQUIRE(reference("write", path));
  auto file = SafetensorsFile::open(path);
  CHECK(file->metadata() == kMetadata);
  REQUIRE(file->size() == kCases.size());
  check_cases(kCases, [&](const std::string& name) { return file->at(name); });
  // Python's layout sorts by alignment first: every tensor is aligned, and file order is offset order.
  const std::byte* previous = nullptr;
  for (const auto& v : file->tensors()) {
    CHECK(v.aligned());
    CHECK(v.data >= previous);
    previous = v.data;
  }
  CHECK(file->tensors().front().dtype == SafetensorsDtype::I64);  // 8-byte dtypes first, then by name

  const auto sharded = dir / "py-sharded";
  REQUIRE(reference("write-sharded", sharded));
  auto ckpt = SafetensorsCheckpoint::open(sharded);
  CHECK(ckpt.shards().size() == 2);
  REQUIRE(ckpt.size() == kCases.size());
  check_cases(kCases, [&](const std::string& name) { return ckpt.at(name); });
}

TEST_CASE("the independent Python reader verifies what the C++ writer made", "[safetensors][python]") {
  TempDir dir;
  CaseData cases(kCases);
  const auto path = dir / "cpp.safetensors";
  write_safetensors(path, cases.refs, kMetadata);
  CHECK(reference("verify", path));

  const auto sharded = dir / "cpp-sharded";
  write_sharded(sharded, cases.refs, 40, kMetadata);
  CHECK(reference("verify-sharded", sharded));

  // The check is not vacuous: one flipped data byte, or a different table, fails it.
  auto raw = read_all(path);
  raw.back() ^= std::byte{1};
  write_bytes(path, raw.data(), raw.size());
  CHECK_FALSE(reference("verify", path, true));
  auto fewer = cases.refs;
  fewer.pop_back();
  write_safetensors(path, fewer, kMetadata);
  CHECK_FALSE(reference("verify", path, true));
}
