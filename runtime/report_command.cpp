#include "runtime/report_command.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <nlohmann/json.hpp>

namespace fedmoe::runtime {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The goals of the end-to-end issue, as the report checks them.
constexpr double kOwnDomainRatio = 0.85;   // expert ppl on its domain <= 0.85 x the base's
constexpr double kRouterAccuracy = 0.95;   // learned router top-1 on held-out prompts
constexpr double kAsyncTimeRatio = 1 / 1.5;  // async reaches sync's final loss in <= 1/1.5 of its time
constexpr double kCentralRatio = 1.05;     // federated ppl within 5% of the central baseline's

std::vector<json> read_lines(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::vector<json> out;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    if (line.front() != '{') continue;  // a tool's plain-text line that went to the same file
    try {
      out.push_back(json::parse(line));
    } catch (const json::exception& e) {
      throw std::runtime_error(path.string() + ":" + std::to_string(n) + ": not JSON: " + e.what());
    }
  }
  return out;
}

std::optional<json> read_last_line(const fs::path& path) {
  if (!fs::exists(path)) return std::nullopt;
  auto lines = read_lines(path);
  if (lines.empty()) throw std::runtime_error(path.string() + ": no JSON line");
  return lines.back();
}

std::string fmt(double v, int precision = 3) {
  if (std::isnan(v)) return "n/a";
  std::ostringstream s;
  s << std::fixed << std::setprecision(precision) << v;
  return s.str();
}

// One real-clock sim's metrics (fedmoe-node --role sim --clock real).
struct SimRun {
  std::string label, policy;
  bool present = false;
  double workers_start = 0;
  json config = json::object(), summary = json::object();
  std::map<std::string, std::vector<std::pair<double, double>>> curve;  // expert -> (t from workers' start, val loss)
  std::map<uint64_t, uint64_t> staleness;                               // over finished rounds
  std::map<std::string, uint64_t> accepted;                             // expert -> accepted rounds
  uint64_t rounds = 0;
  std::vector<json> asks;
};

SimRun read_sim(const fs::path& path, const std::string& label) {
  SimRun r;
  r.label = label;
  if (!fs::exists(path)) return r;
  r.present = true;
  auto lines = read_lines(path);
  for (const auto& l : lines) {
    const auto ev = l.value("event", "");
    if (ev == "config") r.config = l, r.policy = l.value("policy", "");
    if (ev == "workers_start") r.workers_start = l.value("t", 0.0);
  }
  for (const auto& l : lines) {
    const auto ev = l.value("event", "");
    if (ev == "eval")
      r.curve[l.value("expert", "?")].emplace_back(std::max(0.0, l.value("t", 0.0) - r.workers_start),
                                                   l.value("val_loss", kNaN));
    else if (ev == "round") {
      ++r.rounds;
      ++r.staleness[l.value("staleness", uint64_t{0})];
      if (l.value("verdict", "") == "accepted") ++r.accepted[l.value("expert", "?")];
    } else if (ev == "summary") {
      r.summary = l;
    } else if (ev == "ask") {
      r.asks.push_back(l);
    }
  }
  for (auto& [e, c] : r.curve) std::stable_sort(c.begin(), c.end());
  return r;
}

// When a sampled loss curve first reaches `target`, read off the straight line between the last
// capture above it and the first at or below it (the curve is sampled every --eval-every-s, far
// coarser than the rounds that move it). NaN when it never does.
double time_to(const std::vector<std::pair<double, double>>& curve, double target) {
  for (size_t i = 0; i < curve.size(); ++i) {
    const auto [t, loss] = curve[i];
    if (loss > target + 1e-9) continue;
    if (i == 0) return t;
    const auto [t0, l0] = curve[i - 1];
    return t0 + (t - t0) * (l0 - target) / (l0 - loss);
  }
  return kNaN;
}

// The expert of a central baseline line: its "expert", else (a `fedmoe finetune` line) the name of its
// --out directory (central/EXPERT); "" when neither says.
std::string central_expert(const json& line) {
  std::string expert = line.value("expert", "");
  if (expert.empty() && line.contains("out"))
    expert = fs::path(line.value("out", "")).lexically_normal().filename().string();
  return expert;
}

