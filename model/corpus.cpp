#include "model/corpus.hpp"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "model/utf8.hpp"

namespace fedmoe::model {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// FNV-1a, then a SplitMix64 finalizer: stable across platforms and runs (std::hash is not).
uint64_t stable_hash(std::string_view text, uint64_t salt = 0) {
  uint64_t h = 1469598103934665603ull ^ salt;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  h += 0x9e3779b97f4a7c15ull;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == 0) return false;  // NUL: a binary file
    const size_t n = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : 4;
    if (n == 4 || i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    i += n + 1;
  }
  return true;
}

// Whitespace collapsed to single spaces, trimmed: two chunks that differ only in layout are the same.
std::string normalized(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool space = false;
  for (char c : text) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      space = !out.empty();
    } else {
      if (space) out += ' ';
      space = false;
      out += c;
    }
  }
  return out;
}

std::string trim_blank_lines(std::string_view text) {
  // Trailing whitespace of every line, leading and trailing blank lines.
  std::string out;
  std::istringstream in{std::string(text)};
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) {
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
    lines.push_back(std::move(line));
  }
  size_t b = 0, e = lines.size();
  while (b < e && lines[b].empty()) ++b;
  while (e > b && lines[e - 1].empty()) --e;
  for (size_t i = b; i < e; ++i) {
    out += lines[i];
    if (i + 1 < e) out += '\n';
  }
  return out;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  return lines;
}

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Cuts at a UTF-8 character boundary at or before `at`.
size_t utf8_boundary(std::string_view s, size_t at) {
  if (at >= s.size()) return s.size();
  while (at > 0 && (static_cast<unsigned char>(s[at]) >> 6) == 0x2) --at;
  return at;
}

// A piece longer than max_chars: cut at blank lines, then at line ends, then (one huge line) anywhere.
void cut_long(const std::string& piece, size_t max_chars, std::vector<std::string>& out) {
  if (piece.size() <= max_chars) {
    out.push_back(piece);
    return;
  }
  std::string cur;
  auto flush = [&] {
    if (!cur.empty()) out.push_back(trim_blank_lines(cur));
    cur.clear();
  };
  for (const auto& line : split_lines(piece)) {
    if (line.size() > max_chars) {
      flush();
      for (size_t at = 0; at < line.size();) {
        const size_t end = utf8_boundary(line, at + max_chars);
        out.push_back(line.substr(at, std::max<size_t>(end - at, 1)));
        at += std::max<size_t>(end - at, 1);
      }
      continue;
    }
    if (cur.size() + line.size() + 1 > max_chars) flush();
    // Prefer a blank line as the cut once the chunk is half full.
    if (line.empty() && cur.size() > max_chars / 2) {
      flush();
      continue;
    }
    cur += line;
    cur += '\n';
  }
  flush();
}

// ---- python ---------------------------------------------------------------------------------

std::vector<std::string> python_pieces(const std::string& content) {
  // A new piece starts at every top-level statement that opens a definition (its decorators included).
  std::vector<std::string> pieces;
  std::string cur;
  bool prev_decorator = false;
  for (const auto& line : split_lines(content)) {
    const bool decorator = starts_with(line, "@");
    const bool opens = decorator || starts_with(line, "def ") || starts_with(line, "class ") ||
                       starts_with(line, "async def ") || starts_with(line, "if __name__");
    if (opens && !prev_decorator && !cur.empty()) {
      pieces.push_back(cur);
      cur.clear();
    }
    if (!line.empty()) prev_decorator = decorator;
    cur += line;
    cur += '\n';
  }
  if (!cur.empty()) pieces.push_back(cur);
  return pieces;
}

// ---- sql ------------------------------------------------------------------------------------

std::vector<std::string> sql_pieces(const std::string& content) {
  // Statements end with ';' at a line end; a blank line after one is a cut. psql meta-commands
  // (\echo ... \quit guards of extension scripts) are not SQL and are dropped.
  std::vector<std::string> pieces;
  std::string cur;
  bool statement_ended = false;
  for (const auto& line : split_lines(content)) {
    if (starts_with(line, "\\")) continue;
    const auto last = line.find_last_not_of(" \t");
    if (last == std::string::npos) {
      if (statement_ended && !cur.empty()) {
        pieces.push_back(cur);
        cur.clear();
      }
      if (!cur.empty()) cur += '\n';
      continue;
    }
    statement_ended = line[last] == ';';
    cur += line;
    cur += '\n';
  }
  if (!cur.empty()) pieces.push_back(cur);
  return pieces;
}

