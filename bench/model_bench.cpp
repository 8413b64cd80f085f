// Model throughput of the C++ stack against an equivalent plain-PyTorch (python3-torch) program in
// the same run, on the same LibTorch 1.13 + OpenBLAS underneath and the same thread count:
//
//   1. fp32 matmul GFLOP/s (torch::mm 512x512 and 2048x2048): shows which BLAS is in use
//      (OpenBLAS ~70-190 GFLOP/s on this 2-core machine; reference BLAS ~6).
//   2. LoRA fine-tuning tokens/s: a small Qwen2 (hidden 512, 8 layers, 8/2 heads, MLP 1408, vocab
//      151936 tied; 100.4M parameters), LoRA r=16 alpha=32 dropout 0 on q,k,v,o, batch 4 x 256,
//      through fedmoe's own Trainer (forward, cross-entropy, backward, grad clipping at 1.0, AdamW,
//      loss.item()): 1 warm-up + 3 timed optimizer steps.
//   3. Greedy generation tokens/s with the KV cache at batch 1 (prompt 32, 64 new tokens, prefill
//      included; the LoRA adapter active, unmerged), through model::generate with a step function
//      calling Qwen2ForCausalLM::forward(ids, {}, {}, &cache, /*logits_to_keep=*/1).
//   4. The Qwen2-MoE sparse block (model/moe.hpp; hidden 512, 8 experts of width 1408, top-2, no
//      shared expert, 1024 tokens): forward_grouped (tokens sorted by expert, each expert once on
//      its slice) against forward_dense_loop (every expert on every token), forward under NoGrad and
//      forward + backward. C++ against C++.
//
// bench/model_bench.py implements 1-3 as ordinary eager nn.Module code (HF-style attention,
// PEFT-style LoRA Linear, torch.optim.AdamW, a torch.cat KV cache). It runs as a child process,
// `/usr/bin/python3 bench/model_bench.py --json --serve ...` with the same configuration as
// arguments, and answers one command at a time, so C++ and Python measurements alternate (C++ step,
// Python step, C++ step, ...): this machine is shared, and a burst of someone else's load then hits
// both sides. Each side's figure is its best timed step or generation (the least disturbed one);
// the mean is printed too. Ratios, never absolute timings, are what to compare.
//
//   model_bench [--quick] [--threads N] [--steps N] [--warmup N] [--gen-reps N]
//               [--sections matmul,train,generate,moe] [--python EXE]
//
// --threads (default: the hardware thread count, 2 here) goes to torch::set_num_threads on this
// side and torch.set_num_threads on the Python side; OpenBLAS keeps its own pool (OPENBLAS_NUM_THREADS,
// inherited by the child), reported for both sides. --quick shrinks everything (hidden 64, 2 layers,
// vocab 1000, batch 2 x 16, 1 warm-up + 2 timed steps, 8 new tokens, a 64-token MoE) for a smoke run.
//
// Final lines: "model_bench train ratio: X" and "model_bench generate ratio: Y" (C++ tokens/s over
// Python tokens/s), "model_bench moe ratio: Z" (dense-loop forward time over grouped forward time),
// each for the sections that ran.
#include <dlfcn.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "model/data.hpp"
#include "model/lm_loss.hpp"
#include "model/generation.hpp"
#include "model/lora.hpp"
#include "model/moe.hpp"
#include "model/qwen2.hpp"
#include "model/trainer.hpp"
#include "runtime/process_env.hpp"

extern char** environ;

