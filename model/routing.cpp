#include "model/routing.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "model/checkpoint.hpp"
#include "model/safetensors.hpp"

namespace fedmoe::model {

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

// A keyword as a regex of its own: special characters literal, whole word where it starts or ends
// with a word character ("c++" cannot have a trailing \b).
std::string keyword_regex(const std::string& word) {
  static const std::string special = R"(\^$.|?*+()[]{})";
  std::string escaped;
  for (char c : word) {
    if (special.find(c) != std::string::npos) escaped += '\\';
    escaped += c;
  }
  auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  return (is_word(word.front()) ? "\\b" : "") + escaped + (is_word(word.back()) ? "\\b" : "");
}

}  // namespace

// --- rules ------------------------------------------------------------------------------------------

RuleRouter::Rule RuleRouter::parse(const std::string& text) {
  const auto colon = text.find(':'), equals = text.find('=');
  const bool keywords = equals != std::string::npos && (colon == std::string::npos || equals < colon);
  const auto at = keywords ? equals : colon;
  if (at == std::string::npos)
    throw std::invalid_argument("routing rule '" + text + "': expected EXPERT:REGEX or EXPERT=WORD,WORD,...");
  Rule r;
  r.expert = trim(text.substr(0, at));
  r.text = text;
  const std::string body = text.substr(at + 1);
  if (r.expert.empty()) throw std::invalid_argument("routing rule '" + text + "': no expert before '" + text[at] + "'");
  std::string regex;
  if (keywords) {
    std::stringstream words(body);
    std::string w;
    while (std::getline(words, w, ',')) {
      w = trim(w);
      if (!w.empty()) regex += (regex.empty() ? "" : "|") + keyword_regex(w);
    }
  } else {
    regex = body;
  }
  if (trim(regex).empty()) throw std::invalid_argument("routing rule '" + text + "': empty pattern");
  try {
    r.pattern = std::regex(regex, std::regex::ECMAScript | std::regex::icase | std::regex::optimize);
  } catch (const std::regex_error& e) {
    throw std::invalid_argument("routing rule '" + text + "': not a valid regular expression: " + e.what());
  }
  return r;
}

RuleRouter::RuleRouter(const std::vector<std::string>& rules) {
  for (const auto& r : rules) rules_.push_back(parse(r));
}

std::vector<ExpertScore> RuleRouter::route(const std::string& prompt) const {
  std::vector<ExpertScore> out;
  for (const auto& rule : rules_) {
    const auto n = std::distance(std::sregex_iterator(prompt.begin(), prompt.end(), rule.pattern), std::sregex_iterator());
    if (n == 0) continue;
    auto it = std::find_if(out.begin(), out.end(), [&](const ExpertScore& s) { return s.expert == rule.expert; });
    if (it == out.end()) {
      out.push_back({rule.expert, 0.0, "rule"});
      it = std::prev(out.end());
    }
    it->score += double(n);
    it->reason += " " + rule.text;
  }
  std::stable_sort(out.begin(), out.end(), [](const ExpertScore& a, const ExpertScore& b) { return a.score > b.score; });
  return out;
}

// --- the learned router ---------------------------------------------------------------------------

namespace {
constexpr const char* kFinal = "final_mean";                             // [H]
constexpr const char* kEmbeddingAndFinal = "embedding_mean+final_mean";  // [2H]
}  // namespace

torch::Tensor HiddenStateRouter::prefix_features(Qwen2ForCausalLM& base, const std::vector<int32_t>& ids,
                                                 bool with_embeddings, const std::vector<int64_t>& lengths) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> ids64(ids.begin(), ids.end());
  auto input = torch::tensor(ids64, torch::kInt64).unsqueeze(0);   // [1, T]
  // Causal attention: the states of a prefix's positions are those of the prefix alone, so one
  // forward serves every prefix length.
  auto parts = std::vector<torch::Tensor>{};
  if (with_embeddings) parts.push_back(base->model->embed_tokens->forward(input).to(torch::kFloat32)[0]);  // [T, H]
  parts.push_back(base->model->forward(input).to(torch::kFloat32)[0]);                                    // [T, H]
  auto states = torch::cat(parts, 1);                             // [T, F]
  auto running = states.cumsum(0);                                // [T, F]
  std::vector<torch::Tensor> rows;
  for (auto l : lengths) {
    l = std::min<int64_t>(l, states.size(0));
    rows.push_back(running[l - 1] / double(l));                   // [F]: mean of the first l positions
  }
  return torch::stack(rows);                                      // [K, F]
}

