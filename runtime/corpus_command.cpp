#include "runtime/corpus_command.hpp"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <cmath>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "model/corpus.hpp"

namespace fedmoe::runtime {

namespace {

using json = nlohmann::json;

struct CorpusFlags {
  std::string out = "data/corpus";
  std::vector<std::string> domains;  // NAME=KIND:DIR[,KIND:DIR...]; none: python, sql, docs defaults
  int workers = 2;
  double validation_fraction = 0.05;
  size_t max_validation = 256;
  size_t max_bytes = 4u << 20;
  size_t min_chars = 200;
  size_t max_chars = 1200;
  size_t min_examples = 40;
};

void run_corpus(const CorpusFlags& f) {
  model::CorpusOptions o;
  if (f.domains.empty()) {
    o.domains = model::default_corpus_domains();
  } else {
    for (const auto& spec : f.domains) o.domains.push_back(model::parse_corpus_domain(spec));
  }
  o.out_dir = f.out;
  o.workers = f.workers;
  o.validation_fraction = f.validation_fraction;
  o.max_validation = f.max_validation;
  o.max_bytes = f.max_bytes;
  o.min_chars = f.min_chars;
  o.max_chars = f.max_chars;
  o.min_examples = f.min_examples;
  const auto start = std::chrono::steady_clock::now();
  model::build_corpus(o);
  // The result line carries what the manifest records per domain (sources and sizes).
  std::ifstream manifest_file(std::filesystem::path(f.out) / "manifest.json");
  const json manifest = json::parse(manifest_file);
  const json& domains = manifest.at("domains");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << json{{"corpus", f.out}, {"domains", domains}, {"seconds", std::round(seconds * 100) / 100}}.dump()
            << std::endl;
}

}  // namespace

void add_corpus_command(CLI::App& app) {
  auto f = std::make_shared<CorpusFlags>();
  auto* c = app.add_subcommand(
      "corpus", "build per-domain train/validation/worker JSON lines from local documents (python, sql, docs)");
  c->add_option("--out", f->out, "output directory: OUT/<domain>/{train,validation,worker-K}.jsonl, OUT/manifest.json");
  c->add_option("--domain", f->domains,
                "NAME=KIND:DIR[,KIND:DIR...] with KIND python|sql|html-sql|man (repeatable; default: python = "
                "the Python standard library, sql = PostgreSQL's extension scripts + the SQL of its HTML "
                "documentation, docs = the manual pages)");
  c->add_option("--workers", f->workers, "private train parts per domain (whole source files each)")->check(CLI::Range(1, 1024));
  c->add_option("--validation-fraction", f->validation_fraction, "share of chunks held out")->check(CLI::Range(0.0, 0.5));
  c->add_option("--max-validation", f->max_validation, "validation examples kept per domain");
  c->add_option("--max-bytes", f->max_bytes, "text kept per domain (a content-hash sample when there is more)");
  c->add_option("--min-chars", f->min_chars, "shorter pieces are merged with the next");
  c->add_option("--max-chars", f->max_chars, "longer pieces are cut at blank lines / line ends");
  c->add_option("--min-examples", f->min_examples, "fewer train examples in a domain is an error");
  c->callback([f] {
    try {
      run_corpus(*f);
    } catch (const std::exception& e) {
      std::cerr << "fedmoe corpus: " << e.what() << std::endl;
      throw CLI::RuntimeError(1);  // CLI11 exits with it silently: the message is out already
    }
  });
}

}  // namespace fedmoe::runtime