std::string decode_entities(std::string_view s) {
  static const std::map<std::string, std::string> named = {
      {"lt", "<"}, {"gt", ">"}, {"amp", "&"}, {"quot", "\""}, {"apos", "'"}, {"nbsp", " "},
      {"mdash", "-"}, {"ndash", "-"}, {"hellip", "..."}, {"rsquo", "'"}, {"lsquo", "'"},
      {"rdquo", "\""}, {"ldquo", "\""}, {"copy", "(c)"}};
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '&') {
      out += s[i];
      continue;
    }
    const size_t semi = s.find(';', i);
    if (semi == std::string::npos || semi - i > 10) {
      out += '&';
      continue;
    }
    const std::string name(s.substr(i + 1, semi - i - 1));
    if (!name.empty() && name[0] == '#') {
      long code = 0;
      try {
        code = name.size() > 1 && (name[1] == 'x' || name[1] == 'X') ? std::stol(name.substr(2), nullptr, 16)
                                                                       : std::stol(name.substr(1));
      } catch (...) {
        code = -1;
      }
      if (code > 0 && code < 0x110000 && !(code >= 0xd800 && code < 0xe000))
        append_utf8(out, static_cast<char32_t>(code));
      i = semi;
      continue;
    }
    const auto it = named.find(name);
    if (it == named.end()) {
      out += '&';
      continue;
    }
    out += it->second;
    i = semi;
  }
  return out;
}

std::string strip_tags(std::string_view s) {
  std::string out;
  bool in_tag = false;
  for (char c : s) {
    if (c == '<') in_tag = true;
    else if (c == '>' && in_tag) in_tag = false;
    else if (!in_tag) out += c;
  }
  return out;
}

bool reads_as_sql(const std::string& text) {
  static const char* const keywords[] = {
      "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER",   "DROP",     "WITH",    "GRANT",   "REVOKE",
      "BEGIN",  "COMMIT", "ROLLBACK", "EXPLAIN", "COPY", "VALUES", "SET",      "SHOW",    "TRUNCATE", "DECLARE",
      "FETCH",  "PREPARE", "EXECUTE", "ANALYZE", "VACUUM", "COMMENT", "LOCK",  "CALL",    "DO",      "TABLE",
      "MERGE",  "REINDEX", "CLUSTER", "LISTEN", "NOTIFY", "SAVEPOINT", "RELEASE", "START", "SECURITY", "IMPORT",
      "REFRESH", "CHECKPOINT", "DISCARD", "RESET", "CLOSE", "MOVE", "UNLISTEN", "ABORT", "END", "LOAD"};
  const size_t b = text.find_first_not_of(" \t\n");
  if (b == std::string::npos) return false;
  size_t e = b;
  while (e < text.size() && std::isupper(static_cast<unsigned char>(text[e]))) ++e;
  if (e == b || (e < text.size() && !std::isspace(static_cast<unsigned char>(text[e])) && text[e] != ';' &&
                 text[e] != '(')) return false;
  const std::string word = text.substr(b, e - b);
  return std::any_of(std::begin(keywords), std::end(keywords), [&](const char* k) { return word == k; });
}

std::vector<std::string> html_sql_pieces(const std::string& content) {
  std::vector<std::string> pieces;
  const std::string open = "<pre class=\"programlisting\"";
  for (size_t at = content.find(open); at != std::string::npos; at = content.find(open, at)) {
    const size_t body = content.find('>', at);
    if (body == std::string::npos) break;
    const size_t close = content.find("</pre>", body);
    if (close == std::string::npos) break;
    std::string text = decode_entities(strip_tags(std::string_view(content).substr(body + 1, close - body - 1)));
    if (reads_as_sql(text)) pieces.push_back(std::move(text));
    at = close;
  }
  return pieces;
}

// ---- man pages ------------------------------------------------------------------------------