torch::Tensor HiddenStateRouter::features(Qwen2ForCausalLM& base, const std::vector<int32_t>& ids,
                                          bool with_embeddings) {
  return prefix_features(base, ids, with_embeddings, {int64_t(ids.size())})[0];
}

torch::Tensor HiddenStateRouter::logits(const torch::Tensor& features) const {
  return torch::nn::functional::linear((features - mean_) / std_, weight_, bias_);  // [N, E]
}

HiddenStateRouter HiddenStateRouter::train(Qwen2ForCausalLM& base, const Tokenizer& tok,
                                           const std::map<std::string, std::vector<std::string>>& texts,
                                           const RouterTrainingConfig& config, RouterTrainingReport* report) {
  const auto start = std::chrono::steady_clock::now();
  if (texts.size() < 2)
    throw std::invalid_argument("a learned router needs the domain data of at least two experts, got " +
                                std::to_string(texts.size()));
  HiddenStateRouter r;
  r.max_tokens_ = config.max_tokens;
  // Rows: each text's first max_tokens tokens, and its shorter prefixes of kPrefixes tokens (a
  // prompt is often shorter than a training text); `group` keeps a text's rows on one side of the
  // validation split, and validation scores each held-out text as a whole.
  static const std::vector<int64_t> kPrefixes{8, 32};
  std::vector<torch::Tensor> rows;
  std::vector<int64_t> labels, group, whole;  // per row: label, text index, 1 for the whole-text row
  int64_t texts_used = 0;
  for (const auto& [expert, list] : texts) {
    const int64_t label = static_cast<int64_t>(r.experts_.size());
    r.experts_.push_back(expert);
    size_t used = 0;
    // An even stride over the list when it holds more than max_texts (deterministic, whole domain).
    const size_t n = config.max_texts > 0 ? std::min(config.max_texts, list.size()) : list.size();
    for (size_t k = 0; k < n; ++k) {
      const auto& t = list[k * list.size() / n];
      auto ids = tok.encode(t);
      if (ids.empty()) continue;
      if (int64_t(ids.size()) > config.max_tokens) ids.resize(size_t(config.max_tokens));
      std::vector<int64_t> lengths;
      for (auto p : kPrefixes)
        if (p < int64_t(ids.size())) lengths.push_back(p);
      lengths.push_back(int64_t(ids.size()));
      auto f = prefix_features(base, ids, r.with_embeddings_, lengths);  // [K, F]
      for (int64_t i = 0; i < f.size(0); ++i) {
        rows.push_back(f[i]);
        labels.push_back(label);
        group.push_back(texts_used);
        whole.push_back(i + 1 == f.size(0) ? 1 : 0);
      }
      ++texts_used;
      ++used;
    }
    if (used == 0) throw std::invalid_argument("expert '" + expert + "' has no non-empty text to train the router on");
  }
  auto x = torch::stack(rows);                      // [N, F]
  auto y = torch::tensor(labels, torch::kInt64);    // [N]
  const int64_t h = x.size(1), e = int64_t(r.experts_.size());

  // Deterministic split of the texts, stratified by nothing but the seed: every expert keeps at
  // least its share in expectation, and a tiny set keeps everything for training.
  std::vector<size_t> order(size_t(texts_used), 0);
  std::iota(order.begin(), order.end(), 0);
  shuffle_deterministic(order, config.seed);
  const int64_t n_val = texts_used >= 10 ? int64_t(std::llround(double(texts_used) * config.validation_fraction)) : 0;
  std::vector<bool> held_out(size_t(texts_used), false);
  for (int64_t i = 0; i < n_val; ++i) held_out[order[size_t(i)]] = true;
  std::vector<int64_t> tr, va;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!held_out[size_t(group[i])]) tr.push_back(int64_t(i));
    else if (whole[i]) va.push_back(int64_t(i));
  }
  auto tr_idx = torch::tensor(tr, torch::kInt64);
  auto xt = x.index_select(0, tr_idx), yt = y.index_select(0, tr_idx);

  r.mean_ = xt.mean(0);                              // [F]
  r.std_ = xt.std(0, /*unbiased=*/false).clamp_min(1e-5);  // [F]
  torch::manual_seed(config.seed);
  r.weight_ = torch::zeros({e, h}, torch::kFloat32).requires_grad_(true);  // [E, F]
  r.bias_ = torch::zeros({e}, torch::kFloat32).requires_grad_(true);       // [E]
  torch::optim::AdamW opt({r.weight_, r.bias_}, torch::optim::AdamWOptions(config.lr).weight_decay(config.weight_decay));
  for (int64_t step = 0; step < config.steps; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(r.logits(xt), yt);
    loss.backward();
    opt.step();
  }
  r.weight_ = r.weight_.detach();
  r.bias_ = r.bias_.detach();
  if (report) {
    torch::NoGradGuard no_grad;
    report->train_examples = size_t(texts_used - n_val);
    report->validation_examples = va.size();
    report->train_accuracy = r.logits(xt).argmax(1).eq(yt).to(torch::kFloat64).mean().item<double>();
    if (va.empty()) {
      report->validation_accuracy = std::nan("");
    } else {
      auto va_idx = torch::tensor(va, torch::kInt64);
      report->validation_accuracy = r.logits(x.index_select(0, va_idx))
                                        .argmax(1)
                                        .eq(y.index_select(0, va_idx))
                                        .to(torch::kFloat64)
                                        .mean()
                                        .item<double>();
    }
    report->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return r;
}

