#include "runtime/model_commands.hpp"

#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "model/checkpoint.hpp"
#include "model/data.hpp"
#include "model/dataset.hpp"
#include "model/evaluation.hpp"
#include "model/generation.hpp"
#include "model/lm_loss.hpp"
#include "model/lora.hpp"
#include "model/qwen2.hpp"
#include "model/routing.hpp"
#include "model/tokenizer.hpp"
#include "model/trainer.hpp"

namespace fedmoe::runtime {

namespace fs = std::filesystem;
using namespace fedmoe::model;
using json = nlohmann::json;

namespace {

// A user-facing failure: main prints the message and exits 1 (never a LibTorch stack dump).
struct CommandError : std::runtime_error {
  using std::runtime_error::runtime_error;
};


torch::Device parse_device(const std::string& text) {
  if (text == "cpu") return torch::kCPU;
  if (text.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available())
      throw CommandError("--device " + text + ": CUDA is not available (this LibTorch build or machine has no GPU)");
    try {
      return torch::Device(text);
    } catch (const c10::Error&) {
      throw CommandError("--device " + text + ": expected cpu or cuda:N");
    }
  }
  throw CommandError("--device " + text + ": expected cpu or cuda:N");
}


struct TrainFlags {
  int64_t steps = 100, seq_len = 128, batch = 4, accum = 1, warmup = 10, eval_every = 0, save_every = 0;
  double lr = 1e-3, min_lr_ratio = 0.1, weight_decay = 0.0, clip = 1.0, val_fraction = 0.05;
  uint64_t seed = 0;
  bool resume = false;

  void add(CLI::App* c) {
    c->add_option("--steps", steps, "optimizer steps");
    c->add_option("--seq-len", seq_len, "tokens per packed sequence");
    c->add_option("--batch", batch, "sequences per micro-batch");
    c->add_option("--grad-accum", accum, "micro-batches per step");
    c->add_option("--lr", lr, "peak learning rate (AdamW)");
    c->add_option("--warmup", warmup, "linear warmup steps, then cosine decay");
    c->add_option("--min-lr-ratio", min_lr_ratio, "the cosine decays to lr x this (1 = constant after the warmup)")
        ->check(CLI::Range(0.0, 1.0));
    c->add_option("--weight-decay", weight_decay, "AdamW weight decay");
    c->add_option("--clip", clip, "gradient norm clip (0 = off)");
    c->add_option("--eval-every", eval_every, "evaluate every N steps (0 = at the end)");
    c->add_option("--save-every", save_every, "checkpoint every N steps (0 = at the end)");
    c->add_option("--val-fraction", val_fraction, "share of examples held out for validation");
    c->add_option("--seed", seed, "data order and initialization seed");
    c->add_flag("--resume", resume, "continue from OUT/trainer/checkpoint-last");
  }

