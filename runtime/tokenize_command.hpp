// `fedmoe tokenize`: the tokenizer as a filter. Encode mode reads JSON lines {"text": "..."} on
// stdin and writes one JSON array of ids per line; --decode reads JSON arrays of ids and writes
// {"text": "..."} lines. A bad line stops it with the line number on stderr and exit status 1.
#pragma once

#include <CLI/CLI.hpp>

namespace fedmoe::runtime {

void add_tokenize_command(CLI::App& app);

}  // namespace fedmoe::runtime
