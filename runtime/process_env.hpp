// Process-wide environment that fedmoe's executables settle before any library initializes (linked
// into fedmoe, fedmoe-node and the benchmarks as the object library fedmoe_process_env).
#pragma once

namespace fedmoe::runtime {

// True when this process had no OMP_WAIT_POLICY and fedmoe set it to PASSIVE (see process_env.cpp).
// Child processes that should run with the user's own environment (the benchmarks' Python baseline)
// drop the variable again.
bool omp_wait_policy_set_by_fedmoe();

}  // namespace fedmoe::runtime
