#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "moqe/quant/adaptive.hpp"

using namespace moqe;

namespace {

// Uniform weights whose amplitude alternates 8, 1, 8, 1 ... in blocks of `block` along K. Groups
// within a block all have about the same relative error (the maximum of a uniform sample hardly
// depends on its size), while a group spanning two blocks quantizes the weak one with an 8x
// coarser step: e(2 * block) is about 1.4 e(block).
std::vector<float> blocky(int64_t n, int64_t k, int64_t block, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < k; ++c) w[r * k + c] = ((c / block) % 2 == 0 ? 8.0f : 1.0f) * u(rng);
  }
  return w;
}

}  // namespace

TEST_CASE("adaptive tries the dividing candidates and follows the tau rule", "[quant][adaptive]") {
  const int64_t n = 16, k = 1408;  // 1408 = 11 * 128: candidates K, 128, 64, 32
  const std::vector<float> w = blocky(n, k, 64, 3);
  const MatrixView<const float> v(w.data(), n, k);
  const AdaptiveResult a = quantize_adaptive(v, {4, QuantMode::kSym, 0}, {}, {2, "w"});
  std::vector<int64_t> tried;
  for (const auto& c : a.candidates) tried.push_back(c.group_size);
  CHECK(tried == std::vector<int64_t>{1408, 128, 64, 32});
  for (const auto& c : a.candidates) {
    CHECK(c.rel_error ==
          relative_error(v, {4, QuantMode::kSym, c.group_size == k ? 0 : c.group_size}));
  }
  const double finest = a.candidates.back().rel_error;
  CHECK(a.threshold == Approx(1.1 * finest));
  // The choice is the largest G within the threshold.
  int64_t expect = 32;
  for (const auto& c : a.candidates) {
    if (c.rel_error <= a.threshold) {
      expect = c.group_size;
      break;
    }
  }
  CHECK(a.chosen_group_size == expect);
  CHECK(a.matrix.group_size() == expect);
  // Amplitude blocks of 64: 64 is the largest group that keeps the error.
  CHECK(a.chosen_group_size == 64);
}

TEST_CASE("adaptive on Gaussian weights prefers coarse groups, budgets are honoured",
          "[quant][adaptive]") {
  const int64_t n = 8, k = 2048;
  std::mt19937 rng(11);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (auto& x : w) x = g(rng);
  const MatrixView<const float> v(w.data(), n, k);
  AdaptiveOptions loose;
  loose.tau = 10.0;  // anything within 11x of the finest: the whole row
  CHECK(quantize_adaptive(v, {8, QuantMode::kSym, 0}, loose).chosen_group_size == k);
  AdaptiveOptions budget;
  budget.error_budget = 0.0;  // unreachable at 2 bits
  const AdaptiveResult r = quantize_adaptive(v, {2, QuantMode::kSym, 0}, budget);
  CHECK_FALSE(r.budget_met);
  CHECK(r.chosen_group_size == 32);
  budget.error_budget = 1.0;  // anything
  CHECK(quantize_adaptive(v, {2, QuantMode::kSym, 0}, budget).chosen_group_size == k);
}

TEST_CASE("adaptive with K not a multiple of 32 falls to per-channel only", "[quant][adaptive]") {
  std::vector<float> w(3 * 50, 0.5f);
  w[7] = -1.0f;
  const AdaptiveResult r =
      quantize_adaptive(MatrixView<const float>(w.data(), 3, 50), {4, QuantMode::kAsym, 0});
  CHECK(r.candidates.size() == 1);
  CHECK(r.chosen_group_size == 50);
}
