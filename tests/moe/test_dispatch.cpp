// DispatchPlan against independent counts over random routings (ids of -1, dropped slots, empty
// experts, 0 and 1 tokens, k = E); gather/combine against naive loops; build() after reserve()
// never reallocates.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/moe/dispatch.hpp"

using namespace moqe;

namespace {

// Bit-for-bit equality (memcmp, but safe for empty vectors).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// A random routing: each slot gets a random expert (or -1), distinct within a token when
// `distinct`, and a random kept flag; experts listed in `empty` never receive a kept slot.
Routing random_routing(int64_t tokens, int64_t slots, int64_t experts, uint32_t seed,
                       std::vector<int32_t> empty = {}, double p_unused = 0.15,
                       double p_dropped = 0.2) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::uniform_real_distribution<float> wdist(0.05f, 1.0f);
  Routing r;
  r.reset(tokens, slots, experts);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> perm(static_cast<size_t>(experts));
    for (int64_t e = 0; e < experts; ++e) perm[e] = static_cast<int32_t>(e);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t s = t * slots + j;
      int32_t id = perm[j % experts];
      if (u(rng) < p_unused) id = -1;
      r.ids[s] = id;
      if (id < 0) continue;
      r.weights[s] = wdist(rng);
      const bool is_empty = std::find(empty.begin(), empty.end(), id) != empty.end();
      r.kept[s] = (!is_empty && u(rng) >= p_dropped) ? 1 : 0;
      if (r.kept[s]) r.expert_load[id]++;
    }
  }
  return r;
}

// Checks every invariant of a plan against its routing, with an independent count.
void check_plan(const DispatchPlan& plan, const Routing& r) {
  const int64_t n = r.tokens * r.slots, E = r.num_experts;
  REQUIRE(plan.tokens() == r.tokens);
  REQUIRE(plan.slots() == r.slots);
  REQUIRE(plan.num_experts() == E);
  // Counts per expert, by a direct loop.
  std::vector<int64_t> count(static_cast<size_t>(E), 0);
  int64_t kept = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (r.kept[s]) {
      count[r.ids[s]]++;
      kept++;
    }
  }
  REQUIRE(plan.rows() == kept);
  // Offsets: the exclusive scan of the counts, closed by the total.
  const auto off = plan.offsets();
  REQUIRE(off.size() == static_cast<size_t>(E + 1));
  int64_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    CHECK(off[e] == acc);
    CHECK(plan.offset(e) == acc);
    CHECK(plan.expert_rows(e) == count[e]);
    CHECK(count[e] == r.expert_load[e]);  // random_routing keeps expert_load consistent
    acc += count[e];
  }
  CHECK(off[E] == acc);
  // Each kept slot appears exactly once, in its expert's range, in token order.
  const auto row_token = plan.row_token();
  const auto row_slot = plan.row_slot();
  const auto row_weight = plan.row_weight();
  const auto slot_row = plan.slot_row();
  REQUIRE(slot_row.size() == static_cast<size_t>(n));
  std::vector<int> seen(static_cast<size_t>(n), 0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t row = off[e]; row < off[e + 1]; ++row) {
      const int64_t s = row_slot[row];
      REQUIRE((s >= 0 && s < n));
      seen[s]++;
      CHECK(r.kept[s] == 1);
      CHECK(r.ids[s] == e);
      CHECK(row_token[row] == s / r.slots);
      CHECK(row_weight[row] == r.weights[s]);
      CHECK(slot_row[s] == row);                       // slot_row inverts row_slot
      if (row > off[e]) CHECK(row_slot[row - 1] < s);  // stable: increasing (token, slot)
    }
  }
  for (int64_t s = 0; s < n; ++s) {
    CHECK(seen[s] == (r.kept[s] ? 1 : 0));
    if (!r.kept[s]) CHECK(slot_row[s] == -1);
  }
}

std::vector<float> random_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> m(static_cast<size_t>(rows * cols));
  for (auto& v : m) v = g(rng);
  return m;
}

// The naive combine: y[t] = sum over kept slots j of t, in slot order, of w * ye[row].
std::vector<float> naive_combine(const DispatchPlan& plan, const Routing& r,
                                 const std::vector<float>& ye, int64_t h) {
  std::vector<float> y(static_cast<size_t>(r.tokens * h), 0.0f);
  for (int64_t t = 0; t < r.tokens; ++t) {
    for (int64_t j = 0; j < r.slots; ++j) {
      const int64_t s = t * r.slots + j;
      if (!r.kept[s]) continue;
      // Find the row by searching, not through slot_row.
      int64_t row = -1;
      for (int64_t q = 0; q < plan.rows(); ++q) {
        if (plan.row_slot()[q] == s) row = q;
      }
      REQUIRE(row >= 0);
      for (int64_t c = 0; c < h; ++c) y[t * h + c] += r.weights[s] * ye[row * h + c];
    }
  }
  return y;
}

}  // namespace