std::string special_char(const std::string& name) {
  static const std::map<std::string, std::string> chars = {
      {"em", "--"}, {"en", "-"},  {"hy", "-"},   {"mi", "-"},   {"aq", "'"},   {"dq", "\""}, {"lq", "\""},
      {"rq", "\""}, {"oq", "'"},  {"cq", "'"},   {"bu", "*"},   {"co", "(c)"}, {"rg", "(R)"}, {"tm", "(TM)"},
      {"mu", "x"},  {"ti", "~"},  {"ha", "^"},   {"at", "@"},   {"sh", "#"},   {"Do", "$"},  {"rs", "\\"},
      {"ga", "`"},  {"aa", "'"},  {"lB", "["},   {"rB", "]"},   {"lC", "{"},   {"rC", "}"},  {"la", "<"},
      {"ra", ">"},  {"<=", "<="}, {">=", ">="},  {"!=", "!="},  {"->", "->"},  {"<-", "<-"}, {"pl", "+"},
      {"eq", "="},  {"ba", "|"},  {"or", "|"},   {"sl", "/"},   {"dg", "+"},   {"de", " degrees"},
      {"R", "(R)"}, {"Tm", "(TM)"}};
  const auto it = chars.find(name);
  return it == chars.end() ? std::string() : it->second;
}

// Reads a name after \( (two chars), \[ (to ]), or a single char.
std::string escape_name(std::string_view s, size_t& i) {
  if (i >= s.size()) return {};
  if (s[i] == '(') {
    std::string name(s.substr(i + 1, 2));
    i += 3;
    return name;
  }
  if (s[i] == '[') {
    const size_t end = s.find(']', i);
    if (end == std::string::npos) {
      i = s.size();
      return {};
    }
    std::string name(s.substr(i + 1, end - i - 1));
    i = end + 1;
    return name;
  }
  return std::string(1, s[i++]);
}

std::string unescape_roff(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] != '\\') {
      out += s[i++];
      continue;
    }
    if (++i >= s.size()) break;
    const char c = s[i++];
    switch (c) {
      case '"':  // comment to the end of the line
      case '#':
        return out;
      case 'f':
      case 'F':
      case 'n':
      case 'g':
      case 'k':
      case 'm':
      case 'M':
      case 'Y':
        escape_name(s, i);  // font, register, colour: no text
        break;
      case 's':
        if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
        if (i < s.size() && (s[i] == '(' || s[i] == '[')) escape_name(s, i);
        else
          while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
        break;
      case '(':
      case '[':
        --i;
        out += special_char(escape_name(s, i));
        break;
      case 'C':
        if (i < s.size() && s[i] == '\'') {
          const size_t end = s.find('\'', i + 1);
          out += special_char(std::string(s.substr(i + 1, end == std::string::npos ? 0 : end - i - 1)));
          i = end == std::string::npos ? s.size() : end + 1;
        }
        break;
      case '*':
        out += special_char(escape_name(s, i));
        break;
      case 'h':
      case 'v':
      case 'w':
      case 'o':
      case 'X':
      case 'l':
      case 'L':
      case 'D':
      case 'b':
      case 'x':
      case 'Z':
      case 'R':
      case 'A':
      case 'B':
        if (i < s.size()) {
          const char q = s[i];
          const size_t end = s.find(q, i + 1);
          i = end == std::string::npos ? s.size() : end + 1;
        }
        break;
      case '-': out += '-'; break;
      case 'e':
      case '\\': out += '\\'; break;
      case ' ':
      case '~':
      case '0': out += ' '; break;
      case '.': out += '.'; break;
      case '\'': out += '\''; break;
      case '`': out += '`'; break;
      case 'c':  // continuation (the line break stays a space)
      case '&':
      case '|':
      case '^':
      case '%':
      case ')':
      case '/':
      case ',':
      case 'a':
      case 'd':
      case 'u':
      case 'p':
      case 'r':
      case 't':
      case 'z':
      case '{':
      case '}':
      case '!':
      case '\n':
        break;
      default: out += c; break;
    }
  }
  return out;
}