struct Goal {
  std::string name, measured, target;
  bool met = false;
  std::string note;
};

double cell(const json& eval, const std::string& model, const std::string& domain) {
  if (!eval.contains("matrix") || !eval["matrix"].contains(model) || !eval["matrix"][model].contains(domain))
    return kNaN;
  const auto& v = eval["matrix"][model][domain]["perplexity"];
  return v.is_number() ? v.get<double>() : kNaN;
}

void run_gnuplot(const fs::path& script) {
  const std::string cmd = "gnuplot '" + script.string() + "' 2>'" + script.string() + ".log'";
  if (std::system(cmd.c_str()) != 0)
    throw std::runtime_error("gnuplot failed on " + script.string() + " (see " + script.string() +
                             ".log; scripts/setup installs gnuplot-nox)");
}

std::string quoted(const std::string& s) {  // a gnuplot string literal
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

// A heat map of rows x columns with each cell's value printed on it.
void heatmap(const fs::path& dir, const std::string& name, const std::string& title,
             const std::vector<std::string>& rows, const std::vector<std::string>& cols,
             const std::vector<std::vector<double>>& color, const std::vector<std::vector<std::string>>& labels,
             const std::string& cblabel, double cbmin, double cbmax) {
  std::ofstream dat(dir / (name + ".dat"));
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t c = 0; c < cols.size(); ++c)
      dat << c << " " << r << " " << (std::isnan(color[r][c]) ? 0.0 : color[r][c]) << " " << quoted(labels[r][c]) << "\n";
  dat.close();
  std::ofstream gp(dir / (name + ".gp"));
  gp << "set terminal pngcairo size " << 220 + 130 * cols.size() << "," << 160 + 50 * rows.size()
     << " font 'sans,10'\nset output " << quoted((dir / (name + ".png")).string()) << "\n"
     << "set title " << quoted(title) << "\nunset key\nset cblabel " << quoted(cblabel) << "\n"
     << "set palette defined (0 '#2166ac', 0.5 '#f7f7f7', 1 '#b2182b')\nset cbrange [" << cbmin << ":" << cbmax
     << "]\n"
     << "set xrange [-0.5:" << cols.size() - 0.5 << "]\nset yrange [" << rows.size() - 0.5 << ":-0.5]\n"
     << "set xtics (";
  for (size_t c = 0; c < cols.size(); ++c) gp << (c ? ", " : "") << quoted(cols[c]) << " " << c;
  gp << ")\nset ytics (";
  for (size_t r = 0; r < rows.size(); ++r) gp << (r ? ", " : "") << quoted(rows[r]) << " " << r;
  gp << ")\nplot " << quoted((dir / (name + ".dat")).string()) << " using 1:2:3 with image, '' using 1:2:4 with labels\n";
  gp.close();
  run_gnuplot(dir / (name + ".gp"));
}

}  // namespace