std::vector<ExpertScore> HiddenStateRouter::route(Qwen2ForCausalLM& base, const Tokenizer& tok,
                                                  const std::string& prompt) const {
  if (!trained()) throw std::logic_error("the learned router is not trained");
  auto ids = tok.encode(prompt);
  if (ids.empty()) return {};
  if (int64_t(ids.size()) > max_tokens_) ids.resize(size_t(max_tokens_));  // as in training
  torch::NoGradGuard no_grad;
  auto p = torch::softmax(logits(features(base, ids, with_embeddings_).unsqueeze(0)), 1).squeeze(0);  // [E]
  std::vector<ExpertScore> out;
  for (size_t i = 0; i < experts_.size(); ++i) {
    const double prob = p[int64_t(i)].item<double>();
    char reason[32];
    std::snprintf(reason, sizeof reason, "learned p=%.2f", prob);
    out.push_back({experts_[i], prob, reason});
  }
  std::stable_sort(out.begin(), out.end(), [](const ExpertScore& a, const ExpertScore& b) { return a.score > b.score; });
  return out;
}

void HiddenStateRouter::save(const std::string& path) const {
  if (!trained()) throw std::logic_error("the learned router is not trained");
  write_safetensors(path, {{"weight", weight_}, {"bias", bias_}, {"feature_mean", mean_}, {"feature_std", std_}},
                    {{"format", "fedmoe-router"},
                     {"experts", nlohmann::json(experts_).dump()},
                     {"features", with_embeddings_ ? kEmbeddingAndFinal : kFinal},
                     {"max_tokens", std::to_string(max_tokens_)}});
}