  TrainConfig config(const std::string& out) const {
    TrainConfig c;
    c.lr = lr;
    c.min_lr_ratio = min_lr_ratio;
    c.weight_decay = weight_decay;
    c.max_grad_norm = clip;
    c.warmup_steps = warmup;
    c.total_steps = steps;
    c.batch_size = batch;
    c.grad_accum = accum;
    c.eval_every = eval_every;
    c.save_every = save_every;
    c.seed = seed;
    c.out_dir = (fs::path(out) / "trainer").string();
    return c;
  }
};

void print_result(const char* what, const TrainResult& r, const std::string& out) {
  nlohmann::json j = {{"command", what}, {"steps", r.steps}, {"train_loss", r.last_loss},
                      {"tokens_per_s", r.tokens_per_second}, {"out", out}};
  if (r.last_eval) j["val_loss"] = r.last_eval->loss, j["val_ppl"] = r.last_eval->perplexity;
  std::cout << j.dump() << std::endl;
}

// --- commands ---------------------------------------------------------------------------------------

struct PretrainFlags {
  std::string model_config, tokenizer, out, device = "cpu";
  std::vector<std::string> data;
  TrainFlags train;
};

void run_pretrain(const PretrainFlags& f) {
  const auto device = parse_device(f.device);
  if (!fs::exists(f.model_config)) throw CommandError("model config not found: " + f.model_config);
  auto config = load_qwen2_config(f.model_config);
  auto tok = load_tokenizer(f.tokenizer, "");
  if (tok.vocab_size() > config.vocab_size)
    throw CommandError(f.model_config + ": vocab_size " + std::to_string(config.vocab_size) +
                       " is smaller than the tokenizer's " + std::to_string(tok.vocab_size()));
  auto data = prepare(load_examples(f.data), tok, f.train.seq_len, f.train.val_fraction, f.train.seed);
  torch::manual_seed(f.train.seed);
  Qwen2ForCausalLM model(config);
  model->to(device);
  TrainTarget target;
  for (auto& p : model->named_parameters()) target.params.emplace_back(p.key(), p.value());
  target.loss = [model, device](const torch::Tensor& ids, const torch::Tensor& labels) mutable {
    return causal_lm_loss(model, ids.to(device), labels.to(device));
  };
  target.set_training = [model](bool on) mutable { model->train(on); };
  Trainer trainer(target, f.train.config(f.out));
  if (f.train.resume) trainer.resume((fs::path(f.out) / "trainer" / "checkpoint-last").string());
  std::cerr << "pretrain: " << data.train.size() << " training and " << data.validation.size()
            << " validation sequences of " << f.train.seq_len << " tokens\n";
  auto r = trainer.run(data.train, data.validation);
  save_pretrained(model, f.out);
  fs::copy_file(f.tokenizer.empty() ? kDefaultTokenizerPath : f.tokenizer, fs::path(f.out) / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  print_result("pretrain", r, f.out);
}

struct FinetuneFlags {
  std::string base_model, tokenizer, out, device = "cpu", expert = "expert";
  std::vector<std::string> data;
  int64_t rank = 16;
  double alpha = 32, dropout = 0.05;
  std::vector<std::string> targets{"q_proj", "v_proj"};
  bool rslora = false;
  TrainFlags train;
};

void run_finetune(const FinetuneFlags& f) {
  const auto device = parse_device(f.device);
  auto tok = load_tokenizer(f.tokenizer, f.base_model);
  auto data = prepare(load_examples(f.data), tok, f.train.seq_len, f.train.val_fraction, f.train.seed);
  auto base = load_pretrained(f.base_model);
  LoraExperts experts(base);
  experts.to(device);
  LoraSpec spec;
  spec.rank = f.rank;
  spec.alpha = f.alpha;
  spec.dropout = f.dropout;
  spec.target_modules = f.targets;
  spec.use_rslora = f.rslora;
  experts.attach(f.expert, spec, LoraInit::peft, f.train.seed);
  experts.activate(f.expert);
  TrainTarget target;
  for (auto& [name, p] : experts.named_parameters(f.expert)) target.params.emplace_back(name, p);
  target.loss = [base, device](const torch::Tensor& ids, const torch::Tensor& labels) mutable {
    return causal_lm_loss(base, ids.to(device), labels.to(device));
  };
  target.set_training = [base](bool on) mutable { base->train(on); };
  Trainer trainer(target, f.train.config(f.out));
  if (f.train.resume) trainer.resume((fs::path(f.out) / "trainer" / "checkpoint-last").string());
  std::cerr << "finetune: LoRA rank " << spec.rank << " on";
  for (auto& m : spec.target_modules) std::cerr << " " << m;
  std::cerr << "; " << data.train.size() << " training and " << data.validation.size() << " validation sequences\n";
  auto r = trainer.run(data.train, data.validation);
  save_peft_adapter(experts, f.expert, f.out, f.base_model);
  print_result("finetune", r, f.out);
}

struct EvalFlags {
  std::string base_model, adapter, tokenizer, device = "cpu", router_model;
  std::vector<std::string> data, experts, domains;
  int64_t seq_len = 128, batch = 4;
  size_t max_examples = 0;
};

json summary_json(const LossSummary& s) {
  return {{"loss", s.loss}, {"perplexity", s.perplexity}, {"tokens", s.tokens}, {"examples", s.examples}};
}

// fedmoe eval --expert NAME=DIR ... --domain NAME=FILE ...: every model on every domain, per example
// (model/evaluation.hpp), the learned router's confusion matrix and routed perplexity on the mix.
void run_eval_matrix(const EvalFlags& f) {
  if (!f.adapter.empty()) throw CommandError("--adapter is for one adapter on --data; with --domain give --expert NAME=DIR");
  if (!f.data.empty()) throw CommandError("--data and --domain do not mix: name every file's domain with --domain NAME=FILE");
  const auto device = parse_device(f.device);
  auto tok = load_tokenizer(f.tokenizer, f.base_model);
  std::vector<std::pair<std::string, std::vector<Example>>> domains;
  try {
    domains = load_domain_examples(f.domains);
  } catch (const std::invalid_argument& e) {
    throw CommandError(std::string("--domain: ") + e.what());
  }
  auto base = load_pretrained(f.base_model);
  LoraExperts experts(base);
  experts.to(device);
  std::vector<std::string> names;
  for (const auto& spec : f.experts) {
    const auto eq = spec.find('=');
    if (eq == 0 || eq == std::string::npos || eq + 1 == spec.size())
      throw CommandError("--expert " + spec + ": expected NAME=ADAPTER_DIR");
    const auto name = spec.substr(0, eq);
    if (name == "base") throw CommandError("--expert base=...: 'base' names the row of the base model alone");
    if (experts.contains(name)) throw CommandError("--expert " + name + " is given twice");
    load_peft_adapter(experts, name, spec.substr(eq + 1));
    names.push_back(name);
  }
  std::optional<HiddenStateRouter> router;
  if (!f.router_model.empty()) router = HiddenStateRouter::load(f.router_model, base->config().hidden_size);
  ExpertEvalConfig cfg;
  cfg.seq_len = size_t(f.seq_len);
  cfg.batch = f.batch;
  cfg.max_examples = f.max_examples;
  ExpertEvalReport r;
  try {
    r = evaluate_experts(experts, names, domains, tok, router ? &*router : nullptr, cfg,
                         [](const std::string& m) { std::cerr << "eval: " << m << " done" << std::endl; });
  } catch (const std::invalid_argument& e) {
    throw CommandError(e.what());
  }
  json out = {{"command", "eval"}, {"models", r.models}, {"domains", r.domains}, {"seconds", r.seconds}};
  for (const auto& m : r.models) {
    for (const auto& d : r.domains) out["matrix"][m][d] = summary_json(r.cells[m][d]);
    out["mixed"][m] = summary_json(r.mixed[m]);
  }
  // A readable perplexity matrix on stderr (rows: models, columns: domains).
  std::cerr << "perplexity";
  for (const auto& d : r.domains) std::cerr << "\t" << d;
  std::cerr << "\tmixed\n";
  for (const auto& m : r.models) {
    std::cerr << m;
    for (const auto& d : r.domains) std::cerr << "\t" << r.cells[m][d].perplexity;
    std::cerr << "\t" << r.mixed[m].perplexity << "\n";
  }
  if (r.has_router) {
    json confusion = json::object();
    for (const auto& [truth, row] : r.router.confusion)
      for (const auto& [routed, n] : row) confusion[truth][routed] = n;
    out["router"] = {{"experts", r.router.experts},   {"accuracy", r.router.accuracy},
                     {"examples", r.router.examples}, {"correct", r.router.correct},
                     {"confusion", confusion},        {"routed", summary_json(r.router.routed)}};
    std::cerr << "routed\t(mixed)\t" << r.router.routed.perplexity << "\trouter accuracy " << r.router.accuracy << "\n";
  }
  std::cout << out.dump() << std::endl;
}

void run_eval(const EvalFlags& f) {
  if (!f.domains.empty() || !f.experts.empty() || !f.router_model.empty()) {
    if (f.domains.empty()) throw CommandError("--expert and --router-model evaluate on --domain NAME=FILE data");
    return run_eval_matrix(f);
  }
  if (f.data.empty()) throw CommandError("give --data FILE (one model) or --domain NAME=FILE (the matrix)");
  const auto device = parse_device(f.device);
  auto tok = load_tokenizer(f.tokenizer, f.base_model);
  auto examples = load_examples(f.data);
  auto enc = encoder_for(tok);
  std::vector<TokenizedExample> t;
  for (auto& ex : examples) t.push_back(tokenize(ex, enc));
  auto seqs = pack(t, f.seq_len, enc.eos >= 0 ? enc.eos : 0);
  auto base = load_pretrained(f.base_model);
  LoraExperts experts(base);
  experts.to(device);
  if (!f.adapter.empty()) {
    load_peft_adapter(experts, "adapter", f.adapter);
    experts.activate("adapter");
  }
  TrainTarget target;
  target.params.emplace_back("unused", torch::zeros({1}, torch::requires_grad()));
  target.loss = [base, device](const torch::Tensor& ids, const torch::Tensor& labels) mutable {
    return causal_lm_loss(base, ids.to(device), labels.to(device));
  };
  target.set_training = [base](bool on) mutable { base->train(on); };
  TrainConfig cfg;
  cfg.batch_size = f.batch;
  auto r = Trainer(target, cfg).evaluate(seqs);
  std::cout << nlohmann::json{{"command", "eval"}, {"loss", r.loss}, {"perplexity", r.perplexity}, {"tokens", r.tokens},
                              {"adapter", f.adapter}}.dump()
            << std::endl;
}

struct GenerateFlags {
  std::string base_model, adapter, tokenizer, prompt, system, device = "cpu";
  bool chat = false;
  GenerationOptions gen;
};

void run_generate(GenerateFlags f) {
  const auto device = parse_device(f.device);
  auto tok = load_tokenizer(f.tokenizer, f.base_model);
  auto base = load_pretrained(f.base_model);
  base->eval();
  LoraExperts experts(base);
  experts.to(device);
  if (!f.adapter.empty()) {
    load_peft_adapter(experts, "adapter", f.adapter);
    experts.activate("adapter");
    experts.merge();  // inference at the base's cost
  }
  std::vector<int64_t> prompt;
  auto enc = encoder_for(tok);
  if (f.chat) {
    std::vector<ChatMessage> msgs;
    if (!f.system.empty()) msgs.push_back({"system", f.system});
    msgs.push_back({"user", f.prompt});
    Example ex{Example::Kind::chat, {}, {}, {}, msgs};
    // The template without the (absent) answer: all turns, then "<|im_start|>assistant\n".
    auto rendered = render_chat(msgs, true);
    for (auto id : tok.encode(rendered)) prompt.push_back(id);
    if (enc.im_end >= 0) f.gen.stop_tokens.push_back(enc.im_end);
  } else {
    for (auto id : tok.encode(f.prompt)) prompt.push_back(id);
  }
  for (auto id : base->config().eos_token_ids) f.gen.stop_tokens.push_back(id);
  if (prompt.empty()) throw CommandError("empty prompt");
  KVCache cache;
  StepFn step = [&](const std::vector<int64_t>& toks) {
    auto ids = torch::tensor(toks, torch::kInt64).unsqueeze(0).to(device);  // [1, T]
    // Sampling runs on the CPU: one [V] row per step is cheap to bring over.
    return base->forward(ids, {}, {}, &cache, /*logits_to_keep=*/1).reshape({-1}).to(torch::kCPU);  // [V]
  };
  // Stream text as it becomes valid UTF-8: decode everything so far, print what is new.
  std::vector<int32_t> out_ids;
  size_t printed = 0;
  auto r = generate(step, prompt, f.gen, [&](int64_t t) {
    if (std::find(f.gen.stop_tokens.begin(), f.gen.stop_tokens.end(), t) != f.gen.stop_tokens.end()) return true;
    out_ids.push_back(static_cast<int32_t>(t));
    auto text = tok.decode(out_ids, true);
    if (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0) return true;  // incomplete char
    if (text.size() > printed) {
      std::cout << text.substr(printed) << std::flush;
      printed = text.size();
    }
    return true;
  });
  std::cout << std::endl;
  std::cerr << "generate: " << r.tokens.size() << " tokens, stopped by "
            << (r.stop == GenerationResult::Stop::stop_token ? "a stop token" : "max_new_tokens") << "\n";
}

struct ExportFlags {
  std::string from, checkpoint = "best", out;
};

// A finetune run's trainer checkpoint (best or last) as a PEFT adapter directory.
void run_export_peft(const ExportFlags& f) {
  auto config = fs::path(f.from) / "adapter_config.json";
  if (!fs::exists(config)) throw CommandError(f.from + ": no adapter_config.json (expected a `fedmoe finetune --out` directory)");
  auto spec = load_adapter_config(config.string());
  auto ckpt = fs::path(f.from) / "trainer" / (f.checkpoint == "last" ? "checkpoint-last" : "best") / "trainer.pt";
  if (!fs::exists(ckpt)) throw CommandError("no " + f.checkpoint + " checkpoint at " + ckpt.string());
  torch::serialize::InputArchive archive;
  archive.load_from(ckpt.string());
  std::map<std::string, torch::Tensor> tensors;
  const std::string prefix = "param/";
  for (const auto& key : archive.keys()) {
    if (key.rfind(prefix, 0) != 0) continue;
    torch::Tensor t;
    archive.read(key, t);
    tensors[key.substr(prefix.size())] = t;
  }
  if (tensors.empty()) throw CommandError(ckpt.string() + " holds no adapter parameters");
  std::string base;
  {
    std::ifstream in(config);
    base = nlohmann::json::parse(in).value("base_model_name_or_path", "");
  }
  std::string out = f.out.empty() ? (fs::path(f.from) / ("export-" + f.checkpoint)).string() : f.out;
  fs::create_directories(out);
  save_adapter_config(spec, base, (fs::path(out) / "adapter_config.json").string());
  write_safetensors((fs::path(out) / "adapter_model.safetensors").string(), tensors, {{"format", "pt"}});
  std::cout << nlohmann::json{{"command", "export-peft"}, {"out", out}, {"checkpoint", f.checkpoint},
                              {"tensors", tensors.size()}}.dump()
            << std::endl;
}

struct ImportFlags {
  std::string adapter, base_model, tokenizer;
};

// Checks that a PEFT adapter (ours, or one trained with Python PEFT) fits a base model, and how much
// it changes the base's output on a probe.
void run_import_peft(const ImportFlags& f) {
  auto base = load_pretrained(f.base_model);
  base->eval();
  LoraExperts experts(base);
  load_peft_adapter(experts, "imported", f.adapter);
  auto tok = load_tokenizer(f.tokenizer, f.base_model);
  std::vector<int64_t> probe;
  for (auto id : tok.encode("def main():\n    return 0\n")) probe.push_back(id);
  torch::NoGradGuard no_grad;
  auto ids = torch::tensor(probe, torch::kInt64).unsqueeze(0);  // [1, T]
  auto before = base->forward(ids);
  experts.activate("imported");
  auto after = base->forward(ids);
  const auto& spec = experts.spec("imported");
  int64_t params = 0;
  for (auto& [name, p] : experts.named_parameters("imported")) params += p.numel();
  std::cout << nlohmann::json{{"command", "import-peft"}, {"adapter", f.adapter}, {"base_model", f.base_model},
                              {"fits", true}, {"rank", spec.rank}, {"alpha", spec.alpha},
                              {"target_modules", spec.target_modules}, {"parameters", params},
                              {"probe_logit_change_max", (after - before).abs().max().item<double>()}}.dump()
            << std::endl;
}

struct InspectFlags {
  std::string model_dir, adapter, preset;
  bool tensors = false;
};

void run_inspect(const InspectFlags& f) {
  nlohmann::json j;
  if (!f.model_dir.empty()) {
    if (!fs::exists(fs::path(f.model_dir) / "config.json")) throw CommandError(f.model_dir + ": no config.json");
    auto config = load_qwen2_config((fs::path(f.model_dir) / "config.json").string());
    auto ckpt = SafetensorsCheckpoint::open(f.model_dir);
    int64_t params = 0, embedding = 0;
    nlohmann::json list = nlohmann::json::array();
    for (const auto& t : ckpt.tensors()) {
      params += t.numel();
      if (t.name == "model.embed_tokens.weight" || t.name == "lm_head.weight") embedding += t.numel();
      if (f.tensors) list.push_back({{"name", t.name}, {"dtype", to_string(t.dtype)}, {"shape", t.shape}});
    }
    j["model"] = f.model_dir;
    j["config"] = nlohmann::json::parse(qwen2_config_to_json(config));
    j["parameters"] = params;
    j["embedding_parameters"] = embedding;
    j["tensor_count"] = ckpt.size();
    if (f.tensors) j["tensors"] = list;
  }
  if (!f.adapter.empty()) {
    auto spec = load_adapter_config((fs::path(f.adapter) / "adapter_config.json").string());
    auto file = SafetensorsFile::open(fs::path(f.adapter) / "adapter_model.safetensors");
    int64_t params = 0;
    for (const auto& t : file->tensors()) params += t.numel();
    j["adapter"] = {{"path", f.adapter}, {"rank", spec.rank}, {"alpha", spec.alpha}, {"scale", spec.scale()},
                    {"target_modules", spec.target_modules}, {"parameters", params}, {"tensor_count", file->size()}};
  }
  if (!f.preset.empty()) {
    auto config = qwen2_preset(f.preset);
    j["preset"] = nlohmann::json::parse(qwen2_config_to_json(config));
  }
  if (j.is_null()) throw CommandError("inspect: give --model DIR, --adapter DIR or --preset NAME");
  std::cout << j.dump(2) << std::endl;
}

// Runs a command body, turning every failure into one clear line and exit status 1.
template <class F>
void guarded(F&& body) {
  try {
    body();
  } catch (const CLI::Error&) {
    throw;
  } catch (const c10::Error& e) {
    std::cerr << "fedmoe: " << e.what_without_backtrace() << std::endl;
    throw CLI::RuntimeError(1);  // CLI11 exits with it silently: the message is out already
  } catch (const std::exception& e) {
    std::cerr << "fedmoe: " << e.what() << std::endl;
    throw CLI::RuntimeError(1);
  }
}

}  // namespace

void add_model_commands(CLI::App& app) {
  auto pre = std::make_shared<PretrainFlags>();
  auto* p = app.add_subcommand("pretrain", "train a Qwen2-architecture base model from scratch on local text");
  p->add_option("--model-config", pre->model_config, "config.json of the architecture (see examples/models/)")->required();
  p->add_option("--data", pre->data, "text, PDF or .jsonl files")->required();
  p->add_option("--out", pre->out, "output model directory (config.json, model.safetensors, tokenizer.json)")->required();
  p->add_option("--tokenizer", pre->tokenizer, "tokenizer.json (default: the Qwen tokenizer scripts/setup installs)");
  p->add_option("--device", pre->device, "cpu or cuda:N");
  pre->train.add(p);
  p->callback([pre] { guarded([&] { run_pretrain(*pre); }); });

  auto fin = std::make_shared<FinetuneFlags>();
  auto* ft = app.add_subcommand("finetune", "train a LoRA expert on a base model; writes a PEFT adapter directory");
  ft->add_option("--base-model", fin->base_model, "Hugging Face Qwen2 directory")->required();
  ft->add_option("--data", fin->data, ".jsonl (text, prompt/completion or chat messages), text or PDF files")->required();
  ft->add_option("--out", fin->out, "adapter directory (adapter_config.json, adapter_model.safetensors, trainer/)")->required();
  ft->add_option("--expert", fin->expert, "adapter name");
  ft->add_option("--rank", fin->rank, "LoRA rank");
  ft->add_option("--alpha", fin->alpha, "LoRA alpha");
  ft->add_option("--dropout", fin->dropout, "LoRA dropout");
  ft->add_option("--targets", fin->targets, "target modules (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
      ->delimiter(',');
  ft->add_flag("--rslora", fin->rslora, "scale alpha / sqrt(r)");
  ft->add_option("--tokenizer", fin->tokenizer, "tokenizer.json (default: BASE/tokenizer.json)");
  ft->add_option("--device", fin->device, "cpu or cuda:N");
  fin->train.add(ft);
  ft->callback([fin] { guarded([&] { run_finetune(*fin); }); });

  auto ev = std::make_shared<EvalFlags>();
  auto* e = app.add_subcommand("eval", "validation loss and perplexity of a base model, with or without an adapter; "
                                        "or of the base and several experts on several domains (a matrix)");
  e->add_option("--base-model", ev->base_model, "Hugging Face Qwen2 directory")->required();
  e->add_option("--adapter", ev->adapter, "PEFT adapter directory");
  e->add_option("--data", ev->data, "data files");
  e->add_option("--expert", ev->experts, "NAME=ADAPTER_DIR: an expert of the matrix (repeatable)");
  e->add_option("--domain", ev->domains, "NAME=FILE[,FILE]: a domain's validation data, a column of the matrix (repeatable)");
  e->add_option("--router-model", ev->router_model,
                "learned router file: its confusion matrix on the domains and routed perplexity on their mix");
  e->add_option("--max-examples", ev->max_examples, "matrix: examples per domain, the first ones (0 = all)");
  e->add_option("--seq-len", ev->seq_len, "tokens per sequence");
  e->add_option("--batch", ev->batch, "sequences per batch");
  e->add_option("--tokenizer", ev->tokenizer, "tokenizer.json (default: BASE/tokenizer.json)");
  e->add_option("--device", ev->device, "cpu or cuda:N");
  e->callback([ev] { guarded([&] { run_eval(*ev); }); });

  auto gen = std::make_shared<GenerateFlags>();
  auto* g = app.add_subcommand("generate", "generate text (streamed) from a base model, with or without an adapter");
  g->add_option("--base-model", gen->base_model, "Hugging Face Qwen2 directory")->required();
  g->add_option("--adapter", gen->adapter, "PEFT adapter directory");
  g->add_option("--prompt", gen->prompt, "prompt text")->required();
  g->add_flag("--chat", gen->chat, "wrap the prompt in the Qwen chat template");
  g->add_option("--system", gen->system, "system message (with --chat)");
  g->add_option("--max-new-tokens", gen->gen.max_new_tokens, "tokens to generate at most");
  g->add_option("--temperature", gen->gen.sampling.temperature, "0 = greedy");
  g->add_option("--top-k", gen->gen.sampling.top_k, "0 = off");
  g->add_option("--top-p", gen->gen.sampling.top_p, "1 = off");
  g->add_option("--repetition-penalty", gen->gen.sampling.repetition_penalty, "1 = off");
  g->add_option("--seed", gen->gen.sampling.seed, "sampling seed");
  g->add_option("--tokenizer", gen->tokenizer, "tokenizer.json (default: BASE/tokenizer.json)");
  g->add_option("--device", gen->device, "cpu or cuda:N");
  g->callback([gen] { guarded([&] { run_generate(*gen); }); });

  auto ex = std::make_shared<ExportFlags>();
  auto* x = app.add_subcommand("export-peft", "write a finetune run's best (or last) checkpoint as a PEFT adapter directory");
  x->add_option("--from", ex->from, "the `fedmoe finetune --out` directory")->required();
  x->add_option("--checkpoint", ex->checkpoint, "best or last")->check(CLI::IsMember({"best", "last"}));
  x->add_option("--out", ex->out, "output directory (default FROM/export-CHECKPOINT)");
  x->callback([ex] { guarded([&] { run_export_peft(*ex); }); });

  auto im = std::make_shared<ImportFlags>();
  auto* m = app.add_subcommand("import-peft", "check that a PEFT adapter fits a base model and show its effect");
  m->add_option("--adapter", im->adapter, "PEFT adapter directory")->required();
  m->add_option("--base-model", im->base_model, "Hugging Face Qwen2 directory")->required();
  m->add_option("--tokenizer", im->tokenizer, "tokenizer.json (default: BASE/tokenizer.json)");
  m->callback([im] { guarded([&] { run_import_peft(*im); }); });

  auto ins = std::make_shared<InspectFlags>();
  auto* i = app.add_subcommand("inspect", "a model's config, parameter counts and tensors; an adapter's spec; a preset");
  i->add_option("--model", ins->model_dir, "Hugging Face Qwen2 directory");
  i->add_option("--adapter", ins->adapter, "PEFT adapter directory");
  i->add_option("--preset", ins->preset, "qwen2-0.5b|qwen2-1.5b|qwen2-7b|tiny");
  i->add_flag("--tensors", ins->tensors, "list every tensor");
  i->callback([ins] { guarded([&] { run_inspect(*ins); }); });
}

}  // namespace fedmoe::runtime