int write_run_report(const std::string& run_dir, bool plots) {
  const fs::path run(run_dir);
  if (!fs::is_directory(run)) throw std::runtime_error("--run " + run_dir + ": no such directory");
  const fs::path plot_dir = run / "plots";
  if (plots) fs::create_directories(plot_dir);

  const auto corpus = read_last_line(run / "corpus.json");
  const auto base = read_last_line(run / "base.json");
  const auto eval = read_last_line(run / "eval.json");
  const auto async_run = read_sim(run / "async.jsonl", "asynchronous");
  const auto sync_run = read_sim(run / "sync.jsonl", "synchronous");
  std::vector<json> central;
  if (fs::exists(run / "central.jsonl")) central = read_lines(run / "central.jsonl");

  std::ostringstream md;
  std::vector<Goal> goals;
  md << "# fedmoe demo run: " << fs::absolute(run).filename().string() << "\n\n";

  // --- corpora ---
  if (corpus) {
    md << "## Corpora (built locally by `fedmoe corpus`)\n\n"
       << "| domain | sources | train examples | train bytes | validation | per worker (examples) |\n"
       << "|---|---|---:|---:|---:|---|\n";
    for (const auto& [name, d] : (*corpus)["domains"].items()) {
      std::string sources, workers;
      for (const auto& s : d.value("sources", json::array()))
        sources += (sources.empty() ? "" : ", ") + s.value("kind", "") + ":" + s.value("root", "");
      for (const auto& w : d.value("worker_examples", json::array()))
        workers += (workers.empty() ? "" : " / ") + std::to_string(w.get<uint64_t>());
      md << "| " << name << " | " << sources << " | " << d.value("train", 0) << " | " << d.value("train_bytes", 0)
         << " | " << d.value("validation", 0) << " | " << workers << " |\n";
    }
    md << "\n";
  }

  // --- the base model ---
  const bool base_row = eval && eval->contains("matrix") && (*eval)["matrix"].contains("base");
  if (base || base_row) {
    md << "## Base model\n\n";
    if (base) {
      const json pre = base->value("pretrain", json::object());
      md << "`" << base->value("model_config", std::string("?")) << "`, pretrained by the project (`fedmoe pretrain`) for "
         << pre.value("steps", 0) << " steps on " << base->value("data", std::string("?")) << " ("
         << base->value("data_files", 0) << " files): final training loss " << fmt(pre.value("train_loss", kNaN))
         << ", validation loss " << fmt(pre.value("val_loss", kNaN)) << " (perplexity "
         << fmt(pre.value("val_ppl", kNaN), 1) << ") on held-out text of that data.";
      if (!base->value("cached", true)) md << " Pretrained in this run.";
      md << "\n\n";
    }
    if (base_row) {
      double lo = std::numeric_limits<double>::infinity(), hi = 0;
      md << "Its perplexity on the experts' domains:";
      bool first = true;
      for (const auto& [domain, v] : (*eval)["matrix"]["base"].items()) {
        const double p = v.value("perplexity", kNaN);
        md << (first ? " " : ", ") << domain << " " << fmt(p, 0);
        first = false;
        if (!std::isnan(p)) lo = std::min(lo, p), hi = std::max(hi, p);
      }
      md << ".";
      // Why this base: the demo must build it within its time budget on two cores, so it is small and
      // briefly trained; readers should weigh the absolute numbers (and the generated text) accordingly.
      if (lo > 100)
        md << " This is a weak base (a small model trained for minutes on this machine, perplexity " << fmt(lo, 0)
           << " to " << fmt(hi, 0) << " on the domains): absolute perplexities below are high and generated answers "
              "are mostly noise. The quality goals compare models on this same base, as ratios.";
      md << "\n\n";
    }
  }

  // --- the federation runs ---
  std::vector<const SimRun*> sims;
  for (const auto* s : {&async_run, &sync_run})
    if (s->present) sims.push_back(s);
  if (!sims.empty()) {
    md << "## Federation runs\n\n| run | policy | workers | speed factors | latency ms | local steps x batch x seq | "
          "rounds | accepted | wall s |\n|---|---|---:|---|---:|---|---:|---:|---:|\n";
    for (const auto* s : sims) {
      const auto& c = s->config;
      uint64_t accepted = 0;
      for (const auto& [e, n] : s->accepted) accepted += n;
      md << "| " << s->label << " | " << s->policy << " | " << c.value("workers", 0) << " | "
         << fmt(c.value("speed_min", kNaN), 2) << "..." << fmt(c.value("speed_max", kNaN), 2)
         << (c.value("time_scale", 1.0) > 1.0 ? " (x" + fmt(c.value("time_scale", 1.0), 2) + " time scale)" : std::string())
         << " | "
         << c.value("latency_ms", 0) << " +- " << c.value("jitter_ms", 0) << " | " << c.value("local_steps", 0)
         << " x " << c.value("batch", 0) << " x " << c.value("seq_len", 0) << " | " << s->rounds << " | " << accepted
         << " | " << fmt(s->summary.value("t", kNaN), 1) << " |\n";
    }
    md << "\n";

    // Validation loss against time.
    md << "## Validation loss against time\n\nEach expert's newest version, taken from its primary shard during "
          "the run, on held-out validation data; t counts from the workers' start.\n\n";
    if (plots) {
      std::ofstream gp(plot_dir / "val_loss.gp");
      gp << "set terminal pngcairo size 900,520 font 'sans,10'\nset output "
         << quoted((plot_dir / "val_loss.png").string())
         << "\nset title 'validation loss per expert: asynchronous (solid) vs synchronous FedAvg (dashed)'\n"
            "set xlabel 'seconds since the workers started'\nset ylabel 'validation loss (nats/token)'\n"
            "set key outside right\nset grid\nplot ";
      bool first = true;
      int color = 1;
      std::map<std::string, int> colors;
      for (const auto* s : sims)
        for (const auto& [expert, c] : s->curve) {
          if (!colors.count(expert)) colors[expert] = color++;
          const auto file = plot_dir / ("curve-" + s->policy + "-" + expert + ".dat");
          std::ofstream dat(file);
          for (const auto& [t, loss] : c) dat << t << " " << loss << "\n";
          gp << (first ? "" : ", ") << quoted(file.string()) << " using 1:2 with linespoints lc " << colors[expert]
             << " dt " << (s == &async_run ? 1 : 2) << " title " << quoted(expert + " " + s->policy);
          first = false;
        }
      gp << "\n";
      gp.close();
      run_gnuplot(plot_dir / "val_loss.gp");
      md << "![validation loss](plots/val_loss.png)\n\n";
    }
    md << "| run | expert | first loss | final loss | final version | accepted updates |\n|---|---|---:|---:|---:|---:|\n";
    for (const auto* s : sims)
      for (const auto& [expert, c] : s->curve) {
        auto it = s->accepted.find(expert);
        md << "| " << s->label << " | " << expert << " | " << fmt(c.front().second) << " | " << fmt(c.back().second)
           << " | " << s->summary["experts"].value(expert, json::object()).value("version", 0) << " | "
           << (it == s->accepted.end() ? 0 : it->second) << " |\n";
      }
    md << "\n";

    // Staleness.
    md << "## Staleness of the updates\n\nVersions an update's base lagged behind the expert when it arrived.\n\n";
    std::map<uint64_t, std::pair<uint64_t, uint64_t>> hist;
    for (const auto& [k, n] : async_run.staleness) hist[k].first = n;
    for (const auto& [k, n] : sync_run.staleness) hist[k].second = n;
    if (plots && !hist.empty()) {
      std::ofstream dat(plot_dir / "staleness.dat");
      for (const auto& [k, n] : hist) dat << k << " " << n.first << " " << n.second << "\n";
      dat.close();
      std::ofstream gp(plot_dir / "staleness.gp");
      gp << "set terminal pngcairo size 800,450 font 'sans,10'\nset output "
         << quoted((plot_dir / "staleness.png").string())
         << "\nset title 'staleness histogram (updates)'\nset style data histogram\nset style histogram cluster gap 1\n"
            "set style fill solid 0.8 border -1\nset xlabel 'staleness (versions)'\nset ylabel 'updates'\nset grid ytics\n"
            "plot "
         << quoted((plot_dir / "staleness.dat").string()) << " using 2:xtic(1) title "
         << quoted("asynchronous (" + async_run.policy + ")") << ", '' using 3 title "
         << quoted("synchronous (" + sync_run.policy + ")") << "\n";
      gp.close();
      run_gnuplot(plot_dir / "staleness.gp");
      md << "![staleness](plots/staleness.png)\n\n";
    }
    md << "| staleness | asynchronous | synchronous |\n|---:|---:|---:|\n";
    for (const auto& [k, n] : hist) md << "| " << k << " | " << n.first << " | " << n.second << " |\n";
    md << "\n";
  }

  // --- the perplexity matrix and the router ---
  std::vector<std::string> experts;  // federated experts: matrix rows named like a domain
  if (eval) {
    const auto models = (*eval)["models"].get<std::vector<std::string>>();
    const auto domains = (*eval)["domains"].get<std::vector<std::string>>();
    for (const auto& d : domains)
      if (std::find(models.begin(), models.end(), d) != models.end()) experts.push_back(d);
    md << "## Expert-by-domain perplexity (held-out validation data)\n\nRows: the base and each expert; columns: "
          "the domains' validation sets, each example scored on its first tokens; \"mixed\": all of them together.\n\n| model |";
    for (const auto& d : domains) md << " " << d << " |";
    md << " mixed |\n|---|";
    for (size_t i = 0; i <= domains.size(); ++i) md << "---:|";
    md << "\n";
    for (const auto& m : models) {
      md << "| " << m << " |";
      for (const auto& d : domains) {
        const double v = cell(*eval, m, d);
        const bool best = m == d;
        md << " " << (best ? "**" : "") << fmt(v, 2) << (best ? "**" : "") << " |";
      }
      md << " " << fmt((*eval)["mixed"][m].value("perplexity", kNaN), 2) << " |\n";
    }
    md << "\n";
    if (plots) {
      std::vector<std::vector<double>> color;
      std::vector<std::vector<std::string>> labels;
      double extreme = 0.1;  // a symmetric colour range: white is "as the base"
      for (const auto& m : models) {
        color.emplace_back();
        labels.emplace_back();
        for (const auto& d : domains) {
          const double v = cell(*eval, m, d), b = cell(*eval, "base", d);
          color.back().push_back(std::log(v / b));
          if (std::isfinite(color.back().back())) extreme = std::max(extreme, std::abs(color.back().back()));
          labels.back().push_back(fmt(v, 1));
        }
      }
      heatmap(plot_dir, "perplexity_matrix", "perplexity (colour: log of the ratio to the base on that domain)", models,
              domains, color, labels, "log(ppl / base ppl)", -extreme, extreme);
      md << "![perplexity matrix](plots/perplexity_matrix.png)\n\n";
    }
    for (const auto& e : experts) {
      const double own = cell(*eval, e, e), base = cell(*eval, "base", e), ratio = own / base;
      goals.push_back({"expert " + e + ": perplexity on its domain vs the base's", fmt(ratio) + " (" + fmt(own, 2) +
                           " vs " + fmt(base, 2) + ")", "<= " + fmt(kOwnDomainRatio, 2), ratio <= kOwnDomainRatio, ""});
    }
    for (const auto& d : domains) {
      if (experts.size() < 2) break;
      std::string best;
      double best_v = std::numeric_limits<double>::infinity();
      for (const auto& e : experts)
        if (cell(*eval, e, d) < best_v) best_v = cell(*eval, e, d), best = e;
      goals.push_back({"domain " + d + ": its own expert is the best of the experts", "best: " + best + " (" +
                           fmt(best_v, 2) + ")", d, best == d, ""});
    }

    if (eval->contains("router")) {
      const auto& r = (*eval)["router"];
      const auto rexperts = r["experts"].get<std::vector<std::string>>();
      md << "## Learned router\n\nTop-1 expert for each held-out validation example (its first "
            "characters as the prompt), on the base's hidden states.\n\n| true domain \\ routed to |";
      for (const auto& e : rexperts) md << " " << e << " |";
      md << "\n|---|";
      for (size_t i = 0; i < rexperts.size(); ++i) md << "---:|";
      md << "\n";
      std::vector<std::vector<double>> color;
      std::vector<std::vector<std::string>> labels;
      for (const auto& d : domains) {
        md << "| " << d << " |";
        uint64_t total = 0;
        for (const auto& e : rexperts) total += r["confusion"].value(d, json::object()).value(e, uint64_t{0});
        color.emplace_back();
        labels.emplace_back();
        for (const auto& e : rexperts) {
          const auto n = r["confusion"].value(d, json::object()).value(e, uint64_t{0});
          md << " " << n << " |";
          color.back().push_back(total ? double(n) / double(total) : 0.0);
          labels.back().push_back(std::to_string(n));
        }
        md << "\n";
      }
      const double acc = r.value("accuracy", kNaN);
      md << "\nAccuracy " << fmt(100 * acc, 1) << "% (" << r.value("correct", 0) << " of " << r.value("examples", 0)
         << ").\n\n";
      if (plots) {
        heatmap(plot_dir, "router_confusion", "learned router: true domain (rows) vs routed expert (columns)", domains,
                rexperts, color, labels, "share of the row", 0, 1);
        md << "![router confusion](plots/router_confusion.png)\n\n";
      }
      goals.push_back({"learned router top-1 accuracy on held-out prompts", fmt(100 * acc, 1) + "%",
                       ">= " + fmt(100 * kRouterAccuracy, 0) + "%", acc >= kRouterAccuracy, ""});
      const double routed = r["routed"].value("perplexity", kNaN);
      std::string best;
      double best_single = std::numeric_limits<double>::infinity();
      for (const auto& e : rexperts) {
        const double v = (*eval)["mixed"][e].value("perplexity", kNaN);
        if (v < best_single) best_single = v, best = e;
      }
      md << "Routed inference on the mixed validation set (each example by its top-1 expert): perplexity "
         << fmt(routed, 2) << "; the best single expert on the same set: " << best << " " << fmt(best_single, 2)
         << "; the base: " << fmt((*eval)["mixed"]["base"].value("perplexity", kNaN), 2) << ".\n\n";
      goals.push_back({"routed mixed-set perplexity below every single expert's", fmt(routed, 2) + " vs " + best + " " +
                           fmt(best_single, 2), "< " + fmt(best_single, 2), routed < best_single, ""});
    }
  }

  // --- asynchronous vs synchronous ---
  if (async_run.present && sync_run.present) {
    md << "## Asynchronous vs synchronous aggregation\n\nTarget: the synchronous run's final validation loss per "
          "expert; time: when each run's curve first reaches it (from the workers' start; linear between two "
          "captures).\n\n"
          "| expert | target loss | synchronous s | asynchronous s | ratio |\n|---|---:|---:|---:|---:|\n";
    for (const auto& [expert, sc] : sync_run.curve) {
      auto it = async_run.curve.find(expert);
      if (sc.empty() || it == async_run.curve.end()) continue;
      const double target = sc.back().second;
      const double ts = time_to(sc, target), ta = time_to(it->second, target), ratio = ta / ts;
      md << "| " << expert << " | " << fmt(target) << " | " << fmt(ts, 1) << " | " << fmt(ta, 1) << " | " << fmt(ratio)
         << " |\n";
      std::string measured = fmt(ratio) + " (" + fmt(ta, 1) + " s vs " + fmt(ts, 1) + " s)";
      if (std::isnan(ta)) measured = "never reached (async final " + fmt(it->second.back().second) + " vs " + fmt(target) + ")";
      if (!(ts > 0)) measured = "not measurable: FedAvg's final loss is its starting loss (no round completed in time)";
      goals.push_back({"expert " + expert + ": time of async to the FedAvg final loss / FedAvg's time", measured,
                       "<= " + fmt(kAsyncTimeRatio), ts > 0 && !std::isnan(ta) && ratio <= kAsyncTimeRatio, ""});
    }
    md << "\n";
  }

  // --- central baseline ---
  if (!central.empty() && eval) {
    md << "## Central baseline (same steps, pooled worker data)\n\n| expert | central steps | federated ppl | central "
          "ppl | ratio |\n|---|---:|---:|---:|---:|\n";
    for (const auto& c : central) {
      const std::string expert = central_expert(c);
      if (expert.empty()) continue;
      const double fed = cell(*eval, expert, expert), cen = cell(*eval, "central-" + expert, expert), ratio = fed / cen;
      md << "| " << expert << " | " << c.value("steps", 0) << " | " << fmt(fed, 2) << " | " << fmt(cen, 2) << " | "
         << fmt(ratio) << " |\n";
      goals.push_back({"expert " + expert + ": federated perplexity / central perplexity", fmt(ratio) + " (" +
                           fmt(fed, 2) + " vs " + fmt(cen, 2) + ")", "<= " + fmt(kCentralRatio, 2),
                       ratio <= kCentralRatio, ""});
    }
    md << "\n";
  }

  if (eval && !experts.empty() && async_run.present) {
    // A federated expert without its central baseline: the goal is not met, and the report says why.
    std::set<std::string> measured;
    for (const auto& c : central) {
      measured.insert(central_expert(c));
    }
    for (const auto& e : experts)
      if (!measured.count(e))
        goals.push_back({"expert " + e + ": federated perplexity / central perplexity",
                         "not measured (no central baseline: the asynchronous run accepted no update of it)",
                         "<= " + fmt(kCentralRatio, 2), false, ""});
  }

  // --- routed answers ---
  if (!async_run.asks.empty()) {
    md << "## Routed inference (the router of the asynchronous run)\n\n";
    for (const auto& a : async_run.asks) {
      std::string chosen;
      for (const auto& e : a.value("experts", json::array()))
        chosen += (chosen.empty() ? "" : ", ") + e.value("expert", "") + "@v" + std::to_string(e.value("version", 0)) +
                  " (" + e.value("reason", "") + ")";
      auto prompt = a.value("prompt", "").substr(0, 120);
      for (auto& ch : prompt) ch = ch == '\n' ? ' ' : ch == '`' ? '\'' : ch;  // one line of inline code
      md << "- prompt: `" << prompt << "`"
         << (a.contains("expected_expert") ? " (held out from " + a.value("expected_expert", "") + ")" : "") << "\n"
         << "  - experts: " << (a.contains("error") ? "error: " + a.value("error", "") : chosen) << "\n";
      if (a.contains("text")) {
        auto text = a.value("text", "");
        std::replace(text.begin(), text.end(), '\n', ' ');
        std::replace(text.begin(), text.end(), '`', '\'');
        md << "  - answer: `" << text.substr(0, 200) << "`\n";
      }
    }
    md << "\n";
  }

  // --- goals ---
  int missed = 0;
  if (!goals.empty()) {
    md << "## Quality goals\n\n| goal | measured | target | met |\n|---|---|---|---|\n";
    for (const auto& g : goals) {
      md << "| " << g.name << " | " << g.measured << " | " << g.target << " | " << (g.met ? "yes" : "**no**") << " |\n";
      missed += g.met ? 0 : 1;
    }
    md << "\n" << goals.size() - size_t(missed) << " of " << goals.size() << " goals met.\n";
  }

  std::ofstream(run / "report.md") << md.str();
  json gj = json::array();
  for (const auto& g : goals) gj.push_back({{"goal", g.name}, {"measured", g.measured}, {"target", g.target}, {"met", g.met}});
  std::ofstream(run / "goals.json") << gj.dump(2) << "\n";
  return goals.empty() ? -1 : missed;
}

void add_report_command(CLI::App& app) {
  auto run = std::make_shared<std::string>();
  auto no_plots = std::make_shared<bool>(false);
  auto* c = app.add_subcommand("report", "write a demo run's report.md (tables, PNG plots, the quality goals checked)");
  c->add_option("--run", *run, "the run directory (corpus.json, async.jsonl, sync.jsonl, eval.json, central.jsonl)")
      ->required();
  c->add_flag("--no-plots", *no_plots, "tables only (no gnuplot)");
  c->callback([run, no_plots] {
    try {
      const int missed = write_run_report(*run, !*no_plots);
      std::cout << json{{"command", "report"}, {"report", (fs::path(*run) / "report.md").string()},
                        {"goals_missed", missed < 0 ? json() : json(missed)}}
                       .dump()
                << std::endl;
    } catch (const std::exception& e) {
      std::cerr << "fedmoe report: " << e.what() << std::endl;
      throw CLI::RuntimeError(1);
    }
  });
}

}  // namespace fedmoe::runtime