namespace fm = fedmoe::model;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Before each timed piece: lets the worker threads of the side that ran last (OpenBLAS spins ~0.1 s
// after a call before sleeping, OpenMP a little) go idle, so they do not take the other side's cores.
int settle_ms = 300;  // --quick: 30
void settle() { std::this_thread::sleep_for(std::chrono::milliseconds(settle_ms)); }

struct Options {
  bool quick = false;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int64_t hidden = 512, layers = 8, heads = 8, kv_heads = 2, intermediate = 1408, vocab = 151936;
  int64_t rank = 16;
  double alpha = 32;
  int64_t batch = 4, seq = 256, warmup = 1, steps = 3;
  int64_t prompt = 32, new_tokens = 64, gen_reps = 2;
  double matmul_seconds = 1.0;
  int64_t moe_hidden = 512, moe_experts = 8, moe_top_k = 2, moe_intermediate = 1408, moe_tokens = 1024, moe_reps = 5;
  std::set<std::string> sections{"matmul", "train", "generate", "moe"};
  std::string python = "/usr/bin/python3";

  void make_quick() {
    quick = true;
    hidden = 64, layers = 2, heads = 4, kv_heads = 2, intermediate = 128, vocab = 1000;
    rank = 4, alpha = 8;
    batch = 2, seq = 16, warmup = 1, steps = 2;
    prompt = 4, new_tokens = 8, gen_reps = 1;
    matmul_seconds = 0.05;
    moe_hidden = 64, moe_experts = 4, moe_intermediate = 128, moe_tokens = 64, moe_reps = 2;
    settle_ms = 30;
  }

  bool runs(const std::string& section) const { return sections.count(section) > 0; }

  fm::Qwen2Config config() const {
    fm::Qwen2Config c;
    c.name = "bench";
    c.hidden_size = hidden, c.num_hidden_layers = layers, c.num_attention_heads = heads;
    c.num_key_value_heads = kv_heads, c.head_dim = hidden / heads, c.intermediate_size = intermediate;
    c.vocab_size = vocab, c.tie_word_embeddings = true;
    c.validate();
    return c;
  }

  // The shared configuration as model_bench.py arguments.
  std::vector<std::string> python_args() const {
    auto num = [](auto v) {
      std::ostringstream s;
      s << v;
      return s.str();
    };
    return {"--threads", num(threads), "--hidden", num(hidden), "--layers", num(layers), "--heads", num(heads),
            "--kv-heads", num(kv_heads), "--intermediate", num(intermediate), "--vocab", num(vocab),
            "--rank", num(rank), "--alpha", num(alpha), "--targets", "q_proj,k_proj,v_proj,o_proj",
            "--batch", num(batch), "--seq", num(seq), "--prompt", num(prompt), "--new-tokens", num(new_tokens)};
  }
};

// OpenBLAS's own thread pool size, or -1 when the BLAS in use is not OpenBLAS.
int openblas_threads() {
  using Fn = int (*)();
  auto fn = reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return fn ? fn() : -1;
}

std::string openblas_config() {
  using Fn = char* (*)();
  auto fn = reinterpret_cast<Fn>(::dlsym(RTLD_DEFAULT, "openblas_get_config"));
  return fn ? std::string(fn()) : std::string("not OpenBLAS");
}

double matmul_gflops(int64_t n, double seconds) {
  auto a = torch::randn({n, n}), b = torch::randn({n, n});
  torch::mm(a, b);  // warm-up: thread pools, page faults
  int64_t reps = 0;
  auto start = Clock::now();
  double elapsed = 0;
  do {
    torch::mm(a, b);
    ++reps;
    elapsed = seconds_since(start);
  } while (elapsed < seconds || reps < 3);
  return 2.0 * double(n) * double(n) * double(n) * double(reps) / elapsed / 1e9;
}

// bench/model_bench.py --json --serve: one command line in, one JSON line out.
class PythonChild {
 public:
  explicit PythonChild(const Options& o) {
    std::vector<std::string> args{o.python, FEDMOE_SOURCE_DIR "/bench/model_bench.py", "--json", "--serve"};
    for (auto& a : o.python_args()) args.push_back(a);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int to_child[2], from_child[2];
    if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, to_child[0], 0);
    posix_spawn_file_actions_adddup2(&fa, from_child[1], 1);
    for (int fd : {to_child[0], to_child[1], from_child[0], from_child[1]}) posix_spawn_file_actions_addclose(&fa, fd);
    // The Python baseline runs with the user's environment: without the OMP_WAIT_POLICY that fedmoe's
    // executables set for themselves (runtime/process_env.cpp), unless the user set it.
    std::vector<char*> env;
    for (char** e = environ; *e; ++e)
      if (!(fedmoe::runtime::omp_wait_policy_set_by_fedmoe() && (std::string_view(*e).starts_with("OMP_WAIT_POLICY=") ||
                                                                  std::string_view(*e).starts_with("FEDMOE_DEFAULTED_"))))
        env.push_back(*e);
    env.push_back(nullptr);
    const int rc = ::posix_spawnp(&pid_, o.python.c_str(), &fa, nullptr, argv.data(), env.data());
    posix_spawn_file_actions_destroy(&fa);
    ::close(to_child[0]);
    ::close(from_child[1]);
    if (rc != 0) {
      ::close(to_child[1]);
      ::close(from_child[0]);
      throw std::runtime_error("cannot start " + o.python + " (" + std::to_string(rc) + ")");
    }
    in_ = ::fdopen(to_child[1], "w");
    out_ = ::fdopen(from_child[0], "r");
  }
  PythonChild(const PythonChild&) = delete;
  PythonChild& operator=(const PythonChild&) = delete;
  ~PythonChild() {
    std::fputs("quit\n", in_);
    std::fclose(in_);
    std::fclose(out_);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }

  json call(const std::string& command) {
    settle();
    std::fputs((command + "\n").c_str(), in_);
    std::fflush(in_);
    std::string line;
    char buffer[4096];
    while (std::fgets(buffer, sizeof buffer, out_)) {
      line += buffer;
      if (!line.empty() && line.back() == '\n') break;
    }
    if (line.empty()) throw std::runtime_error("bench/model_bench.py exited during `" + command + "`");
    auto reply = json::parse(line);
    if (reply.contains("error")) throw std::runtime_error("bench/model_bench.py: " + reply["error"].get<std::string>());
    return reply;
  }

 private:
  pid_t pid_ = 0;
  FILE* in_ = nullptr;
  FILE* out_ = nullptr;
};