TEST_CASE("dispatch plan groups kept slots by expert, stably", "[moe][dispatch]") {
  struct Case {
    int64_t tokens, slots, experts;
    std::vector<int32_t> empty;
  };
  const std::vector<Case> cases = {
      {0, 2, 4, {}},         // zero tokens
      {1, 2, 4, {}},         // one token
      {1, 1, 1, {}},         // one expert
      {37, 2, 8, {3}},       // an expert with no tokens
      {64, 4, 4, {}},        // k = E
      {50, 8, 8, {0, 7}},    // k = E, empty first and last experts
      {200, 3, 16, {5, 6}},  // many experts
      {13, 6, 5, {}},        // more slots than experts (ids repeat within a token)
  };
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (double p_dropped : {0.0, 0.3, 1.0}) {
      INFO("T " << c.tokens << " slots " << c.slots << " E " << c.experts << " dropped "
                << p_dropped);
      const Routing r =
          random_routing(c.tokens, c.slots, c.experts, seed++, c.empty, 0.15, p_dropped);
      DispatchPlan plan;
      plan.build(r);
      check_plan(plan, r);
      for (int32_t e : c.empty) CHECK(plan.expert_rows(e) == 0);
      if (p_dropped == 1.0) CHECK(plan.rows() == 0);
    }
  }
}

TEST_CASE("dispatch plan of a hand-written routing", "[moe][dispatch]") {
  Routing r;
  r.reset(4, 2, 3);
  // t0 -> (2, 0), t1 -> (0, -1), t2 -> (2, 1) with slot 1 dropped, t3 -> (0, 2).
  r.ids = {2, 0, 0, -1, 2, 1, 0, 2};
  r.weights = {0.5f, 0.25f, 1.0f, 0.0f, 0.75f, 0.125f, 0.375f, 0.625f};
  r.kept = {1, 1, 1, 0, 1, 0, 1, 1};
  r.expert_load = {3, 0, 3};
  DispatchPlan plan;
  plan.build(r);
  CHECK(std::vector<int64_t>(plan.offsets().begin(), plan.offsets().end()) ==
        std::vector<int64_t>{0, 3, 3, 6});
  CHECK(std::vector<int32_t>(plan.row_token().begin(), plan.row_token().end()) ==
        std::vector<int32_t>{0, 1, 3, 0, 2, 3});
  CHECK(std::vector<int64_t>(plan.row_slot().begin(), plan.row_slot().end()) ==
        std::vector<int64_t>{1, 2, 6, 0, 4, 7});
  CHECK(std::vector<float>(plan.row_weight().begin(), plan.row_weight().end()) ==
        std::vector<float>{0.25f, 1.0f, 0.375f, 0.5f, 0.75f, 0.625f});
  CHECK(std::vector<int64_t>(plan.slot_row().begin(), plan.slot_row().end()) ==
        std::vector<int64_t>{3, 0, 1, -1, 4, -1, 2, 5});
  check_plan(plan, r);
}

TEST_CASE("gather_rows and combine_rows match naive loops exactly", "[moe][dispatch]") {
  struct Case {
    int64_t tokens, slots, experts, h;
  };
  const std::vector<Case> cases = {{0, 2, 4, 8},   {1, 2, 4, 5},   {1, 4, 4, 3},
                                   {40, 2, 8, 17}, {33, 8, 8, 64}, {100, 3, 6, 1}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    INFO("T " << c.tokens << " slots " << c.slots << " E " << c.experts << " H " << c.h);
    const Routing r = random_routing(c.tokens, c.slots, c.experts, seed++, {1});
    DispatchPlan plan;
    plan.build(r);
    const std::vector<float> x = random_matrix(c.tokens, c.h, seed++);
    // Expert outputs: any values per row.
    const std::vector<float> ye = random_matrix(plan.rows(), c.h, seed++);
    for (int threads : {1, 2, 3}) {
      // gather: a buffer with spare rows and a padded stride; the spare rows are left alone.
      const int64_t stride = c.h + 3, spare = 2;
      std::vector<float> xe(static_cast<size_t>((plan.rows() + spare) * stride), -7.0f);
      gather_rows(plan, MatrixView<const float>(x.data(), c.tokens, c.h),
                  MatrixView<float>(xe.data(), plan.rows() + spare, c.h, stride), threads);
      for (int64_t row = 0; row < plan.rows(); ++row) {
        const int64_t t = plan.row_token()[row];
        for (int64_t col = 0; col < c.h; ++col) {
          REQUIRE(xe[row * stride + col] == x[t * c.h + col]);
        }
        for (int64_t col = c.h; col < stride; ++col) REQUIRE(xe[row * stride + col] == -7.0f);
      }
      for (size_t i = static_cast<size_t>(plan.rows() * stride); i < xe.size(); ++i) {
        REQUIRE(xe[i] == -7.0f);
      }
      // combine: y starts as NaN, so a row left unwritten would show.
      std::vector<float> y(static_cast<size_t>(c.tokens * c.h),
                           std::numeric_limits<float>::quiet_NaN());
      combine_rows(plan, MatrixView<const float>(ye.data(), plan.rows(), c.h),
                   MatrixView<float>(y.data(), c.tokens, c.h), threads);
      const std::vector<float> want = naive_combine(plan, r, ye, c.h);
      REQUIRE(same_bits(y, want));
      // Tokens with no kept slot give 0.
      for (int64_t t = 0; t < c.tokens; ++t) {
        bool any = false;
        for (int64_t j = 0; j < c.slots; ++j) any = any || r.kept[t * c.slots + j];
        if (!any) {
          for (int64_t col = 0; col < c.h; ++col) REQUIRE(y[t * c.h + col] == 0.0f);
        }
      }
    }
  }
}

