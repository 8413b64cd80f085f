#include "model/data.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>
#include <poppler-document.h>
#include <poppler-page.h>

namespace fedmoe::model {

namespace {

using json = nlohmann::json;

std::string get_string(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end()) throw DataError(where + ": missing \"" + key + "\"");
  if (!it->is_string()) throw DataError(where + ": \"" + key + "\" must be a string, got " + it->type_name());
  return it->get<std::string>();
}

void append(TokenizedExample& out, const std::vector<int32_t>& ids, uint8_t mask) {
  out.ids.insert(out.ids.end(), ids.begin(), ids.end());
  out.loss_mask.insert(out.loss_mask.end(), ids.size(), mask);
}

void append(TokenizedExample& out, int32_t id, uint8_t mask) {
  out.ids.push_back(id);
  out.loss_mask.push_back(mask);
}

void require_special(int32_t id, const char* name) {
  if (id < 0) throw DataError(std::string("the tokenizer has no ") + name + " token, which this example needs");
}

// SplitMix64: a tiny generator whose output is fixed by its definition, on every platform.
uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [0, bound) without modulo bias (Lemire's method with rejection).
uint64_t uniform_below(uint64_t& state, uint64_t bound) {
  for (;;) {
    unsigned __int128 m = static_cast<unsigned __int128>(splitmix(state)) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low >= bound || low >= (-bound) % bound) return static_cast<uint64_t>(m >> 64);
  }
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && std::equal(suffix.rbegin(), suffix.rend(), s.rbegin());
}

}  // namespace

Example parse_example(std::string_view line, const std::string& where) {
  json j = json::parse(line.begin(), line.end(), nullptr, false);
  if (j.is_discarded()) throw DataError(where + ": not valid JSON");
  if (!j.is_object()) throw DataError(where + ": expected a JSON object, got " + std::string(j.type_name()));
  Example ex;
  int shapes = int(j.contains("text")) + int(j.contains("prompt") || j.contains("completion")) +
               int(j.contains("messages"));
  if (shapes != 1)
    throw DataError(where + ": an example has exactly one of \"text\", \"prompt\"+\"completion\", \"messages\"");
  if (j.contains("text")) {
    ex.kind = Example::Kind::text;
    ex.text = get_string(j, "text", where);
  } else if (j.contains("messages")) {
    ex.kind = Example::Kind::chat;
    const auto& msgs = j["messages"];
    if (!msgs.is_array() || msgs.empty()) throw DataError(where + ": \"messages\" must be a non-empty array");
    bool has_answer = false;
    for (size_t i = 0; i < msgs.size(); ++i) {
      std::string w = where + ": messages[" + std::to_string(i) + "]";
      if (!msgs[i].is_object()) throw DataError(w + " must be an object");
      ChatMessage m{get_string(msgs[i], "role", w), get_string(msgs[i], "content", w)};
      if (m.role != "system" && m.role != "user" && m.role != "assistant")
        throw DataError(w + ": unknown role \"" + m.role + "\" (system, user or assistant)");
      if (m.role == "system" && i != 0) throw DataError(w + ": a system message may only come first");
      has_answer |= m.role == "assistant";
      ex.messages.push_back(std::move(m));
    }
    if (!has_answer) throw DataError(where + ": a chat example needs at least one assistant message to learn from");
  } else {
    ex.kind = Example::Kind::prompt_completion;
    ex.prompt = get_string(j, "prompt", where);
    ex.completion = get_string(j, "completion", where);
  }
  return ex;
}

std::vector<Example> read_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open");
  std::vector<Example> out;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    out.push_back(parse_example(line, path + ":" + std::to_string(n)));
  }
  return out;
}