struct Timings {
  std::vector<double> s;
  double best() const { return *std::min_element(s.begin(), s.end()); }
  double mean() const { return std::accumulate(s.begin(), s.end(), 0.0) / double(s.size()); }
};

struct TrainFigures {
  Timings cpp, py;
  double cpp_loss = 0, py_loss = 0;
};

// LoRA fine-tuning through fedmoe's Trainer, one optimizer step per run() call so each is timed,
// alternating with one step of the Python loop.
TrainFigures bench_train(fm::LoraExperts& experts, const std::string& adapter, const Options& o, PythonChild& py) {
  auto model = experts.model();
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(o.vocab - 1));
  std::vector<fm::PackedSequence> data(o.batch);  // exactly one batch: each step sees all of it
  for (auto& s : data) {
    std::vector<int32_t> ids(o.seq + 1);
    for (auto& t : ids) t = token(rng);
    s.input_ids.assign(ids.begin(), ids.end() - 1);
    s.labels.assign(ids.begin() + 1, ids.end());
  }
  fm::TrainTarget target;
  for (auto& [name, p] : experts.named_parameters(adapter)) target.params.emplace_back(name, p);
  // The loss fedmoe trains with (model/lm_loss.hpp), as the fedmoe finetune command.
  target.loss = [model](const torch::Tensor& ids, const torch::Tensor& labels) mutable {
    return fm::causal_lm_loss(model, ids, labels);
  };
  target.set_training = [model](bool on) mutable { model->train(on); };
  fm::TrainConfig cfg;
  cfg.lr = 2e-4;
  cfg.warmup_steps = 0;
  cfg.total_steps = o.warmup + o.steps;
  cfg.batch_size = o.batch;
  cfg.max_grad_norm = 1.0;
  cfg.progress = fm::TrainConfig::Progress::none;
  fm::Trainer trainer(target, cfg);
  TrainFigures f;
  for (int64_t step = 0; step < o.warmup + o.steps; ++step) {
    settle();
    auto start = Clock::now();
    auto r = trainer.run(data, {}, step + 1);
    const double s = seconds_since(start);
    auto p = py.call("train");
    if (step >= o.warmup) f.cpp.s.push_back(s), f.py.s.push_back(p["s"].get<double>());
    f.cpp_loss = r.last_loss;
    f.py_loss = p["loss"].get<double>();
    std::fprintf(stderr, "  train step %lld/%lld: C++ %.2f s, Python %.2f s\n", (long long)step + 1,
                 (long long)(o.warmup + o.steps), s, p["s"].get<double>());
  }
  return f;
}

struct GenFigures {
  Timings cpp, py;  // whole generations, prefill included
  double cpp_prefill = 0, py_prefill = 0;  // of the best run
};

