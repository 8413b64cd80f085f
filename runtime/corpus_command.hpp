// `fedmoe corpus`: builds the domain corpora (train, validation, one private part per worker) from
// documents Debian packages put on the machine; prints one JSON result line with the sizes.
#pragma once

#include <CLI/CLI.hpp>

namespace fedmoe::runtime {

void add_corpus_command(CLI::App& app);

}  // namespace fedmoe::runtime
