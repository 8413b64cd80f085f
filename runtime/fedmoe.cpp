// `fedmoe`: model tools. For now `inspect` shows a base shape's LoRA adapter layout; tokenize,
// pretrain, finetune, eval, generate and the PEFT import/export join it with the model layer.
#include <iostream>

#include <CLI/CLI.hpp>

#include "model/lora_expert.hpp"

using namespace fedmoe;

int main(int argc, char** argv) {
  CLI::App app{"fedmoe: model tools (inspect; more arrive with the model layer)"};
  app.require_subcommand(1);
  app.option_defaults()->always_capture_default();
  std::string preset = "qwen2-0.5b";
  model::LoraSpec spec;
  bool list = false;
  auto* inspect = app.add_subcommand("inspect", "show a Qwen2 shape and the LoRA adapter tensors PEFT would save");
  inspect->add_option("--preset", preset, "qwen2-0.5b|qwen2-1.5b|qwen2-7b|tiny");
  inspect->add_option("--rank", spec.rank, "LoRA rank");
  inspect->add_option("--alpha", spec.alpha, "LoRA alpha");
  inspect->add_option("--targets", spec.target_modules, "target modules")->delimiter(',');
  inspect->add_flag("--tensors", list, "list every adapter tensor with its shape");
  try {
    app.parse(argc, argv);
    auto cfg = model::qwen2_preset(preset);
    std::cout << "base " << preset << ": hidden " << cfg.hidden_size << ", layers " << cfg.num_hidden_layers
              << ", heads " << cfg.num_attention_heads << "/" << cfg.num_key_value_heads << " (head_dim "
              << cfg.head_dim << "), mlp " << cfg.intermediate_size << ", vocab " << cfg.vocab_size << "\n";
    int64_t params = model::lora_parameter_count(cfg, spec);
    std::cout << "LoRA rank " << spec.rank << ", alpha " << spec.alpha << " (scale " << spec.scale() << ") on";
    for (const auto& m : spec.target_modules) std::cout << " " << m;
    std::cout << ": " << params << " parameters, " << params * 4 << " bytes in fp32\n";
    if (list) {
      for (int64_t layer = 0; layer < cfg.num_hidden_layers; ++layer)
        for (const auto& m : spec.target_modules) {
          auto [in, out] = model::module_in_out(cfg, m);
          std::cout << "  layers." << layer << "." << m << ".lora_A.weight [" << spec.rank << ", " << in << "]\n"
                    << "  layers." << layer << "." << m << ".lora_B.weight [" << out << ", " << spec.rank << "]\n";
        }
    }
    return 0;
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "fedmoe: " << e.what() << std::endl;
    return 1;
  }
}