// Greedy generation through model::generate, alternating with the Python loop; one warm-up each.
GenFigures bench_generate(fm::Qwen2ForCausalLM model, const Options& o, PythonChild& py) {
  model->eval();
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<int64_t> token(0, o.vocab - 1);
  std::vector<int64_t> prompt(o.prompt);
  for (auto& t : prompt) t = token(rng);
  fm::GenerationOptions opts;
  opts.max_new_tokens = o.new_tokens;  // greedy: SamplingOptions' defaults
  GenFigures f;
  for (int64_t rep = 0; rep <= o.gen_reps; ++rep) {
    fm::KVCache cache;
    auto step = [&](const std::vector<int64_t>& ids) {
      auto input = torch::tensor(ids, torch::kInt64).unsqueeze(0);  // [1, T]
      return model->forward(input, {}, {}, &cache, /*logits_to_keep=*/1)[0][-1];  // [V]
    };
    double prefill = 0;
    settle();
    auto start = Clock::now();
    auto result = fm::generate(step, prompt, opts, [&](int64_t) {
      if (prefill == 0) prefill = seconds_since(start);
      return true;
    });
    const double total = seconds_since(start);
    if (static_cast<int64_t>(result.tokens.size()) != o.new_tokens)
      throw std::runtime_error("generate stopped after " + std::to_string(result.tokens.size()) + " tokens");
    auto p = py.call("generate");
    std::fprintf(stderr, "  generation %lld/%lld: C++ %.2f s, Python %.2f s\n", (long long)rep + 1,
                 (long long)o.gen_reps + 1, total, p["total_s"].get<double>());
    if (rep == 0) continue;  // warm-up
    if (f.cpp.s.empty() || total < f.cpp.best()) f.cpp_prefill = prefill;
    if (f.py.s.empty() || p["total_s"].get<double>() < f.py.best()) f.py_prefill = p["prefill_s"].get<double>();
    f.cpp.s.push_back(total);
    f.py.s.push_back(p["total_s"].get<double>());
  }
  return f;
}

struct MoeFigures {
  Timings grouped_fwd, dense_fwd, grouped_train, dense_train;
  double max_abs_diff = 0;
  std::vector<int64_t> tokens_per_expert;
};

// The sparse block alone on random hidden states; the two paths alternate rep by rep after a warm-up.
MoeFigures bench_moe(const Options& o) {
  fm::Qwen2Config c;
  c.name = "bench-moe";
  c.hidden_size = o.moe_hidden, c.num_hidden_layers = 1, c.num_attention_heads = 8, c.num_key_value_heads = 2;
  c.head_dim = o.moe_hidden / 8, c.intermediate_size = o.moe_intermediate, c.vocab_size = 1000;
  c.num_experts = o.moe_experts, c.num_experts_per_tok = o.moe_top_k, c.moe_intermediate_size = o.moe_intermediate;
  c.shared_expert_intermediate_size = 0;
  c.validate();
  torch::manual_seed(3);
  fm::Qwen2MoeSparseBlock block(c, torch::kFloat32);
  // Hidden states of unit scale, as after an RMSNorm; the router then spreads tokens over experts.
  auto x = torch::randn({1, o.moe_tokens, o.moe_hidden});
  MoeFigures f;
  {
    torch::NoGradGuard no_grad;
    f.max_abs_diff = (block->forward_grouped(x) - block->forward_dense_loop(x)).abs().max().item<double>();
    block->reset_utilization();
    block->forward_grouped(x);
    f.tokens_per_expert = block->utilization();
  }
  auto time_pair = [&](auto&& a, Timings& ta, auto&& b, Timings& tb) {
    a(), b();  // warm-up
    for (int64_t r = 0; r < o.moe_reps; ++r) {
      auto start = Clock::now();
      a();
      ta.s.push_back(seconds_since(start));
      start = Clock::now();
      b();
      tb.s.push_back(seconds_since(start));
    }
  };
  time_pair([&] { torch::NoGradGuard g; block->forward_grouped(x); }, f.grouped_fwd,
            [&] { torch::NoGradGuard g; block->forward_dense_loop(x); }, f.dense_fwd);
  auto xg = x.clone().requires_grad_(true);
  auto train = [&](bool dense) {
    block->zero_grad();
    xg.mutable_grad() = torch::Tensor();
    auto y = dense ? block->forward_dense_loop(xg) : block->forward_grouped(xg);
    y.pow(2).mean().backward();
  };
  time_pair([&] { train(false); }, f.grouped_train, [&] { train(true); }, f.dense_train);
  return f;
}

void usage() {
  std::cerr << "usage: model_bench [--quick] [--threads N] [--steps N] [--warmup N] [--gen-reps N]\n"
               "                   [--sections matmul,train,generate,moe] [--python EXE]\n";
}

