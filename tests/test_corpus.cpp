// The corpus builder on a small tree of made-up sources shaped like the Debian ones: Python modules,
// extension SQL scripts, PostgreSQL-style HTML pages, gzipped man pages (with a link page, a
// translation and a corrupt file among them).
#include <catch2/catch.hpp>

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/corpus.hpp"

using namespace fedmoe::model;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("fedmoe-corpus-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

void write_gz(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f);
  REQUIRE(gzwrite(f, text.data(), static_cast<unsigned>(text.size())) == static_cast<int>(text.size()));
  gzclose(f);
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> texts(const fs::path& jsonl) {
  std::vector<std::string> out;
  std::ifstream in(jsonl);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  return out;
}

// A module with `n` distinct functions (about 150 characters each).
std::string python_module(const std::string& name, int n) {
  std::string s = "\"\"\"The " + name + " module.\"\"\"\nimport os\n\n";
  for (int i = 0; i < n; ++i)
    s += "@decorated\ndef " + name + "_f" + std::to_string(i) + "(path, count=" + std::to_string(i) +
         "):\n    \"\"\"Returns the " + std::to_string(i) + "th entry of " + name + ".\"\"\"\n    return os.path.join(path, str(count * " +
         std::to_string(i + 7) + "))\n\n";
  return s;
}

// The fixture: ROOT/py, ROOT/sql, ROOT/html, ROOT/man.
fs::path make_sources(const std::string& name) {
  const fs::path root = temp_dir(name);
  for (const char* m : {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"})
    write(root / "py" / (std::string(m) + ".py"), python_module(m, 12));
  write(root / "py" / "pkg" / "copy_of_alpha.py", python_module("alpha", 12));  // every chunk a duplicate
  write(root / "py" / "__pycache__" / "cached.py", python_module("cached", 12));  // skipped directory
  write(root / "py" / "binary.py", std::string("x = 1\0\0\0", 8));                 // not text: skipped
  for (int e = 0; e < 4; ++e) {
    std::string sql = "/* contrib/ext" + std::to_string(e) + " */\n\\echo Use \"CREATE EXTENSION ext\" to load this file. \\quit\n\n";
    for (int i = 0; i < 10; ++i)
      sql += "CREATE FUNCTION ext" + std::to_string(e) + "_fn" + std::to_string(i) +
             "(integer)\nRETURNS integer\nAS 'MODULE_PATHNAME'\nLANGUAGE C STRICT IMMUTABLE PARALLEL SAFE;\n\n";
    write(root / "sql" / ("ext" + std::to_string(e) + "--1.0.sql"), sql);
  }
  write(root / "html" / "tutorial.html",
        "<html><body><p>Some prose.</p><pre class=\"programlisting\">SELECT city, max(temp_lo)\n"
        "    FROM weather\n    WHERE temp_lo &lt; 40\n    GROUP BY city;</pre>"
        "<pre class=\"programlisting\">#include &lt;stdio.h&gt;\nint main(void) { return 0; }</pre>"
        "<pre class=\"programlisting\">CREATE TABLE <em class=\"replaceable\">cities</em> (name text, "
        "location point);</pre></body></html>");
  const std::string page =
      ".\\\" a comment line\n.TH FOO 1 \"2024\" \"foo 1.0\"\n.SH NAME\nfoo \\- frobnicate the \\fBbar\\fR files\n"
      ".SH SYNOPSIS\n.B foo\n[\\fB\\-v\\fR]\n.IR file ...\n.SH DESCRIPTION\n.B foo\nreads each\n.I file\n"
      "and writes it back \\(em frobnicated.\n.PP\nA second paragraph with \\(lqquotes\\(rq.\n"
      ".TP\n.BR \\-v \", \" \\-\\-verbose\nSay more.\n";
  for (int i = 0; i < 6; ++i) {
    std::string p = page;
    p.replace(p.find("FOO"), 3, "FOO" + std::to_string(i));
    p.replace(p.find("frobnicate"), 10, "frobnicate" + std::to_string(i));
    write_gz(root / "man" / "man1" / ("foo" + std::to_string(i) + ".1.gz"), p);
  }
  write(root / "man" / "man7" / "link.7", ".so man1/foo0.1\n");       // an alias page: skipped
  write_gz(root / "man" / "de" / "man1" / "foo.1.gz", page);          // a translation: not read
  write(root / "man" / "man8" / "corrupt.8.gz", "\x1f\x8b not really gzip");  // skipped, no crash
  return root;
}

CorpusOptions fixture_options(const fs::path& root, const fs::path& out) {
  CorpusOptions o;
  o.domains = {parse_corpus_domain("python=python:" + (root / "py").string()),
               parse_corpus_domain("sql=sql:" + (root / "sql").string() + ",html-sql:" + (root / "html").string()),
               parse_corpus_domain("docs=man:" + (root / "man").string())};
  o.out_dir = out.string();
  o.workers = 2;
  o.validation_fraction = 0.2;
  o.min_chars = 100;
  o.max_chars = 400;
  o.min_examples = 2;
  return o;
}

}  // namespace

TEST_CASE("render_man turns roff into plain text", "[corpus]") {
  const std::string text = render_man(
      ".\\\" comment\n.TH LS 1 2024\n.SH NAME\nls \\- list \\fIdirectory\\fP contents\n.SH OPTIONS\n"
      ".TP\n.BR \\-a \", \" \\-\\-all\ndo not ignore entries starting with \\(aq.\\(aq\n.PP\n"
      ".nf\nline one\n  line two\n.fi\n.B bold\nwords \\\" trailing comment\n");
  CHECK(text.find("LS(1)") != std::string::npos);
  CHECK(text.find("NAME\n\nls - list directory contents") != std::string::npos);
  CHECK(text.find("-a, --all do not ignore entries starting with '.'") != std::string::npos);
  CHECK(text.find("line one\n  line two") != std::string::npos);
  CHECK(text.find("bold words") != std::string::npos);
  CHECK(text.find("comment") == std::string::npos);
  CHECK(text.find("\\f") == std::string::npos);
  CHECK(render_man(".so man1/ls.1\n").empty());  // an alias page has no text of its own
}

TEST_CASE("python pieces start at top-level definitions with their decorators", "[corpus]") {
  const auto pieces =
      extract_pieces(SourceKind::python, "import os\n\n@cache\n@other\ndef f():\n    return 1\n\nclass C:\n    def m(self):\n        pass\n");
  REQUIRE(pieces.size() == 3);
  CHECK(pieces[0] == "import os\n\n");
  CHECK(pieces[1].rfind("@cache\n@other\ndef f():", 0) == 0);
  CHECK(pieces[2].rfind("class C:\n    def m(self):", 0) == 0);
}

TEST_CASE("sql pieces drop psql meta-commands and cut between statements", "[corpus]") {
  const auto pieces = extract_pieces(
      SourceKind::sql,
      "\\echo Use \"CREATE EXTENSION x\" \\quit\n\nCREATE TABLE t (a int);\n\nCREATE FUNCTION f() RETURNS int AS $$\n"
      "  SELECT 1\n\n  + 1\n$$ LANGUAGE sql;\n");
  REQUIRE(pieces.size() == 2);
  CHECK(pieces[0] == "CREATE TABLE t (a int);\n");
  // The blank line inside the function body is not after a ';': the statement stays whole.
  CHECK(pieces[1].find("CREATE FUNCTION f()") == 0);
  CHECK(pieces[1].find("$$ LANGUAGE sql;") != std::string::npos);
  for (const auto& p : pieces) CHECK(p.find("\\echo") == std::string::npos);
}

TEST_CASE("html-sql keeps the program listings that read as SQL, entities decoded", "[corpus]") {
  const auto pieces = extract_pieces(
      SourceKind::html_sql,
      "<pre class=\"programlisting\">SELECT a FROM t WHERE a &lt; 3 AND b &gt; &#39;x&#39;;</pre>"
      "<pre class=\"programlisting\">$ pg_dump mydb &gt; out.sql</pre>"
      "<pre class=\"programlisting\">Selected rows follow</pre>"
      "<pre class=\"programlisting\">INSERT INTO <em>t</em> VALUES (1);</pre>");
  REQUIRE(pieces.size() == 2);
  CHECK(pieces[0] == "SELECT a FROM t WHERE a < 3 AND b > 'x';");
  CHECK(pieces[1] == "INSERT INTO t VALUES (1);");
}

TEST_CASE("merge_pieces keeps chunks between min and max characters", "[corpus]") {
  std::vector<std::string> pieces;
  for (int i = 0; i < 40; ++i) pieces.push_back(std::string(30 + i, 'a' + i % 26));
  pieces.push_back(std::string(50, 'x') + "\n" + std::string(900, 'y') + "\n" + std::string(50, 'z'));
  const auto chunks = merge_pieces(pieces, 100, 300);
  size_t total_in = 0, total_out = 0;
  for (const auto& p : pieces)
    for (char c : p) total_in += c != '\n';
  for (size_t i = 0; i < chunks.size(); ++i) {
    for (char c : chunks[i]) total_out += c != '\n';
    CHECK(chunks[i].size() <= 300 + 2 + 100);  // a short chunk may take one more piece
    if (i + 1 < chunks.size()) CHECK(chunks[i].size() >= 100);
  }
  CHECK(total_in == total_out);  // nothing lost but line breaks
}

TEST_CASE("parse_corpus_domain reads NAME=KIND:DIR lists and names bad specs", "[corpus]") {
  const auto d = parse_corpus_domain("sql=sql:/a,html-sql:/b");
  CHECK(d.name == "sql");
  REQUIRE(d.sources.size() == 2);
  CHECK(d.sources[1].kind == SourceKind::html_sql);
  CHECK(d.sources[1].root == "/b");
  CHECK_THROWS_WITH(parse_corpus_domain("sql"), Catch::Contains("NAME=KIND:DIR"));
  CHECK_THROWS_WITH(parse_corpus_domain("sql=/a"), Catch::Contains("not KIND:DIR"));
  CHECK_THROWS_WITH(parse_corpus_domain("sql=latex:/a"), Catch::Contains("unknown source kind 'latex'"));
}

TEST_CASE("build_corpus writes deterministic, deduplicated, disjoint train, validation and worker parts", "[corpus]") {
  const fs::path root = make_sources("build");
  const auto a = build_corpus(fixture_options(root, root / "out-a"));
  const auto b = build_corpus(fixture_options(root, root / "out-b"));
  REQUIRE(a.domains.size() == 3);
  for (const char* d : {"python", "sql", "docs"})
    for (const char* f : {"train.jsonl", "validation.jsonl", "worker-0.jsonl", "worker-1.jsonl"})
      CHECK(slurp(root / "out-a" / d / f) == slurp(root / "out-b" / d / f));
  CHECK(slurp(root / "out-a" / "manifest.json") == slurp(root / "out-b" / "manifest.json"));
  // The same sources elsewhere give the same parts: nothing depends on where the tree lives.
  const fs::path moved = temp_dir("build-moved");
  for (const char* sub : {"py", "sql", "html", "man"}) fs::copy(root / sub, moved / sub, fs::copy_options::recursive);
  build_corpus(fixture_options(moved, moved / "out"));
  for (const char* d : {"python", "sql", "docs"})
    for (const char* f : {"train.jsonl", "validation.jsonl", "worker-0.jsonl", "worker-1.jsonl"})
      CHECK(slurp(root / "out-a" / d / f) == slurp(moved / "out" / d / f));
  fs::remove_all(moved);

  const auto& py = a.domains[0];
  CHECK(py.name == "python");
  CHECK(py.files_read == 7);     // six modules and the copy (whose chunks are all duplicates)
  CHECK(py.files_skipped == 1);  // binary.py; __pycache__ is not even listed
  CHECK(py.duplicates > 0);
  CHECK(py.chunks == py.duplicates + py.train + py.validation + py.over_cap);
  CHECK(py.validation > 0);
  const auto& sql = a.domains[1];
  CHECK(sql.files_read == 5);  // four scripts and the tutorial page
  const auto& docs = a.domains[2];
  CHECK(docs.files_read == 6);
  CHECK(docs.files_skipped == 2);  // the .so alias and the corrupt .gz; the translation is not listed

  for (const char* d : {"python", "sql", "docs"}) {
    const fs::path dir = root / "out-a" / d;
    const auto train = texts(dir / "train.jsonl");
    const auto val = texts(dir / "validation.jsonl");
    const auto w0 = texts(dir / "worker-0.jsonl");
    const auto w1 = texts(dir / "worker-1.jsonl");
    INFO(d);
    CHECK(!w0.empty());
    CHECK(!w1.empty());
    CHECK(w0 != w1);
    std::multiset<std::string> parts(w0.begin(), w0.end());
    parts.insert(w1.begin(), w1.end());
    CHECK(parts == std::multiset<std::string>(train.begin(), train.end()));  // a partition of train
    const std::set<std::string> train_set(train.begin(), train.end());
    CHECK(train_set.size() == train.size());  // no duplicates left
    for (const auto& v : val) CHECK(train_set.count(v) == 0);
    for (const auto& t : train) {
      CHECK(t.find("\\echo") == std::string::npos);
      CHECK(t.find("\\f") == std::string::npos);
      CHECK(t.find("#include") == std::string::npos);  // the C listing is not SQL
    }
  }
  const auto sql_train = texts(root / "out-a" / "sql" / "train.jsonl");
  const auto sql_val = texts(root / "out-a" / "sql" / "validation.jsonl");
  std::string all;
  for (const auto& t : sql_train) all += t;
  for (const auto& t : sql_val) all += t;
  CHECK(all.find("WHERE temp_lo < 40") != std::string::npos);
  CHECK(all.find("CREATE TABLE cities (name text") != std::string::npos);

  const auto manifest = nlohmann::json::parse(slurp(root / "out-a" / "manifest.json"));
  CHECK(manifest["domains"]["sql"]["sources"].size() == 2);
  CHECK(manifest["domains"]["python"]["duplicates"].get<size_t>() == py.duplicates);
  fs::remove_all(root);
}

TEST_CASE("build_corpus caps the text per domain and names missing sources and thin domains", "[corpus]") {
  const fs::path root = make_sources("errors");
  auto o = fixture_options(root, root / "out");
  o.max_bytes = 1500;
  o.workers = 1;
  o.min_examples = 1;
  const auto capped = build_corpus(o);
  for (const auto& d : capped.domains) {
    CHECK(d.train_bytes + d.validation_bytes <= 1500);
    if (d.name == "python") CHECK(d.over_cap > 0);
  }

  auto missing = fixture_options(root, root / "out");
  missing.domains[1] = parse_corpus_domain("sql=sql:" + (root / "nowhere").string());
  CHECK_THROWS_WITH(build_corpus(missing), Catch::Contains("nowhere' is not a directory") &&
                                               Catch::Contains("postgresql-15"));
  auto thin = fixture_options(root, root / "out");
  thin.min_examples = 1000;
  CHECK_THROWS_WITH(build_corpus(thin), Catch::Contains("domain 'python': only") && Catch::Contains("scripts/setup"));
  auto twice = fixture_options(root, root / "out");
  twice.domains.push_back(twice.domains[0]);
  CHECK_THROWS_WITH(build_corpus(twice), Catch::Contains("given twice"));
  auto many = fixture_options(root, root / "out");
  many.workers = 50;  // more parts than source files
  CHECK_THROWS_WITH(build_corpus(many), Catch::Contains("is empty") && Catch::Contains("fewer --workers"));
  fs::remove_all(root);
}
