// The real-clock simulation's fleet: which speed factor each worker gets, and how much slower every
// emulated device is made when the workers share fewer compute slots than they would keep busy.
#include <catch2/catch.hpp>

#include <numeric>

#include "runtime/real_sim.hpp"

using namespace fedmoe;

TEST_CASE("real sim fleet: every expert's workers span the whole speed range", "[sim][fleet]") {
  // 6 workers dealt round-robin to 3 experts: workers 0..2 are each expert's first, 3..5 its second.
  CHECK(runtime::worker_speeds(3, 6, 0.5, 2.0) == std::vector<double>{0.5, 0.5, 0.5, 2.0, 2.0, 2.0});
  // 3 workers per expert: 0.5, 1.25, 2.0 for each.
  const auto nine = runtime::worker_speeds(3, 9, 0.5, 2.0);
  REQUIRE(nine.size() == 9);
  for (size_t w = 0; w < 9; ++w) CHECK(nine[w] == Approx(0.5 + 0.75 * double(w / 3)));
  // 4 workers, 3 experts: expert 0 has two (0.5 and 2.0), experts 1 and 2 one each, at the global
  // even spread's value of their index (0.5 + 1.5 * w / 3).
  const auto four = runtime::worker_speeds(3, 4, 0.5, 2.0);
  REQUIRE(four.size() == 4);
  CHECK(four[0] == Approx(0.5));
  CHECK(four[1] == Approx(1.0));
  CHECK(four[2] == Approx(1.5));
  CHECK(four[3] == Approx(2.0));
  CHECK(runtime::worker_speeds(1, 1, 0.5, 2.0) == std::vector<double>{0.5});
  CHECK_THROWS(runtime::worker_speeds(0, 2, 0.5, 2.0));
}

TEST_CASE("real sim fleet: devices slow down together when they would need more cores than the slots",
          "[sim][fleet]") {
  const std::vector<double> speeds{0.5, 0.5, 0.5, 2.0, 2.0, 2.0};
  // Busy shares 1, 1, 1, 0.25, 0.25, 0.25: 3.75 cores.
  CHECK(runtime::device_time_scale(speeds, 0.5, 2) == Approx(3.75 / 2));
  CHECK(runtime::device_time_scale(speeds, 0.5, 3) == Approx(3.75 / 3));
  CHECK(runtime::device_time_scale(speeds, 0.5, 4) == 1.0);  // enough cores: this machine's speed
  CHECK(runtime::device_time_scale(speeds, 0.5, 0) == 1.0);  // no slots: no emulation of cores
  // After scaling, the fleet's busy shares add up to the slots exactly.
  const double scale = runtime::device_time_scale(speeds, 0.5, 2);
  double busy = 0;
  for (double s : speeds) busy += 1.0 / (s / 0.5 * scale);
  CHECK(busy == Approx(2.0));
}
