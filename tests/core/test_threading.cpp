#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <vector>

#include "moqe/core/threading.hpp"

using namespace moqe;

TEST_CASE("parallel_for covers the range exactly once", "[core][threading]") {
  for (int threads : {1, 2, 3, 8}) {
    for (int64_t n : {0, 1, 5, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      parallel_for(n, threads, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i]++;
      });
      for (auto& h : hits) REQUIRE(h.load() == 1);
    }
  }
}

TEST_CASE("parallel_for rethrows an exception from a worker", "[core][threading]") {
  CHECK_THROWS_AS(parallel_for(100, 4, 1,
                               [](int64_t b, int64_t) {
                                 if (b > 0) throw std::runtime_error("worker failed");
                               }),
                  std::runtime_error);
}