TEST_CASE("gather_rows and combine_rows check their shapes", "[moe][dispatch]") {
  const Routing r = random_routing(6, 2, 4, 7, {}, 0.0, 0.0);
  DispatchPlan plan;
  plan.build(r);
  REQUIRE(plan.rows() == 12);
  std::vector<float> x(6 * 8, 1.0f), xe(12 * 8), y(6 * 8);
  CHECK_THROWS_WITH(gather_rows(plan, MatrixView<const float>(x.data(), 5, 8),
                                MatrixView<float>(xe.data(), 12, 8)),
                    Catch::Contains("[5, 8]") && Catch::Contains("6 tokens"));
  CHECK_THROWS_WITH(gather_rows(plan, MatrixView<const float>(x.data(), 6, 8),
                                MatrixView<float>(xe.data(), 11, 8)),
                    Catch::Contains("[11, 8]") && Catch::Contains("12 rows"));
  CHECK_THROWS_AS(gather_rows(plan, MatrixView<const float>(x.data(), 6, 8),
                              MatrixView<float>(xe.data(), 12, 7)),
                  Error);
  CHECK_THROWS_WITH(combine_rows(plan, MatrixView<const float>(xe.data(), 12, 8),
                                 MatrixView<float>(y.data(), 6, 7)),
                    Catch::Contains("[12, 8]") && Catch::Contains("[6, 7]"));
  CHECK_THROWS_AS(combine_rows(plan, MatrixView<const float>(xe.data(), 10, 8),
                               MatrixView<float>(y.data(), 6, 8)),
                  Error);
}

TEST_CASE("reserve, then build never reallocates", "[moe][dispatch]") {
  const int64_t max_tokens = 64, slots = 4, E = 8;
  DispatchPlan plan;
  plan.reserve(max_tokens, slots, E);
  // Pointers right after reserve(): no build may move them, the full-size one included.
  const int64_t* offsets = plan.offsets().data();
  const int32_t* row_token = plan.row_token().data();
  const int64_t* row_slot = plan.row_slot().data();
  const float* row_weight = plan.row_weight().data();
  const int64_t* slot_row = plan.slot_row().data();
  const Routing full = random_routing(max_tokens, slots, E, 11, {}, 0.0, 0.0);
  plan.build(full);
  check_plan(plan, full);
  REQUIRE(plan.rows() == max_tokens * slots);
  CHECK(plan.offsets().data() == offsets);
  CHECK(plan.row_token().data() == row_token);
  CHECK(plan.row_slot().data() == row_slot);
  CHECK(plan.row_weight().data() == row_weight);
  CHECK(plan.slot_row().data() == slot_row);
  uint32_t seed = 12;
  for (int64_t t : {max_tokens, int64_t{1}, int64_t{0}, int64_t{37}, int64_t{63}}) {
    for (int64_t e : {E, int64_t{3}}) {  // fewer experts and slots fit too
      const Routing r = random_routing(t, std::min(slots, e), e, seed++, {});
      plan.build(r);
      check_plan(plan, r);
      CHECK(plan.offsets().data() == offsets);
      CHECK(plan.row_token().data() == row_token);
      CHECK(plan.row_slot().data() == row_slot);
      CHECK(plan.row_weight().data() == row_weight);
      CHECK(plan.slot_row().data() == slot_row);
    }
  }
}
