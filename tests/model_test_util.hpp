// Helpers shared by the LibTorch model tests (test_qwen2, test_moe, test_hf_kit): O(1) random
// weights, id batches, tensor files the reference scripts read, temp directories, and (from
// next_token_loss.hpp) the reference scripts' next-token loss. Include after <torch/torch.h> and
// <catch2/catch.hpp> (see test_qwen2.cpp).
#pragma once

#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "model/qwen2.hpp"
#include "next_token_loss.hpp"

namespace fedmoe::test {

namespace fs = std::filesystem;
using TensorMap = std::map<std::string, torch::Tensor>;

// Weights whose activations stay O(1) and logits O(1..10): absolute tolerances of 1e-5..1e-4 are then
// real tests (HF's 0.02-std init gives logits near 0 that any implementation matches), yet above fp32
// rounding of differently ordered sums (a tied head on std-1 embeddings would give logits ~30). MoE
// router weights come out ~N(0, 1) logits too, so tokens spread over the experts.
inline TensorMap random_weights(const model::Qwen2Config& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  TensorMap out;
  model::Qwen2ForCausalLM shape_source(cfg);
  for (const auto& p : shape_source->named_parameters()) {
    const auto& name = p.key();
    auto shape = p.value().sizes();
    torch::Tensor t;
    if (name.find("norm") != std::string::npos) t = 1 + 0.2 * torch::randn(shape);
    else if (name.find(".bias") != std::string::npos) t = 0.3 * torch::randn(shape);
    else if (name == "model.embed_tokens.weight") t = 0.25 * torch::randn(shape);
    else t = torch::randn(shape) / std::sqrt(static_cast<double>(shape[1]));
    out.emplace(name, t);
  }
  return out;
}

inline model::Qwen2ForCausalLM make_model(const model::Qwen2Config& cfg, uint64_t seed) {
  model::Qwen2ForCausalLM m(cfg);
  model::load_state_dict(m, random_weights(cfg, seed));
  m->eval();
  return m;
}

inline torch::Tensor random_ids(const model::Qwen2Config& cfg, int64_t b, int64_t t, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(cfg.vocab_size, {b, t}, torch::kInt64);  // [b, t]
}

inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat32) - b.to(torch::kFloat32)).abs().max().item<double>();
}

inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

// torch::pickle_save of a string->tensor dict is what Python's torch.load reads; torch.save's output
// is what torch::pickle_load reads.
inline void save_tensors(const fs::path& path, const TensorMap& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [name, t] : tensors) dict.insert(name, t.detach().contiguous());
  auto bytes = torch::pickle_save(c10::IValue(dict));
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline TensorMap load_tensors(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TensorMap out;
  for (const auto& entry : torch::pickle_load(bytes).toGenericDict())
    out.emplace(entry.key().toStringRef(), entry.value().toTensor());
  return out;
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "fedmoe_model_test_XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() { fs::remove_all(path); }
};

// A small tmpfs: a real full disk. Needs CAP_SYS_ADMIN (root); skipped with a message otherwise.
struct SmallDisk {
  TempDir dir;
  bool mounted = false;
  explicit SmallDisk(const std::string& size) {
    mounted = ::mount("tmpfs", dir.path.c_str(), "tmpfs", 0, ("size=" + size).c_str()) == 0;
    if (!mounted) WARN("skipped: cannot mount a tmpfs here (" << std::strerror(errno) << "; the test needs root)");
  }
  ~SmallDisk() {
    if (mounted) ::umount2(dir.path.c_str(), MNT_DETACH);
  }
  // Fills the disk up with DIR/filler, then frees `leave` bytes of it (rounded to pages by tmpfs).
  void fill(uint64_t leave = 0) const {
    {
      std::ofstream filler(dir.path / "filler", std::ios::binary);
      std::string block(4096, 'x');
      while (filler.write(block.data(), static_cast<std::streamsize>(block.size()))) {
      }
    }
    fs::resize_file(dir.path / "filler", fs::file_size(dir.path / "filler") - leave);
  }
  void free() const { fs::remove(dir.path / "filler"); }
};

}  // namespace fedmoe::test