// Macro arguments, honouring "double quoted" ones.
std::vector<std::string> macro_args(std::string_view s) {
  std::vector<std::string> args;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    if (i >= s.size()) break;
    std::string arg;
    if (s[i] == '"') {
      ++i;
      while (i < s.size()) {
        if (s[i] == '"') {
          if (i + 1 < s.size() && s[i + 1] == '"') {
            arg += '"';
            i += 2;
            continue;
          }
          ++i;
          break;
        }
        arg += s[i++];
      }
    } else {
      while (i < s.size() && s[i] != ' ' && s[i] != '\t') arg += s[i++];
    }
    if (arg.size() >= 2 && arg[0] == '\\' && arg[1] == '"') break;  // a comment
    args.push_back(unescape_roff(arg));
  }
  return args;
}

}  // namespace

std::string render_man(const std::string& roff) {
  std::string out;        // finished paragraphs
  std::string paragraph;  // the one being filled
  bool nofill = false;
  auto brk = [&] {
    const std::string p = trim_blank_lines(paragraph);
    if (!p.empty()) {
      if (!out.empty()) out += "\n\n";
      out += p;
    }
    paragraph.clear();
  };
  auto text = [&](const std::string& t) {
    if (t.empty()) return;
    if (nofill) {
      paragraph += t;
      paragraph += '\n';
    } else {
      if (!paragraph.empty() && paragraph.back() != '\n') paragraph += ' ';
      paragraph += t;
    }
  };
  static const std::unordered_set<std::string> spaced = {
      "B",  "I",  "SM", "SB", "Nm", "Nd", "Ar", "Pa", "Xr", "Em", "Sy", "Dq", "Ql", "Cm", "Va", "Ev", "Fn", "Ft",
      "Fa", "Li", "Dv", "Er", "Ic", "Ad", "An", "Ms", "Sq", "Pq", "Op", "Tn", "Ux", "Bx", "Ox", "Nx", "Fx",
      "Lk", "Mt", "Cd", "Fd", "In", "Vt", "St", "Ot", "Dl", "UR", "MT", "It", "Aq", "Brq", "Bq", "Eo", "Ec", "No"};
  static const std::unordered_set<std::string> alternating = {"BR", "IR", "RB", "RI", "BI", "IB"};
  static const std::unordered_set<std::string> breaks = {"PP", "LP", "P",  "Pp", "sp", "br", "TP", "TQ", "HP",
                                                         "RS", "RE", "Bl", "El", "ne", "bp", "Lp", "IP"};
  for (const auto& line : split_lines(roff)) {
    if (line.empty()) {
      if (nofill) paragraph += '\n';
      else brk();
      continue;
    }
    if (line[0] != '.' && line[0] != '\'') {
      text(unescape_roff(line));
      continue;
    }
    std::string_view rest(line);
    rest.remove_prefix(1);
    while (!rest.empty() && (rest[0] == ' ' || rest[0] == '\t')) rest.remove_prefix(1);
    if (starts_with(rest, "\\\"") || rest.empty()) continue;  // comment, empty request
    size_t name_end = 0;
    while (name_end < rest.size() && rest[name_end] != ' ' && rest[name_end] != '\t') ++name_end;
    const std::string name(rest.substr(0, name_end));
    const auto args = macro_args(rest.substr(name_end));
    auto joined = [&](const char* sep) {
      std::string s;
      for (size_t k = 0; k < args.size(); ++k) s += (k ? sep : "") + args[k];
      return s;
    };
    if (name == "so") return {};  // a link to another page: nothing of its own
    if (name == "TH" || name == "Dt") {
      brk();
      if (!args.empty()) text(args[0] + (args.size() > 1 ? "(" + args[1] + ")" : ""));
      brk();
    } else if (name == "SH" || name == "SS" || name == "Sh" || name == "Ss") {
      brk();
      text(joined(" "));
      paragraph += '\n';
      paragraph += '\n';  // the heading stays on its own line above its first paragraph
      brk();
    } else if (name == "nf" || name == "Bd" || name == "EX") {
      brk();
      nofill = true;
    } else if (name == "fi" || name == "Ed" || name == "EE") {
      brk();
      nofill = false;
    } else if (breaks.count(name)) {
      brk();
      if ((name == "IP" || name == "It") && !args.empty() && !args[0].empty() && args[0] != "\\(bu") text(args[0]);
    } else if (name == "Fl") {
      std::string s;
      for (const auto& a : args) s += (s.empty() ? "-" : " -") + a;
      text(args.empty() ? "-" : s);
    } else if (alternating.count(name)) {
      text(joined(""));
    } else if (spaced.count(name)) {
      text(joined(" "));
    }
    // Anything else (.ft, .de, .if, .TS tables' requests, ...) carries no running text.
  }
  brk();
  return out;
}

