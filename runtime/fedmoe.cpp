// `fedmoe`: model tools — tokenize, corpus, pretrain, finetune, eval, generate, export-peft, import-peft, inspect, report.
#include <CLI/CLI.hpp>

#include "runtime/corpus_command.hpp"
#include "runtime/model_commands.hpp"
#include "runtime/report_command.hpp"
#include "runtime/tokenize_command.hpp"

int main(int argc, char** argv) {
  CLI::App app{"fedmoe: model tools for Qwen2-architecture models and LoRA experts"};
  app.option_defaults()->always_capture_default();
  app.require_subcommand(1);
  fedmoe::runtime::add_model_commands(app);
  fedmoe::runtime::add_tokenize_command(app);
  fedmoe::runtime::add_corpus_command(app);
  fedmoe::runtime::add_report_command(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
