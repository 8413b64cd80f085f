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
void settle_environment(int, char** argv, char** envp) {
  for (char** e = envp; *e; ++e)
    if (std::strncmp(*e, "OMP_WAIT_POLICY=", 16) == 0) return;
  std::vector<char*> env;
  for (char** e = envp; *e; ++e) env.push_back(*e);
  env.push_back(const_cast<char*>("OMP_WAIT_POLICY=PASSIVE"));
  env.push_back(const_cast<char*>(kMarker));
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
