// Domain corpora from documents already on the machine: Python sources, SQL scripts, SQL examples in
// HTML documentation, and manual pages, cut into JSON-lines training examples per domain, with a
// held-out validation set and one private part per worker.
//
// Deterministic: files are read in sorted path order, duplicates are dropped by content (first
// occurrence wins), and every choice after that (which chunks fit the size cap, validation or
// train, which worker) is made from a hash of the content or of the source path, never from
// directory order or the clock. Workers get whole source files, so their parts are disjoint and
// differ in distribution (one worker sees the email package, another sqlite3), like private data;
// files are dealt out round-robin in the order of a hash of their path below the source root.
//
// Torch-free, tokenizer-free: plain text in, plain text out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedmoe::model {

struct CorpusError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How the text of a source file is extracted.
enum class SourceKind {
  python,     // *.py: source text, cut at top-level def/class boundaries
  sql,        // *.sql: scripts, psql meta-commands (\echo ...) removed, cut between statements
  html_sql,   // *.html: the <pre class="programlisting"> blocks that read as SQL
  man,        // man*/ pages (roff, optionally .gz) rendered to plain text, cut at paragraphs
};
SourceKind parse_source_kind(const std::string& text);  // python | sql | html-sql | man
const char* to_string(SourceKind kind);

// One directory tree to read, e.g. {sql, "/usr/share/postgresql/15/extension"}.
struct CorpusSource {
  SourceKind kind = SourceKind::python;
  std::string root;
};

struct CorpusDomain {
  std::string name;                  // the expert it feeds: python, sql, docs, ...
  std::vector<CorpusSource> sources;
};

// "NAME=KIND:DIR[,KIND:DIR...]", e.g. "sql=sql:/usr/share/postgresql/15/extension". Throws
// CorpusError naming the spec.
CorpusDomain parse_corpus_domain(const std::string& spec);

// python: the interpreter's standard library; sql: PostgreSQL's extension scripts and the SQL of its
// HTML documentation; docs: the manual pages (sections 1-8, English only). The directories Debian's
// packages install (python3.11 stdlib, postgresql-15, postgresql-doc-15, manpages, manpages-dev).
std::vector<CorpusDomain> default_corpus_domains();

struct CorpusOptions {
  std::vector<CorpusDomain> domains;
  std::string out_dir;
  int workers = 2;                    // private train parts per domain
  double validation_fraction = 0.05;  // of the chunks, chosen by content hash
  size_t max_validation = 256;        // validation examples kept per domain (evaluation cost)
  size_t max_bytes = 4u << 20;        // text kept per domain (train + validation)
  size_t min_chars = 200;             // a chunk shorter than this is merged with the next piece
  size_t max_chars = 1200;            // ... and a longer piece is cut at line boundaries
  size_t min_examples = 40;           // fewer train examples than this in a domain is an error
  size_t max_file_bytes = 1u << 20;   // larger files (generated tables, data) are skipped
};

struct CorpusDomainReport {
  std::string name;
  size_t files_read = 0;        // files that gave text
  size_t files_skipped = 0;     // unreadable, not UTF-8, too large, or a man-page link (.so)
  size_t chunks = 0;            // after cutting, before deduplication
  size_t duplicates = 0;        // chunks dropped as exact (whitespace-normalized) repeats
  size_t over_cap = 0;          // unique chunks left out by max_bytes
  size_t train = 0, validation = 0;
  size_t train_bytes = 0, validation_bytes = 0;
  std::vector<size_t> worker_examples;  // train examples per worker part
  std::vector<size_t> worker_bytes;
  std::vector<size_t> worker_files;     // distinct source files per worker part
};

struct CorpusReport {
  std::vector<CorpusDomainReport> domains;
};

// Writes OUT/<domain>/{train,validation}.jsonl and OUT/<domain>/worker-<k>.jsonl (k = 0..workers-1,
// a partition of train.jsonl), every line {"text": ...}, and OUT/manifest.json (options, sources and
// this report). Throws CorpusError when a source directory is missing or a domain gets fewer than
// min_examples train examples (naming the domain, its directories and the Debian package).
CorpusReport build_corpus(const CorpusOptions& options);

// Pieces of one file's text, before merging into chunks (exposed for tests).
std::vector<std::string> extract_pieces(SourceKind kind, const std::string& content);
// Roff (man(7), with the common mdoc macros) to plain text; exposed for tests.
std::string render_man(const std::string& roff);
// Merges pieces into chunks of min_chars..max_chars (a longer piece is cut at line boundaries).
std::vector<std::string> merge_pieces(const std::vector<std::string>& pieces, size_t min_chars, size_t max_chars);
// Reads a file, inflating it when its name ends in .gz. Throws CorpusError naming the file.
std::string read_maybe_gzip(const std::string& path);

}  // namespace fedmoe::model
