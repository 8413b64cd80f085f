// The `fedmoe` model tools: pretrain, finetune, eval, generate, export-peft, import-peft, inspect (tokenize lives in
// runtime/tokenize_command.hpp). Each add_* registers a CLI11 subcommand whose callback runs it.
#pragma once

#include <CLI/CLI.hpp>

namespace fedmoe::runtime {

void add_model_commands(CLI::App& app);

}  // namespace fedmoe::runtime