HiddenStateRouter HiddenStateRouter::load(const std::string& path, int64_t hidden_size) {
  auto fail = [&](const std::string& why) { return std::runtime_error(path + ": not a fedmoe router: " + why); };
  auto file = SafetensorsFile::open(path);
  auto meta = file->metadata();
  if (meta["format"] != "fedmoe-router") throw fail("metadata 'format' is not 'fedmoe-router'");
  auto names = nlohmann::json::parse(meta["experts"], nullptr, false);
  if (names.is_discarded() || !names.is_array() || names.empty()) throw fail("metadata 'experts' is not a JSON list");
  HiddenStateRouter r;
  // Files without "features" predate the embedding half: final hidden states only.
  const auto kind = meta.count("features") ? meta["features"] : std::string(kFinal);
  if (kind != kFinal && kind != kEmbeddingAndFinal)
    throw fail("metadata 'features' is '" + kind + "', expected '" + kEmbeddingAndFinal + "' or '" + kFinal + "'");
  r.with_embeddings_ = kind == kEmbeddingAndFinal;
  if (meta.count("max_tokens")) {
    try {
      r.max_tokens_ = std::stoll(meta["max_tokens"]);
    } catch (const std::exception&) {
      r.max_tokens_ = 0;
    }
    if (r.max_tokens_ < 1) throw fail("metadata 'max_tokens' is '" + meta["max_tokens"] + "', not a positive number");
  }
  for (const auto& n : names) {
    if (!n.is_string()) throw fail("metadata 'experts' holds a non-string");
    r.experts_.push_back(n.get<std::string>());
  }
  auto t = read_safetensors(path);
  for (const char* name : {"weight", "bias", "feature_mean", "feature_std"})
    if (!t.count(name)) throw fail(std::string("tensor '") + name + "' is missing");
  r.weight_ = t["weight"].to(torch::kFloat32).clone();
  r.bias_ = t["bias"].to(torch::kFloat32).clone();
  r.mean_ = t["feature_mean"].to(torch::kFloat32).clone();
  r.std_ = t["feature_std"].to(torch::kFloat32).clone();
  const int64_t e = int64_t(r.experts_.size());
  const int64_t h = r.weight_.dim() == 2 ? r.weight_.size(1) : -1;
  if (r.weight_.dim() != 2 || r.weight_.size(0) != e) throw fail("weight must be [experts=" + std::to_string(e) + ", F]");
  if (r.bias_.sizes() != torch::IntArrayRef{e}) throw fail("bias must be [" + std::to_string(e) + "]");
  if (r.mean_.sizes() != torch::IntArrayRef{h} || r.std_.sizes() != torch::IntArrayRef{h})
    throw fail("feature_mean and feature_std must be [" + std::to_string(h) + "]");
  const int64_t per_part = r.with_embeddings_ ? h / 2 : h;
  if (r.with_embeddings_ && h % 2 != 0) throw fail("features '" + kind + "' need an even width, weight has " + std::to_string(h));
  if (hidden_size > 0 && per_part != hidden_size)
    throw fail("trained on hidden size " + std::to_string(per_part) + ", this base has " + std::to_string(hidden_size));
  if (!torch::isfinite(r.weight_).all().item<bool>() || !torch::isfinite(r.bias_).all().item<bool>() ||
      !torch::isfinite(r.mean_).all().item<bool>() || !(r.std_ > 0).all().item<bool>())
    throw fail("non-finite weights or a non-positive feature_std");
  return r;
}

// --- shared -----------------------------------------------------------------------------------------

std::string routing_text(const Example& ex) {
  switch (ex.kind) {
    case Example::Kind::text: return ex.text;
    case Example::Kind::prompt_completion: return ex.prompt;
    case Example::Kind::chat: {
      std::string s;
      for (const auto& m : ex.messages)
        if (m.role == "user") s += (s.empty() ? "" : "\n") + m.content;
      return s;
    }
  }
  return {};
}

std::vector<ExpertScore> choose(const std::vector<ExpertScore>& ranked, size_t max_experts, double min_share) {
  std::vector<ExpertScore> out;
  for (const auto& s : ranked) {
    if (out.size() >= std::max<size_t>(max_experts, 1)) break;
    if (!out.empty() && s.score < min_share * out.front().score) break;
    if (s.score <= 0) break;
    out.push_back(s);
  }
  return out;
}

}  // namespace fedmoe::model
