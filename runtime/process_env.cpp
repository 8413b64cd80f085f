#include "runtime/process_env.hpp"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace fedmoe::runtime {

namespace {

constexpr const char* kMarker = "FEDMOE_DEFAULTED_OMP_WAIT_POLICY=1";

// OMP_WAIT_POLICY=PASSIVE. LibTorch runs elementwise kernels on OpenMP threads and matrix products
// on OpenBLAS's own thread pool. With OpenMP's default policy its workers spin for a while after
// every parallel region, on the cores the next OpenBLAS product needs; on 2 cores that costs a LoRA
// training step of the bench/model_bench model about a quarter of its decoder time (forward 1.1 s ->
// 0.8 s, backward 1.25 s -> 0.95 s).
//
// libgomp reads the variable once, in its constructor, and there is no API to change it later. Even
// a function in .preinit_array (which runs before every library's constructor) cannot just setenv():
// libc's own initializer resets `environ` to the original block afterwards. So when the variable is
// missing, the process re-executes itself, once, with it added (and a marker, so that children can
// be given the user's environment back). A value the user set is left alone; if the re-exec fails,
// the process simply goes on with the default policy.
//
// GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=64G, in the same re-exec: large
// blocks stay in the heap. A training step of a Qwen-vocabulary model allocates the [tokens, 151936]
// logits (1.2 GB at 8 x 256 tokens) and several blocks of the embedding's size; glibc serves every
// block over 32 MB with a fresh mmap and unmaps it on free (or trims the heap top back), so each step
// page-faulted its whole working set in again: half of the step's time was kernel time. With mmap off
// and no trimming the blocks are reused: LoRA training of the demo base 340-357 -> 412-462 tokens/s,
// kernel time 30 -> 12 s over 8 steps (2 cores). mallopt() cannot do it: its trim threshold is an int
// (2 GB), below what a step frees. The cost: a process keeps its peak heap. A user's own
// GLIBC_TUNABLES is left alone.
constexpr const char* kTunables = "GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736";

void settle_environment(int, char** argv, char** envp) {
  bool omp = false, tunables = false;
  for (char** e = envp; *e; ++e) {
    omp = omp || std::strncmp(*e, "OMP_WAIT_POLICY=", 16) == 0;
    tunables = tunables || std::strncmp(*e, "GLIBC_TUNABLES=", 15) == 0;
  }
  if (omp && tunables) return;
  std::vector<char*> env;
  for (char** e = envp; *e; ++e) env.push_back(*e);
  if (!omp) {
    env.push_back(const_cast<char*>("OMP_WAIT_POLICY=PASSIVE"));
    env.push_back(const_cast<char*>(kMarker));
  }
  if (!tunables) env.push_back(const_cast<char*>(kTunables));
  env.push_back(nullptr);
  ::execve("/proc/self/exe", argv, env.data());
}

}  // namespace

bool omp_wait_policy_set_by_fedmoe() {
  const char* v = std::getenv("FEDMOE_DEFAULTED_OMP_WAIT_POLICY");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace fedmoe::runtime

// Executables only: the dynamic loader runs DT_PREINIT_ARRAY before every DT_INIT/constructor.
__attribute__((section(".preinit_array"), used)) static void (*const fedmoe_preinit)(int, char**, char**) =
    &fedmoe::runtime::settle_environment;