std::string read_maybe_gzip(const std::string& path) {
  if (!ends_with(path, ".gz")) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw CorpusError(path + ": cannot open");
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw CorpusError(path + ": cannot open");
  std::string out;
  char buf[1 << 15];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) {
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > (64u << 20)) break;
  }
  int err = 0;
  const char* msg = n < 0 ? gzerror(f, &err) : nullptr;
  const std::string what = msg ? msg : "";
  gzclose(f);
  if (n < 0) throw CorpusError(path + ": not a valid gzip file (" + what + ")");
  return out;
}

std::vector<std::string> extract_pieces(SourceKind kind, const std::string& content) {
  switch (kind) {
    case SourceKind::python: return python_pieces(content);
    case SourceKind::sql: return sql_pieces(content);
    case SourceKind::html_sql: return html_sql_pieces(content);
    case SourceKind::man: {
      std::vector<std::string> pieces;
      std::string para;
      for (const auto& line : split_lines(render_man(content))) {
        if (line.empty()) {
          if (!para.empty()) pieces.push_back(para);
          para.clear();
        } else {
          para += line;
          para += '\n';
        }
      }
      if (!para.empty()) pieces.push_back(para);
      return pieces;
    }
  }
  return {};
}

std::vector<std::string> merge_pieces(const std::vector<std::string>& pieces, size_t min_chars, size_t max_chars) {
  std::vector<std::string> cut;
  for (const auto& p : pieces) {
    const std::string t = trim_blank_lines(p);
    if (!t.empty()) cut_long(t, max_chars, cut);
  }
  std::vector<std::string> chunks;
  std::string cur;
  const size_t floor = std::max<size_t>(min_chars / 4, 1);
  for (const auto& p : cut) {
    if (p.empty()) continue;
    if (!cur.empty() && cur.size() >= min_chars && cur.size() + 2 + p.size() > max_chars) {
      chunks.push_back(std::move(cur));
      cur.clear();
    }
    if (!cur.empty()) cur += "\n\n";
    cur += p;
  }
  if (cur.size() >= floor) chunks.push_back(std::move(cur));
  return chunks;
}

namespace {

// Everything that differs between the kinds of source besides their text extraction.
struct KindInfo {
  SourceKind kind;
  const char* name;
  const char* package;                    // the Debian package(s) that install the default source
  std::vector<const char*> suffixes;      // files read; empty: every file (man pages, .gz or not)
};

const std::vector<KindInfo>& kinds() {
  static const std::vector<KindInfo> table = {
      {SourceKind::python, "python", "libpython3.11-stdlib (python3)", {".py"}},
      {SourceKind::sql, "sql", "postgresql-15", {".sql"}},
      {SourceKind::html_sql, "html-sql", "postgresql-doc-15", {".html", ".htm"}},
      {SourceKind::man, "man", "manpages, manpages-dev", {}},
  };
  return table;
}

const KindInfo& info(SourceKind kind) {
  for (const auto& k : kinds())
    if (k.kind == kind) return k;
  throw CorpusError("unknown source kind");  // every enumerator is in the table
}

}  // namespace

SourceKind parse_source_kind(const std::string& text) {
  std::string names;
  for (const auto& k : kinds()) {
    if (text == k.name) return k.kind;
    names += (names.empty() ? "" : ", ") + std::string(k.name);
  }
  throw CorpusError("unknown source kind '" + text + "' (" + names + ")");
}

const char* to_string(SourceKind kind) { return info(kind).name; }

CorpusDomain parse_corpus_domain(const std::string& spec) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size())
    throw CorpusError("--domain '" + spec + "': expected NAME=KIND:DIR[,KIND:DIR...]");
  CorpusDomain d;
  d.name = spec.substr(0, eq);
  std::stringstream rest(spec.substr(eq + 1));
  std::string item;
  while (std::getline(rest, item, ',')) {
    const auto colon = item.find(':');
    if (colon == std::string::npos || colon + 1 == item.size())
      throw CorpusError("--domain '" + spec + "': source '" + item + "' is not KIND:DIR");
    try {
      d.sources.push_back({parse_source_kind(item.substr(0, colon)), item.substr(colon + 1)});
    } catch (const CorpusError& e) {
      throw CorpusError("--domain '" + spec + "': " + e.what());
    }
  }
  return d;
}

