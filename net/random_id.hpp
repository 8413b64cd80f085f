// Identifiers that must never repeat across restarts (update ids): 128 bits from the kernel's CSPRNG
// (getrandom), as 32 lowercase hex digits. Seeded generators repeat their ids when a process restarts
// with the same seed, and a shard then refuses every push as a duplicate.
#pragma once

#include <string>

namespace fedmoe::net {

// Throws std::runtime_error when the kernel has no randomness to give (never on Linux >= 3.17 once booted).
std::string random_id_128();

}  // namespace fedmoe::net