std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  if (messages.empty() || messages.front().role != "system")
    out += std::string("<|im_start|>system\n") + kQwenDefaultSystem + "<|im_end|>\n";
  for (const auto& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

TokenizedExample tokenize(const Example& ex, const TextEncoder& enc) {
  TokenizedExample out;
  switch (ex.kind) {
    case Example::Kind::text:
      require_special(enc.eos, "<|endoftext|>");
      append(out, enc.encode(ex.text), 1);
      append(out, enc.eos, 1);
      break;
    case Example::Kind::prompt_completion:
      require_special(enc.eos, "<|endoftext|>");
      append(out, enc.encode(ex.prompt), 0);
      append(out, enc.encode(ex.completion), 1);
      append(out, enc.eos, 1);
      break;
    case Example::Kind::chat: {
      require_special(enc.im_start, "<|im_start|>");
      require_special(enc.im_end, "<|im_end|>");
      auto turn = [&](const std::string& role, const std::string& content, bool learn) {
        append(out, enc.im_start, 0);
        append(out, enc.encode(role + "\n"), 0);
        append(out, enc.encode(content), learn);
        append(out, enc.im_end, learn);  // learning to stop is part of the answer
        append(out, enc.encode("\n"), 0);
      };
      if (ex.messages.front().role != "system") turn("system", kQwenDefaultSystem, false);
      for (const auto& m : ex.messages) turn(m.role, m.content, m.role == "assistant");
      break;
    }
  }
  return out;
}

void shuffle_deterministic(std::vector<size_t>& order, uint64_t seed) {
  uint64_t state = seed;
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[uniform_below(state, i)]);
}

Split split_indices(size_t n, double validation_fraction, uint64_t seed) {
  if (!(validation_fraction >= 0 && validation_fraction < 1))
    throw DataError("validation fraction must be in [0, 1), got " + std::to_string(validation_fraction));
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  shuffle_deterministic(order, seed);
  size_t n_val = static_cast<size_t>(std::llround(n * validation_fraction));
  if (validation_fraction > 0 && n >= 2) n_val = std::max<size_t>(n_val, 1);
  n_val = std::min(n_val, n);
  Split s;
  s.validation.assign(order.begin(), order.begin() + n_val);
  s.train.assign(order.begin() + n_val, order.end());
  return s;
}

std::vector<PackedSequence> pack(const std::vector<TokenizedExample>& examples, size_t seq_len, int32_t pad_id,
                                 bool drop_last) {
  if (seq_len == 0) throw DataError("pack: sequence length must be positive");
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  for (const auto& ex : examples) {
    ids.insert(ids.end(), ex.ids.begin(), ex.ids.end());
    mask.insert(mask.end(), ex.loss_mask.begin(), ex.loss_mask.end());
  }
  std::vector<PackedSequence> out;
  // Window w covers stream positions [w*L, w*L + L]: L inputs and the L tokens that follow them.
  for (size_t start = 0; start + 1 < ids.size(); start += seq_len) {
    size_t available = std::min(seq_len, ids.size() - 1 - start);  // inputs that have a next token
    if (available < seq_len && drop_last) break;
    PackedSequence seq;
    seq.input_ids.assign(seq_len, pad_id);
    seq.labels.assign(seq_len, kIgnoreLabel);
    for (size_t t = 0; t < available; ++t) {
      seq.input_ids[t] = ids[start + t];
      if (mask[start + t + 1]) seq.labels[t] = ids[start + t + 1];
    }
    out.push_back(std::move(seq));
  }
  return out;
}

std::vector<std::string> read_documents(const std::string& path, size_t max_chars) {
  std::vector<std::string> docs;
  std::string lower = path;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (ends_with(lower, ".pdf")) {
    std::unique_ptr<poppler::document> doc(poppler::document::load_from_file(path));
    if (!doc) throw DataError(path + ": not a readable PDF");
    if (doc->is_locked()) throw DataError(path + ": the PDF is encrypted");
    for (int i = 0; i < doc->pages(); ++i) {
      std::unique_ptr<poppler::page> page(doc->create_page(i));
      if (!page) continue;
      auto bytes = page->text().to_utf8();
      std::string text(bytes.begin(), bytes.end());
      if (text.find_first_not_of(" \t\r\n\f") != std::string::npos) docs.push_back(std::move(text));
    }
    return docs;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open");
  std::string current, line, paragraph;
  auto flush_paragraph = [&] {
    if (paragraph.empty()) return;
    if (!current.empty() && current.size() + paragraph.size() > max_chars) {
      docs.push_back(std::move(current));
      current.clear();
    }
    current += paragraph;
    paragraph.clear();
  };
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      flush_paragraph();
      if (!current.empty()) current += "\n";
      continue;
    }
    paragraph += line + "\n";
  }
  flush_paragraph();
  if (current.find_first_not_of("\n") != std::string::npos) docs.push_back(std::move(current));
  return docs;
}

}  // namespace fedmoe::model