namespace {

// The newest versioned directory PREFIX<version>SUFFIX that holds `probe`, e.g. /usr/lib/python3.11.
std::string newest_dir(const std::string& parent, const std::string& prefix, const std::string& suffix,
                       const std::string& probe) {
  std::string best;
  double best_version = -1;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(parent, ec)) {
    const std::string name = entry.path().filename().string();
    if (!starts_with(name, prefix)) continue;
    const std::string version = name.substr(prefix.size());
    if (version.empty() || !std::isdigit(static_cast<unsigned char>(version[0]))) continue;
    const std::string candidate = entry.path().string() + suffix;
    if (!fs::exists(candidate + "/" + probe)) continue;
    // "3.11" > "3.9": compare major and minor numerically.
    double v = 0;
    try {
      const auto dot = version.find('.');
      v = std::stod(version.substr(0, dot)) * 1000 + (dot == std::string::npos ? 0 : std::stod(version.substr(dot + 1)));
    } catch (...) {
      continue;
    }
    if (v > best_version) {
      best_version = v;
      best = candidate;
    }
  }
  return best;
}

}  // namespace

std::vector<CorpusDomain> default_corpus_domains() {
  const std::string python = newest_dir("/usr/lib", "python3.", "", "os.py");
  const std::string pg_ext = newest_dir("/usr/share/postgresql", "", "/extension", "plpgsql.control");
  const std::string pg_doc = newest_dir("/usr/share/doc", "postgresql-doc-", "/html", "index.html");
  return {
      {"python", {{SourceKind::python, python.empty() ? "/usr/lib/python3" : python}}},
      {"sql",
       {{SourceKind::sql, pg_ext.empty() ? "/usr/share/postgresql/15/extension" : pg_ext},
        {SourceKind::html_sql, pg_doc.empty() ? "/usr/share/doc/postgresql-doc-15/html" : pg_doc}}},
      {"docs", {{SourceKind::man, "/usr/share/man"}}},
  };
}

