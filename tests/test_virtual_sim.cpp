// The virtual-time simulation: losses fall under every policy, staleness appears with a
// heterogeneous fleet, runs are deterministic for a seed, stale updates beyond the bound are counted
// as rejected, and the metrics are JSON lines.
#include <catch2/catch.hpp>

#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/virtual_sim.hpp"

using namespace fedmoe;

namespace {

runtime::VirtualSimConfig small(const std::string& policy) {
  runtime::VirtualSimConfig c;
  c.workers = 60;
  c.experts = 3;
  c.updates_per_worker = 15;
  c.compute_seconds = 5;
  c.policy.name = policy;
  c.policy.max_staleness = 1000;
  c.policy.buffer_size = 4;
  c.policy.clients_per_round = 5;
  return c;
}

}  // namespace

TEST_CASE("virtual sim: every policy brings each expert close to its workers' optimum", "[sim]") {
  for (const char* policy : {"fedasync", "fedbuff", "fedavg"}) {
    INFO(policy);
    std::ostringstream metrics;
    auto r = runtime::run_virtual_sim(small(policy), metrics);
    CHECK(r.updates == 60 * 15);
    REQUIRE(r.final_loss.size() == 3);
    for (size_t e = 0; e < 3; ++e) CHECK(r.final_loss[e] < 0.3 * r.initial_loss[e]);
    CHECK(r.virtual_seconds > 15 * 5 * 0.5);  // at least 15 rounds of the fastest worker
    // Every line is JSON; the last is the summary.
    std::istringstream in(metrics.str());
    std::string line, last;
    int lines = 0;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line);
      CHECK((j.contains("loss") || j.contains("summary")));
      last = line;
      ++lines;
    }
    CHECK(lines > 3);
    auto summary = nlohmann::json::parse(last);
    CHECK(summary["summary"] == true);
    CHECK(summary["updates"] == 900);
  }
}

TEST_CASE("virtual sim: staleness is visible, bounded, and the run is deterministic", "[sim]") {
  auto c = small("fedasync");
  std::ostringstream m1, m2;
  auto a = runtime::run_virtual_sim(c, m1);
  auto b = runtime::run_virtual_sim(c, m2);
  CHECK(a.final_loss == b.final_loss);
  CHECK(a.virtual_seconds == b.virtual_seconds);
  auto text = m1.str();
  auto s = nlohmann::json::parse(text.substr(text.rfind('\n', text.size() - 2) + 1));
  uint64_t stale = 0, total = 0;
  for (const auto& b : s["staleness_histogram"]) {
    total += b["updates"].get<uint64_t>();
    if (b["staleness"] != "0") stale += b["updates"].get<uint64_t>();
  }
  CHECK(total == a.accepted);
  CHECK(stale > 0);  // 60 workers on 3 experts: most updates arrive after others
  CHECK(s["mean_staleness"].get<double>() > 1.0);
  CHECK(a.accepted == a.updates);

  c.policy.max_staleness = 2;
  std::ostringstream m3;
  auto bounded = runtime::run_virtual_sim(c, m3);
  CHECK(bounded.rejected > 0);
  CHECK(m3.str().find("\"too_stale\"") != std::string::npos);
}
