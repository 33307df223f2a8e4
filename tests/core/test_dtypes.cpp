#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "moqe/core/dtypes.hpp"

using namespace moqe;

namespace {

bool is_nan_half(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// Checks that h is the representable half nearest to f, ties to even: the oracle is double
// arithmetic on the two neighbours.
void check_nearest_half(float f, uint16_t h) {
  const double x = f;
  const double v = half_bits_to_float(h);
  if (std::isinf(v)) {
    REQUIRE(std::fabs(x) >= 65520.0);
    return;
  }
  const uint16_t mag = h & 0x7fffu;
  // Above the largest half, the next step would be 65536 (the midpoint 65520 rounds to inf).
  const double up = mag < 0x7bffu ? half_bits_to_float(static_cast<uint16_t>(h + 1)) : 65536.0;
  const double down = mag > 0 ? half_bits_to_float(static_cast<uint16_t>(h - 1)) : -v;
  const double err = std::fabs(x - v);
  REQUIRE(err <= std::fabs(x - up));
  REQUIRE(err <= std::fabs(x - down));
  if (err == std::fabs(x - up) || (mag > 0 && err == std::fabs(x - down))) {
    REQUIRE((h & 1u) == 0u);  // a tie went to the even neighbour
  }
}

}  // namespace

TEST_CASE("fp16 round-trips every non-NaN half exactly", "[core][dtypes]") {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const auto h = static_cast<uint16_t>(b);
    if (is_nan_half(h)) {
      REQUIRE(std::isnan(half_bits_to_float(h)));
      REQUIRE(is_nan_half(float_to_half_bits(half_bits_to_float(h))));
      continue;
    }
    REQUIRE(float_to_half_bits(half_bits_to_float(h)) == h);
  }
}

TEST_CASE("fp16 conversion rounds to nearest even at the edges", "[core][dtypes]") {
  CHECK(float_to_half_bits(1.0f) == 0x3c00);
  CHECK(float_to_half_bits(-2.0f) == 0xc000);
  CHECK(float_to_half_bits(65504.0f) == 0x7bff);
  CHECK(float_to_half_bits(65519.99f) == 0x7bff);
  CHECK(float_to_half_bits(65520.0f) == 0x7c00);  // the tie goes up to inf (0x7bff is odd)
  CHECK(float_to_half_bits(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(float_to_half_bits(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even: 0
  CHECK(float_to_half_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_half_bits(std::ldexp(3.0f, -25)) == 0x0002);         // 1.5 ulp: tie to even 2
  CHECK(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie down to even
  CHECK(float_to_half_bits(1.0f + std::ldexp(3.0f, -11)) == 0x3c02);  // tie up to even
  CHECK(float_to_half_bits(std::ldexp(1023.5f, -24)) == 0x0400);      // subnormal rounds to normal
  CHECK(float_to_half_bits(-0.0f) == 0x8000);
  CHECK(float_to_half_bits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(is_nan_half(float_to_half_bits(std::numeric_limits<float>::quiet_NaN())));
  CHECK(half_bits_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_bits_to_float(0x3555) == 0.333251953125f);
}

TEST_CASE("fp16 conversion is the nearest half for random floats", "[core][dtypes]") {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    // Random magnitudes over the half range and beyond, all signs.
    const float f = std::ldexp(std::uniform_real_distribution<float>(1.0f, 2.0f)(rng),
                               static_cast<int>(bits(rng) % 46) - 30) *
                    ((bits(rng) & 1) ? -1.0f : 1.0f);
    check_nearest_half(f, float_to_half_bits(f));
  }
}

TEST_CASE("bf16 conversion rounds to nearest even", "[core][dtypes]") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);  // tie to even (down)
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(3.0f, -8)) == 0x3f82);  // tie to even (up)
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(5.0f, -9)) == 0x3f81);  // above the tie
  CHECK(bf16_bits_to_float(0x4049) == 3.140625f);
  CHECK(
      std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to inf
  std::mt19937 rng(7);
  for (int i = 0; i < 100000; ++i) {
    const float f = std::uniform_real_distribution<float>(-1e3f, 1e3f)(rng);
    const uint16_t b = float_to_bf16_bits(f);
    const double v = bf16_bits_to_float(b);
    const double up = bf16_bits_to_float(static_cast<uint16_t>(b + 1));
    const double down = bf16_bits_to_float(static_cast<uint16_t>(b - 1));
    REQUIRE(std::fabs(f - v) <= std::fabs(f - up));
    REQUIRE(std::fabs(f - v) <= std::fabs(f - down));
  }
  CHECK(static_cast<float>(BFloat16(2.5f)) == 2.5f);
  CHECK(static_cast<float>(Half(0.1f)) == 0.0999755859375f);
}