namespace {

bool skipped_python_dir(const std::string& name) {
  // Third-party packages, bytecode, and data-only modules (codec tables, pydoc's topic texts).
  return name == "site-packages" || name == "dist-packages" || name == "__pycache__" || name == "pydoc_data" ||
         name == "encodings" || name == "lib-dynload" || starts_with(name, "config-");
}

// The files of one source, in sorted order.
std::vector<std::string> source_files(const CorpusSource& source) {
  std::error_code ec;
  if (!fs::is_directory(source.root, ec))
    throw CorpusError(std::string(to_string(source.kind)) + " source '" + source.root +
                      "' is not a directory (Debian package " + info(source.kind).package +
                      "; scripts/setup installs it)");
  std::vector<std::string> files;
  const auto& suffixes = info(source.kind).suffixes;
  auto add = [&](const fs::directory_entry& e) {
    if (!e.is_regular_file(ec) || e.is_symlink(ec)) return;  // symlinked pages are other pages' aliases
    const std::string name = e.path().filename().string();
    if (suffixes.empty() || std::any_of(suffixes.begin(), suffixes.end(), [&](const char* x) { return ends_with(name, x); }))
      files.push_back(e.path().string());
  };
  if (source.kind == SourceKind::man) {
    // Only the English sections: ROOT/man1 .. ROOT/man9 (ROOT/de/man1 etc. are translations).
    for (const auto& dir : fs::directory_iterator(source.root, ec)) {
      const std::string name = dir.path().filename().string();
      if (!dir.is_directory(ec) || name.size() < 4 || !starts_with(name, "man") ||
          !std::isdigit(static_cast<unsigned char>(name[3])))
        continue;
      for (const auto& e : fs::directory_iterator(dir.path(), ec)) add(e);
    }
  } else {
    for (auto it = fs::recursive_directory_iterator(source.root, fs::directory_options::skip_permission_denied, ec);
         it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) break;
      if (it->is_directory(ec)) {
        if (source.kind == SourceKind::python && skipped_python_dir(it->path().filename().string()))
          it.disable_recursion_pending();
        continue;
      }
      add(*it);
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

struct Chunk {
  std::string text;
  std::string file;   // its source file
  std::string key;    // source kind and the file's path below the source root: the worker choice
  size_t order = 0;   // position in the domain's reading order
  uint64_t hash = 0;  // of the normalized text
};

void write_jsonl(const fs::path& path, const std::vector<const Chunk*>& chunks) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw CorpusError(path.string() + ": cannot write");
  for (const Chunk* c : chunks)
    out << json{{"text", c->text}}.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
  if (!out) throw CorpusError(path.string() + ": write failed");
}

json report_json(const CorpusDomainReport& r) {
  return {{"files_read", r.files_read},
          {"files_skipped", r.files_skipped},
          {"chunks", r.chunks},
          {"duplicates", r.duplicates},
          {"over_cap", r.over_cap},
          {"train", r.train},
          {"validation", r.validation},
          {"train_bytes", r.train_bytes},
          {"validation_bytes", r.validation_bytes},
          {"worker_examples", r.worker_examples},
          {"worker_bytes", r.worker_bytes},
          {"worker_files", r.worker_files}};
}

CorpusDomainReport build_domain(const CorpusDomain& domain, const CorpusOptions& o, const fs::path& dir) {
  CorpusDomainReport r;
  r.name = domain.name;
  std::vector<Chunk> chunks;
  std::unordered_set<uint64_t> seen;
  for (const auto& source : domain.sources) {
    for (const auto& file : source_files(source)) {
      std::string content;
      try {
        std::error_code ec;
        const auto size = fs::file_size(file, ec);
        if (ec || size > o.max_file_bytes) {
          ++r.files_skipped;
          continue;
        }
        content = read_maybe_gzip(file);
      } catch (const CorpusError&) {
        ++r.files_skipped;  // unreadable or corrupt: named in no result, counted
        continue;
      }
      if (content.size() > o.max_file_bytes * 8 || !valid_utf8(content)) {
        ++r.files_skipped;
        continue;
      }
      const auto merged = merge_pieces(extract_pieces(source.kind, content), o.min_chars, o.max_chars);
      if (merged.empty()) {
        ++r.files_skipped;  // a man-page link (.so), or no SQL in this page
        continue;
      }
      ++r.files_read;
      const std::string key =
          std::string(to_string(source.kind)) + ":" + fs::path(file).lexically_relative(source.root).string();
      for (const auto& text : merged) {
        ++r.chunks;
        const uint64_t h = stable_hash(normalized(text));
        if (!seen.insert(h).second) {
          ++r.duplicates;
          continue;
        }
        chunks.push_back({text, file, key, chunks.size(), h});
      }
    }
  }
  // Which chunks fit the size cap: in content-hash order, a sample across all files.
  std::vector<Chunk*> by_hash;
  for (auto& c : chunks) by_hash.push_back(&c);
  std::sort(by_hash.begin(), by_hash.end(), [](const Chunk* a, const Chunk* b) { return a->hash < b->hash; });
  std::vector<const Chunk*> train, validation;
  size_t bytes = 0;
  const auto val_threshold = static_cast<uint64_t>(o.validation_fraction * 10000.0);
  for (const Chunk* c : by_hash) {
    if (bytes + c->text.size() > o.max_bytes) {
      ++r.over_cap;
      continue;
    }
    bytes += c->text.size();
    // A second, salted hash decides validation, independent of the cap's order.
    const bool val = stable_hash(c->text, 0x5eed) % 10000 < val_threshold && validation.size() < o.max_validation;
    (val ? validation : train).push_back(c);
  }
  auto in_reading_order = [](std::vector<const Chunk*>& v) {
    std::sort(v.begin(), v.end(), [](const Chunk* a, const Chunk* b) { return a->order < b->order; });
  };
  in_reading_order(train);
  in_reading_order(validation);

  const int workers = std::max(o.workers, 1);
  // Whole files to workers: the files in the order of a hash of their path below the source root
  // (where the tree lives does not matter), dealt round-robin, so parts differ and none is empty
  // while there are at least as many files as workers.
  std::vector<std::vector<const Chunk*>> parts(static_cast<size_t>(workers));
  std::vector<std::unordered_set<std::string>> part_files(parts.size());
  std::map<std::string, uint64_t> file_hash;
  for (const Chunk* c : train) file_hash.emplace(c->file, stable_hash(c->key));
  std::vector<std::pair<uint64_t, std::string>> files;
  for (const auto& [file, h] : file_hash) files.emplace_back(h, file);
  std::sort(files.begin(), files.end());
  std::map<std::string, size_t> worker_of;
  for (size_t i = 0; i < files.size(); ++i) worker_of[files[i].second] = i % parts.size();
  for (const Chunk* c : train) {
    const size_t k = worker_of.at(c->file);
    parts[k].push_back(c);
    part_files[k].insert(c->file);
  }
  r.train = train.size();
  r.validation = validation.size();
  for (const Chunk* c : train) r.train_bytes += c->text.size();
  for (const Chunk* c : validation) r.validation_bytes += c->text.size();
  for (size_t k = 0; k < parts.size(); ++k) {
    size_t b = 0;
    for (const Chunk* c : parts[k]) b += c->text.size();
    r.worker_examples.push_back(parts[k].size());
    r.worker_bytes.push_back(b);
    r.worker_files.push_back(part_files[k].size());
  }

  std::string where;
  for (const auto& s : domain.sources) where += (where.empty() ? "" : ", ") + s.root + " (" + info(s.kind).package + ")";
  if (train.size() < o.min_examples)
    throw CorpusError("domain '" + domain.name + "': only " + std::to_string(train.size()) + " train examples (at least " +
                      std::to_string(o.min_examples) + " needed) from " + where +
                      "; are the packages installed? scripts/setup installs them");
  for (size_t k = 0; k < parts.size(); ++k)
    if (parts[k].empty())
      throw CorpusError("domain '" + domain.name + "': worker part " + std::to_string(k) + " of " +
                        std::to_string(workers) + " is empty (" + std::to_string(r.files_read) +
                        " source files); use fewer --workers");

  fs::create_directories(dir);
  write_jsonl(dir / "train.jsonl", train);
  write_jsonl(dir / "validation.jsonl", validation);
  for (size_t k = 0; k < parts.size(); ++k) write_jsonl(dir / ("worker-" + std::to_string(k) + ".jsonl"), parts[k]);
  return r;
}

}  // namespace

CorpusReport build_corpus(const CorpusOptions& o) {
  if (o.domains.empty()) throw CorpusError("no domains to build");
  if (o.out_dir.empty()) throw CorpusError("no output directory");
  if (!(o.validation_fraction >= 0 && o.validation_fraction < 1))
    throw CorpusError("validation fraction must be in [0, 1)");
  if (o.min_chars == 0 || o.max_chars < o.min_chars) throw CorpusError("need 0 < min_chars <= max_chars");
  std::unordered_set<std::string> names;
  for (const auto& d : o.domains)
    if (!names.insert(d.name).second) throw CorpusError("domain '" + d.name + "' given twice");
  CorpusReport report;
  json manifest = {{"workers", o.workers},
                   {"validation_fraction", o.validation_fraction},
                   {"max_validation", o.max_validation},
                   {"max_bytes", o.max_bytes},
                   {"min_chars", o.min_chars},
                   {"max_chars", o.max_chars},
                   {"max_file_bytes", o.max_file_bytes},
                   {"domains", json::object()}};
  for (const auto& d : o.domains) {
    report.domains.push_back(build_domain(d, o, fs::path(o.out_dir) / d.name));
    json sources = json::array();
    for (const auto& s : d.sources) sources.push_back({{"kind", to_string(s.kind)}, {"root", s.root}});
    manifest["domains"][d.name] = report_json(report.domains.back());
    manifest["domains"][d.name]["sources"] = sources;
  }
  std::ofstream out(fs::path(o.out_dir) / "manifest.json", std::ios::trunc);
  out << manifest.dump(2) << '\n';
  if (!out) throw CorpusError(o.out_dir + "/manifest.json: write failed");
  return report;
}

}  // namespace fedmoe::model