void row(const char* name, double a, double b, double ratio, int precision = 1) {
  std::printf("%-36s %12.*f %12.*f %8.2f\n", name, precision, a, precision, b, ratio);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (std::find(args.begin(), args.end(), "--quick") != args.end()) o.make_quick();
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      if (a == "--quick") continue;
      if (a == "--help" || a == "-h") return usage(), 0;
      if (i + 1 >= args.size()) return usage(), 2;
      const std::string v = args[++i];
      if (a == "--threads") o.threads = std::max(1, std::stoi(v));
      else if (a == "--steps") o.steps = std::max<int64_t>(1, std::stoll(v));
      else if (a == "--warmup") o.warmup = std::max<int64_t>(0, std::stoll(v));
      else if (a == "--gen-reps") o.gen_reps = std::max<int64_t>(1, std::stoll(v));
      else if (a == "--python") o.python = v;
      else if (a == "--sections") {
        o.sections.clear();
        std::stringstream list(v);
        for (std::string s; std::getline(list, s, ',');) {
          if (s != "matmul" && s != "train" && s != "generate" && s != "moe") return usage(), 2;
          o.sections.insert(s);
        }
      } else {
        return usage(), 2;
      }
    }
  } catch (const std::exception&) {
    return usage(), 2;
  }

  try {
    ::signal(SIGPIPE, SIG_IGN);  // a Python child that died is reported by PythonChild::call, not by a signal
    torch::set_num_threads(o.threads);
    const int blas_threads = openblas_threads();
    std::printf("threads: torch %d (--threads), OpenBLAS pool %d, OMP_WAIT_POLICY %s%s; BLAS: %s\n",
                torch::get_num_threads(), blas_threads, std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "(unset)",
                fedmoe::runtime::omp_wait_policy_set_by_fedmoe() ? " (fedmoe's default)" : "", openblas_config().c_str());
    std::fflush(stdout);

    const bool need_python = o.runs("matmul") || o.runs("train") || o.runs("generate");
    std::unique_ptr<PythonChild> py;
    json py_info;
    if (need_python) {
      py = std::make_unique<PythonChild>(o);
      py_info = py->call("info");
      std::printf("Python child: torch %s, %d threads, OpenBLAS pool %d, OMP_WAIT_POLICY %s\n",
                  py_info["torch"].get<std::string>().c_str(), py_info["threads"].get<int>(),
                  py_info["openblas_threads"].get<int>(), py_info["omp_wait_policy"].get<std::string>().c_str());
    }

    // 1. BLAS, alternating sides.
    double mm[2] = {0, 0}, py_mm[2] = {0, 0};
    if (o.runs("matmul")) {
      const int64_t sizes[2] = {512, 2048};
      for (int i = 0; i < 2; ++i) {
        settle();
        mm[i] = matmul_gflops(sizes[i], o.matmul_seconds);
        std::ostringstream cmd;
        cmd << "matmul " << sizes[i] << " " << o.matmul_seconds;
        py_mm[i] = py->call(cmd.str())["gflops"].get<double>();
      }
      std::printf("fp32 matmul (torch::mm): 512x512 %.1f GFLOP/s, 2048x2048 %.1f GFLOP/s (Python: %.1f, %.1f)\n",
                  mm[0], mm[1], py_mm[0], py_mm[1]);
      std::fflush(stdout);
    }

    // The model: HF init (normal 0.02), LoRA on q,k,v,o with PEFT init (B = 0), base frozen.
    std::unique_ptr<fm::LoraExperts> experts;
    fm::Qwen2ForCausalLM model{nullptr};
    if (o.runs("train") || o.runs("generate")) {
      torch::manual_seed(0);
      const auto config = o.config();
      model = fm::Qwen2ForCausalLM(config);
      experts = std::make_unique<fm::LoraExperts>(model);
      fm::LoraSpec spec;
      spec.rank = o.rank, spec.alpha = o.alpha, spec.dropout = 0.0;
      spec.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"};
      experts->attach("bench", spec, fm::LoraInit::peft, 0);
      experts->activate("bench");
      py->call("setup");
      int64_t params = 0;
      for (const auto& p : model->parameters()) params += p.numel();
      std::printf("model: hidden %lld, %lld layers, %lld/%lld heads, MLP %lld, vocab %lld tied (%.1fM params), fp32; "
                  "LoRA r=%lld alpha=%g dropout 0 on q,k,v,o (%lld params)\n",
                  (long long)o.hidden, (long long)o.layers, (long long)o.heads, (long long)o.kv_heads,
                  (long long)o.intermediate, (long long)o.vocab, double(params) / 1e6, (long long)o.rank, o.alpha,
                  (long long)fm::lora_parameter_count(config, spec));
      std::fflush(stdout);
    }

    // 2. LoRA training.
    const int64_t tokens_per_step = o.batch * o.seq;
    TrainFigures train;
    if (o.runs("train")) {
      train = bench_train(*experts, "bench", o, *py);
      std::printf("train: batch %lld x %lld, %lld warm-up + %lld timed steps each side, alternating; "
                  "final loss C++ %.3f, Python %.3f\n",
                  (long long)o.batch, (long long)o.seq, (long long)o.warmup, (long long)o.steps, train.cpp_loss,
                  train.py_loss);
      std::fflush(stdout);
    }

    // 3. Generation.
    GenFigures gen;
    if (o.runs("generate")) {
      gen = bench_generate(model, o, *py);
      std::printf("generate: batch 1, prompt %lld, %lld new tokens, greedy, 1 warm-up + %lld timed runs each side, "
                  "alternating; prefill C++ %.3f s, Python %.3f s\n",
                  (long long)o.prompt, (long long)o.new_tokens, (long long)o.gen_reps, gen.cpp_prefill, gen.py_prefill);
      std::fflush(stdout);
    }
    py.reset();  // the child's memory back before the MoE section

    // 4. The MoE block: grouped dispatch against the dense per-expert loop.
    MoeFigures moe;
    if (o.runs("moe")) {
      moe = bench_moe(o);
      std::printf("MoE block: hidden %lld, %lld experts x %lld, top-%lld, no shared expert, %lld tokens, best of %lld "
                  "alternating; grouped vs dense max |diff| %.2e; tokens per expert:",
                  (long long)o.moe_hidden, (long long)o.moe_experts, (long long)o.moe_intermediate,
                  (long long)o.moe_top_k, (long long)o.moe_tokens, (long long)o.moe_reps, moe.max_abs_diff);
      for (auto n : moe.tokens_per_expert) std::printf(" %lld", (long long)n);
      std::printf("\n");
    }

    std::printf("\n%-36s %12s %12s %8s\n", "benchmark", "C++", "Python", "ratio");
    if (o.runs("matmul")) {
      row("matmul 512x512 fp32 GFLOP/s", mm[0], py_mm[0], mm[0] / py_mm[0]);
      row("matmul 2048x2048 fp32 GFLOP/s", mm[1], py_mm[1], mm[1] / py_mm[1]);
    }
    const double tps = double(tokens_per_step);
    if (o.runs("train")) {
      row("LoRA train tokens/s (best step)", tps / train.cpp.best(), tps / train.py.best(),
          train.py.best() / train.cpp.best());
      row("LoRA train tokens/s (mean)", tps / train.cpp.mean(), tps / train.py.mean(), train.py.mean() / train.cpp.mean());
    }
    const double nt = double(o.new_tokens);
    if (o.runs("generate")) {
      row("generate tokens/s (best run)", nt / gen.cpp.best(), nt / gen.py.best(), gen.py.best() / gen.cpp.best());
      row("generate tokens/s (mean)", nt / gen.cpp.mean(), nt / gen.py.mean(), gen.py.mean() / gen.cpp.mean());
      row("decode tokens/s (best, after prefill)", (nt - 1) / (gen.cpp.best() - gen.cpp_prefill),
          (nt - 1) / (gen.py.best() - gen.py_prefill),
          (gen.py.best() - gen.py_prefill) / (gen.cpp.best() - gen.cpp_prefill));
    }
    if (o.runs("moe")) {
      std::printf("%-36s %12s %12s %8s\n", "MoE block (C++ only), best ms", "dense loop", "grouped", "speedup");
      row("forward (NoGrad)", moe.dense_fwd.best() * 1e3, moe.grouped_fwd.best() * 1e3,
          moe.dense_fwd.best() / moe.grouped_fwd.best(), 2);
      row("forward + backward", moe.dense_train.best() * 1e3, moe.grouped_train.best() * 1e3,
          moe.dense_train.best() / moe.grouped_train.best(), 2);
    }
    std::printf("threads: %d torch threads on both sides (torch::set_num_threads / torch.set_num_threads), "
                "OpenBLAS pool %d\n",
                o.threads, blas_threads);
    if (o.runs("train")) std::printf("model_bench train ratio: %.2f\n", train.py.best() / train.cpp.best());
    if (o.runs("generate")) std::printf("model_bench generate ratio: %.2f\n", gen.py.best() / gen.cpp.best());
    if (o.runs("moe")) std::printf("model_bench moe ratio: %.2f\n", moe.dense_fwd.best() / moe.grouped_fwd.best());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "model_bench: " << e.what() << "\n";
    return 1;
  }
}
