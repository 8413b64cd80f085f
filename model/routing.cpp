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

torch::Tensor HiddenStateRouter::features(Qwen2ForCausalLM& base, const std::vector<int32_t>& ids) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> ids64(ids.begin(), ids.end());
  auto input = torch::tensor(ids64, torch::kInt64).unsqueeze(0);  // [1, T]
  auto hidden = base->model->forward(input);                      // [1, T, H]
  return hidden.to(torch::kFloat32).mean(1).squeeze(0);          // [H]
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
  std::vector<torch::Tensor> rows;
  std::vector<int64_t> labels;
  for (const auto& [expert, list] : texts) {
    const int64_t label = static_cast<int64_t>(r.experts_.size());
    r.experts_.push_back(expert);
    size_t used = 0;
    for (const auto& t : list) {
      auto ids = tok.encode(t);
      if (ids.empty()) continue;
      if (int64_t(ids.size()) > config.max_tokens) ids.resize(size_t(config.max_tokens));
      rows.push_back(features(base, ids));
      labels.push_back(label);
      ++used;
    }
    if (used == 0) throw std::invalid_argument("expert '" + expert + "' has no non-empty text to train the router on");
  }
  auto x = torch::stack(rows);                      // [N, H]
  auto y = torch::tensor(labels, torch::kInt64);    // [N]
  const int64_t n = x.size(0), h = x.size(1), e = int64_t(r.experts_.size());

  // Deterministic split, stratified by nothing but the seed: every expert keeps at least its share
  // in expectation, and a tiny set keeps everything for training.
  std::vector<size_t> order(size_t(n), 0);
  std::iota(order.begin(), order.end(), 0);
  shuffle_deterministic(order, config.seed);
  int64_t n_val = n >= 10 ? int64_t(std::llround(double(n) * config.validation_fraction)) : 0;
  std::vector<int64_t> tr(order.begin() + n_val, order.end()), va(order.begin(), order.begin() + n_val);
  auto tr_idx = torch::tensor(tr, torch::kInt64);
  auto xt = x.index_select(0, tr_idx), yt = y.index_select(0, tr_idx);

  r.mean_ = xt.mean(0);                              // [H]
  r.std_ = xt.std(0, /*unbiased=*/false).clamp_min(1e-5);  // [H]
  torch::manual_seed(config.seed);
  r.weight_ = torch::zeros({e, h}, torch::kFloat32).requires_grad_(true);  // [E, H]
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
    report->train_examples = size_t(xt.size(0));
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
  torch::NoGradGuard no_grad;
  auto p = torch::softmax(logits(features(base, ids).unsqueeze(0)), 1).squeeze(0);  // [E]
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
                    {{"format", "fedmoe-router"}, {"experts", nlohmann::json(experts_).dump()}});
}

HiddenStateRouter HiddenStateRouter::load(const std::string& path, int64_t hidden_size) {
  auto fail = [&](const std::string& why) { return std::runtime_error(path + ": not a fedmoe router: " + why); };
  auto file = SafetensorsFile::open(path);
  auto meta = file->metadata();
  if (meta["format"] != "fedmoe-router") throw fail("metadata 'format' is not 'fedmoe-router'");
  auto names = nlohmann::json::parse(meta["experts"], nullptr, false);
  if (names.is_discarded() || !names.is_array() || names.empty()) throw fail("metadata 'experts' is not a JSON list");
  HiddenStateRouter r;
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
  if (r.weight_.dim() != 2 || r.weight_.size(0) != e) throw fail("weight must be [experts=" + std::to_string(e) + ", H]");
  if (r.bias_.sizes() != torch::IntArrayRef{e}) throw fail("bias must be [" + std::to_string(e) + "]");
  if (r.mean_.sizes() != torch::IntArrayRef{h} || r.std_.sizes() != torch::IntArrayRef{h})
    throw fail("feature_mean and feature_std must be [" + std::to_string(h) + "]");
  if (hidden_size > 0 && h != hidden_size)
    throw fail("trained on hidden size " + std::to_string(h) + ", this base has " + std::to_string(hidden_size));
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
