// QuantizedLinear for fp32, fp16, bf16 and every quantized scheme against a double-precision loop
// over the decoded weights, under every CPU kernel this machine runs; decode_row, concat_rows and
// the shape errors.
#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "moqe/core/cpu.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/gemm/reference.hpp"
#include "moqe/quant/packing.hpp"
#include "moqe/quant/quantized_matrix.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

std::vector<float> normal(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = g(rng);
  return v;
}

// IEEE binary16 bits to a double, written from the format's definition.
double decode_f16(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(double(mant), -24);  // subnormal: mant * 2^-14 / 2^10
  } else if (exp == 31) {
    v = mant ? std::numeric_limits<double>::quiet_NaN() : INFINITY;
  } else {
    v = std::ldexp(double(1024 + mant), exp - 25);  // (1 + mant / 2^10) * 2^(exp - 15)
  }
  return sign ? -v : v;
}

// bf16 is the top half of an fp32.
double decode_bf16(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Checks y [M, N] = x [M, K] . W^T against a double-precision loop over the decoded weights w.
// An fp32 dot product of K terms (any summation order) is within K * eps * sum |x w| of the exact
// value; the decoded weights are exact in fp32, so the bound holds as is.
//
// `w_mag` (optional, [N, K]) replaces |w| in that bound: a kernel that computes
// s * (sum c x - z * sum x) from the stored codes c and zero point z (the SIMD kernels do) rounds
// terms of size |s| (|c| + |z|) |x|, not |w| |x| = |s| |c - z| |x|.
void check_forward(const std::vector<float>& y, int64_t y_stride, const std::vector<float>& x,
                   const std::vector<double>& w, int64_t m, int64_t n, int64_t k,
                   const std::vector<double>* w_mag = nullptr) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < k; ++i) {
        ref += double(x[r * k + i]) * w[c * k + i];
        mag +=
            std::abs(double(x[r * k + i])) * (w_mag ? (*w_mag)[c * k + i] : std::abs(w[c * k + i]));
      }
      const double bound = double(k) * FLT_EPSILON * mag + 1e-30;
      const double got = y[r * y_stride + c];
      if (!(std::abs(got - ref) <= bound)) {
        INFO("row " << r << " col " << c << " got " << got << " want " << ref << " bound "
                    << bound);
        REQUIRE(std::abs(got - ref) <= bound);
      }
    }
  }
}

// Runs forward into a padded y (stride n + 2, padding and spare values preset to a marker) and
// checks that the padding is untouched.
std::vector<float> run(const QuantizedLinear& l, const std::vector<float>& x, int64_t m,
                       int threads = 0) {
  const int64_t n = l.out_features(), k = l.in_features(), stride = n + 2;
  std::vector<float> y(static_cast<size_t>(std::max<int64_t>(m, 1) * stride), -3.0f);
  l.forward(MatrixView<const float>(x.data(), m, k), MatrixView<float>(y.data(), m, n, stride),
            threads);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = n; c < stride; ++c) REQUIRE(y[r * stride + c] == -3.0f);
  }
  if (m == 0) {
    for (float v : y) REQUIRE(v == -3.0f);
  }
  return y;
}

std::vector<uint16_t> to_half_bits(const std::vector<float>& w, DType dtype) {
  std::vector<uint16_t> b(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    b[i] = dtype == DType::kF16 ? float_to_half_bits(w[i]) : float_to_bf16_bits(w[i]);
  }
  return b;
}

QuantizedMatrix quantize_w(const std::vector<float>& w, int64_t n, int64_t k,
                           const QuantScheme& s) {
  return quantize(MatrixView<const float>(w.data(), n, k), s);
}

// |s| (|c| + |z|) per weight of q: the magnitude of the terms a zero-point-folding kernel rounds.
std::vector<double> code_magnitudes(const QuantizedMatrix& q) {
  std::vector<double> mag(static_cast<size_t>(q.rows() * q.cols()));
  const int64_t g = q.group_size();
  for (int64_t r = 0; r < q.rows(); ++r) {
    for (int64_t c = 0; c < q.cols(); ++c) {
      const double code = unpack_code(q.packed_row(r), c, q.bits());
      mag[r * q.cols() + c] =
          std::abs(double(q.scale(r, c / g))) * (code + std::abs(double(q.zero(r, c / g))));
    }
  }
  return mag;
}

// The kernels this build and CPU can run: the reference, and the best SIMD level if any.
std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> v = {CpuIsa::kReference};
  if (best_cpu_isa() != CpuIsa::kReference) v.push_back(best_cpu_isa());
  return v;
}

}  // namespace

TEST_CASE("fp32, fp16 and bf16 linear forward against a double loop", "[gemm]") {
  struct Shape {
    int64_t n, k;
  };
  const std::vector<Shape> shapes = {{7, 100}, {13, 64}, {1, 1}, {5, 33}, {16, 200}, {9, 130}};
  uint32_t seed = 1;
  for (CpuIsa isa : isas()) {
    const test::ScopedCpuIsa cap(isa);
    for (const Shape& s : shapes) {
      const std::vector<float> w = normal(s.n * s.k, seed++, 0.1f);
      for (int64_t m : {0, 1, 5, 9}) {
        const std::vector<float> x = normal(std::max<int64_t>(m, 1) * s.k, seed++);
        INFO(to_string(isa) << " N " << s.n << " K " << s.k << " M " << m);
        {  // fp32
          const QuantizedLinear l = QuantizedLinear::from_f32(w, s.n, s.k);
          CHECK(l.isa() == std::min(isa, CpuIsa::kAvx2));  // dense: AVX2 kernels at most
          CHECK(l.storage() == WeightStorage::kF32);
          CHECK(l.describe() == "f32");
          CHECK(l.weight_bytes() == s.n * s.k * 4);
          const std::vector<double> wd(w.begin(), w.end());
          check_forward(run(l, x, m), s.n + 2, x, wd, m, s.n, s.k);
        }
        for (DType dt : {DType::kF16, DType::kBF16}) {
          INFO(dtype_name(dt));
          const std::vector<uint16_t> bits = to_half_bits(w, dt);
          const QuantizedLinear l = QuantizedLinear::from_half(bits, dt, s.n, s.k);
          CHECK(l.storage() == (dt == DType::kF16 ? WeightStorage::kF16 : WeightStorage::kBF16));
          CHECK(l.describe() == (dt == DType::kF16 ? "f16" : "bf16"));
          CHECK(l.weight_bytes() == s.n * s.k * 2);
          CHECK(l.isa() == std::min(isa, CpuIsa::kAvx2));
          std::vector<double> wd(bits.size());
          for (size_t i = 0; i < bits.size(); ++i) {
            wd[i] = dt == DType::kF16 ? decode_f16(bits[i]) : decode_bf16(bits[i]);
          }
          // decode_row and to_f32 give the decoded weights exactly.
          std::vector<float> row(static_cast<size_t>(s.k));
          for (int64_t r = 0; r < s.n; ++r) {
            l.decode_row(r, row.data());
            for (int64_t i = 0; i < s.k; ++i) REQUIRE(double(row[i]) == wd[r * s.k + i]);
          }
          const std::vector<float> full = l.to_f32();
          for (size_t i = 0; i < full.size(); ++i) REQUIRE(double(full[i]) == wd[i]);
          check_forward(run(l, x, m), s.n + 2, x, wd, m, s.n, s.k);
        }
      }
    }
  }
}

TEST_CASE("fp16 subnormal and special weights decode exactly", "[gemm]") {
  // 0x0001: 2^-24; 0x03ff: largest subnormal; 0x7bff: 65504; 0x8400: -2^-14; 0x3c00: 1.
  const std::vector<uint16_t> bits = {0x0001, 0x03ff, 0x7bff, 0x8400, 0x3c00, 0x0000};
  const QuantizedLinear l = QuantizedLinear::from_half(bits, DType::kF16, 1, 6);
  std::vector<float> row(6);
  l.decode_row(0, row.data());
  for (size_t i = 0; i < bits.size(); ++i) CHECK(double(row[i]) == decode_f16(bits[i]));
  CHECK(row[2] == 65504.0f);
}

TEST_CASE("quantized linear forward for every bits, mode, group size and scale type", "[gemm]") {
  struct Shape {
    int64_t n, k, group;
  };
  // K not a multiple of 64 (96, 160, 100), odd N, a group equal to K, and per channel.
  const std::vector<Shape> shapes = {{7, 96, 32},   {7, 96, kPerChannel}, {13, 160, 32},
                                     {5, 192, 64},  {3, 384, 128},        {7, 100, kPerChannel},
                                     {9, 128, 128}, {1, 32, 32}};
  uint32_t seed = 1000;
  for (CpuIsa isa : isas()) {
    const test::ScopedCpuIsa cap(isa);
    for (int bits : kSupportedBits) {
      for (QuantMode mode : kSupportedModes) {
        for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
          for (const Shape& s : shapes) {
            const QuantScheme scheme{bits, mode, s.group, st};
            INFO(to_string(isa) << " " << scheme.to_string() << " N " << s.n << " K " << s.k);
            const std::vector<float> w = test::gaussian_weights(s.n, s.k, seed++, 0.1f);
            const QuantizedMatrix q = quantize_w(w, s.n, s.k, scheme);
            const std::vector<float> deq = dequantize(q);
            const QuantizedLinear l = QuantizedLinear::from_quantized(q);
            REQUIRE(l.is_quantized());
            CHECK(l.out_features() == s.n);
            CHECK(l.in_features() == s.k);
            CHECK(l.weight_bytes() == q.storage_bytes());
            CHECK(l.describe() == scheme.to_string());
            // decode_row and to_f32 match the scalar dequantize exactly.
            std::vector<float> row(static_cast<size_t>(s.k));
            for (int64_t r = 0; r < s.n; ++r) {
              l.decode_row(r, row.data());
              REQUIRE(std::memcmp(row.data(), deq.data() + r * s.k, row.size() * 4) == 0);
            }
            REQUIRE(l.to_f32() == deq);
            const QuantizedLinear f = QuantizedLinear::from_f32(deq, s.n, s.k);
            const std::vector<double> wd(deq.begin(), deq.end());
            const std::vector<double> mag = code_magnitudes(q);
            for (int64_t m : {0, 1, 5, 9}) {
              const std::vector<float> x = normal(std::max<int64_t>(m, 1) * s.k, seed++);
              const std::vector<float> y = run(l, x, m);
              check_forward(y, s.n + 2, x, wd, m, s.n, s.k,
                            l.isa() == CpuIsa::kReference ? nullptr : &mag);
              check_forward(run(f, x, m), s.n + 2, x, wd, m, s.n, s.k);
              // Under the reference kernel the quantized layer and the fp32 layer of its
              // dequantized weights agree exactly (SIMD kernels apply each group's scale once).
              if (isa == CpuIsa::kReference) REQUIRE(run(f, x, m) == y);
              // Whatever the thread count.
              REQUIRE(run(l, x, m, 1) == y);
              REQUIRE(run(l, x, m, 3) == y);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("forward is identical for any thread count", "[gemm]") {
  for (CpuIsa isa : isas()) {
    INFO(to_string(isa));
    const test::ScopedCpuIsa cap(isa);
    const int64_t n = 77, k = 96, m = 9;
    const std::vector<float> w = normal(n * k, 5, 0.1f);
    const std::vector<float> x = normal(m * k, 6);
    const QuantizedLinear f32 = QuantizedLinear::from_f32(w, n, k);
    const QuantizedLinear bf16 =
        QuantizedLinear::from_half(to_half_bits(w, DType::kBF16), DType::kBF16, n, k);
    const QuantizedLinear q = QuantizedLinear::from_quantized(
        quantize_w(w, n, k, {3, QuantMode::kAsym, 32, ScaleType::kF16}));
    for (const QuantizedLinear* l : {&f32, &bf16, &q}) {
      const std::vector<float> y1 = run(*l, x, m, 1);
      for (int threads : {2, 3, 8}) CHECK(run(*l, x, m, threads) == y1);
      if (isa != CpuIsa::kReference) continue;
      // Each row of y is the reference dot product of x with the decoded weight row.
      std::vector<float> row(static_cast<size_t>(k));
      for (int64_t c = 0; c < n; ++c) {
        l->decode_row(c, row.data());
        for (int64_t r = 0; r < m; ++r) {
          REQUIRE(y1[r * (n + 2) + c] == dot_f32(x.data() + r * k, row.data(), k));
        }
      }
    }
  }
}

TEST_CASE("concat_rows stacks two linears; can_concat says when", "[gemm]") {
  const CpuIsa isa = GENERATE(from_range(isas()));
  INFO(to_string(isa));
  const test::ScopedCpuIsa cap(isa);
  const int64_t k = 96, na = 5, nb = 3, m = 4;
  const std::vector<float> wa = normal(na * k, 21, 0.1f), wb = normal(nb * k, 22, 0.1f);
  const std::vector<float> x = normal(m * k, 23);
  auto check_concat = [&](const QuantizedLinear& a, const QuantizedLinear& b) {
    REQUIRE(QuantizedLinear::can_concat(a, b));
    const QuantizedLinear c = QuantizedLinear::concat_rows(a, b);
    CHECK(c.out_features() == na + nb);
    CHECK(c.in_features() == k);
    CHECK(c.storage() == a.storage());
    CHECK(c.isa() == a.isa());
    if (a.describe() == b.describe()) CHECK(c.describe() == a.describe());
    CHECK(c.weight_bytes() == a.weight_bytes() + b.weight_bytes());
    std::vector<float> want = a.to_f32();
    const std::vector<float> fb = b.to_f32();
    want.insert(want.end(), fb.begin(), fb.end());
    CHECK(c.to_f32() == want);
    // Forward: the columns of a, then those of b, bit for bit.
    const std::vector<float> yc = run(c, x, m), ya = run(a, x, m), yb = run(b, x, m);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < na; ++j) REQUIRE(yc[r * (na + nb + 2) + j] == ya[r * (na + 2) + j]);
      for (int64_t j = 0; j < nb; ++j) {
        REQUIRE(yc[r * (na + nb + 2) + na + j] == yb[r * (nb + 2) + j]);
      }
    }
  };
  SECTION("fp32") {
    check_concat(QuantizedLinear::from_f32(wa, na, k), QuantizedLinear::from_f32(wb, nb, k));
  }
  SECTION("fp16 and bf16") {
    for (DType dt : {DType::kF16, DType::kBF16}) {
      check_concat(QuantizedLinear::from_half(to_half_bits(wa, dt), dt, na, k),
                   QuantizedLinear::from_half(to_half_bits(wb, dt), dt, nb, k));
    }
  }
  SECTION("quantized, every bit width (3 bits: rows are not byte multiples of codes)") {
    for (int bits : kSupportedBits) {
      for (QuantMode mode : {QuantMode::kSym, QuantMode::kAsym}) {
        const QuantScheme s{bits, mode, 32, ScaleType::kF16};
        INFO(s.to_string());
        check_concat(QuantizedLinear::from_quantized(quantize_w(wa, na, k, s)),
                     QuantizedLinear::from_quantized(quantize_w(wb, nb, k, s)));
      }
    }
  }
  SECTION("quantized per channel, and a group equal to K beside per channel") {
    const QuantScheme ch{4, QuantMode::kSymFull, kPerChannel, ScaleType::kF32};
    const QuantScheme gk{4, QuantMode::kSymFull, k, ScaleType::kF32};
    check_concat(QuantizedLinear::from_quantized(quantize_w(wa, na, k, ch)),
                 QuantizedLinear::from_quantized(quantize_w(wb, nb, k, ch)));
    check_concat(QuantizedLinear::from_quantized(quantize_w(wa, na, k, gk)),
                 QuantizedLinear::from_quantized(quantize_w(wb, nb, k, ch)));
  }
  SECTION("mismatches cannot be fused") {
    const QuantizedLinear f = QuantizedLinear::from_f32(wa, na, k);
    const QuantizedLinear f_other_k =
        QuantizedLinear::from_f32(std::vector<float>(wb.begin(), wb.begin() + nb * 64), nb, 64);
    const QuantizedLinear h =
        QuantizedLinear::from_half(to_half_bits(wb, DType::kF16), DType::kF16, nb, k);
    const QuantizedLinear bh =
        QuantizedLinear::from_half(to_half_bits(wb, DType::kBF16), DType::kBF16, nb, k);
    const QuantScheme base{4, QuantMode::kSym, 32, ScaleType::kF16};
    auto qb = [&](QuantScheme s) {
      return QuantizedLinear::from_quantized(quantize_w(wb, nb, k, s));
    };
    const QuantizedLinear qa = QuantizedLinear::from_quantized(quantize_w(wa, na, k, base));
    CHECK_FALSE(QuantizedLinear::can_concat(f, f_other_k));
    CHECK_FALSE(QuantizedLinear::can_concat(f, h));
    CHECK_FALSE(QuantizedLinear::can_concat(h, bh));
    CHECK_FALSE(QuantizedLinear::can_concat(f, qa));
    CHECK_FALSE(QuantizedLinear::can_concat(qa, f));
    CHECK_FALSE(QuantizedLinear::can_concat(qa, qb({8, QuantMode::kSym, 32, ScaleType::kF16})));
    CHECK_FALSE(QuantizedLinear::can_concat(qa, qb({4, QuantMode::kAsym, 32, ScaleType::kF16})));
    CHECK_FALSE(QuantizedLinear::can_concat(qa, qb({4, QuantMode::kSym, 96, ScaleType::kF16})));
    CHECK_FALSE(QuantizedLinear::can_concat(qa, qb({4, QuantMode::kSym, 32, ScaleType::kF32})));
    CHECK(QuantizedLinear::can_concat(qa, qb(base)));
    CHECK_THROWS_WITH(QuantizedLinear::concat_rows(f, h),
                      Catch::Contains("cannot fuse f32 [5, 96] with f16 [3, 96]"));
    CHECK_THROWS_WITH(
        QuantizedLinear::concat_rows(qa, qb({4, QuantMode::kSym, 32, ScaleType::kF32})),
        Catch::Contains("cannot fuse"));
  }
}

TEST_CASE("QuantizedLinear rejects wrong sizes and shapes", "[gemm]") {
  CHECK_THROWS_WITH(QuantizedLinear::from_f32(std::vector<float>(5), 2, 3),
                    Catch::Contains("5 fp32 values do not make a [2, 3] weight"));
  CHECK_THROWS_AS(QuantizedLinear::from_f32({}, 2, 0), Error);
  CHECK_THROWS_WITH(QuantizedLinear::from_half(std::vector<uint16_t>(6), DType::kF32, 2, 3),
                    Catch::Contains("F16 or BF16") && Catch::Contains("F32"));
  CHECK_THROWS_WITH(QuantizedLinear::from_half(std::vector<uint16_t>(7), DType::kBF16, 2, 3),
                    Catch::Contains("7 values do not make a [2, 3] weight"));
  const QuantizedLinear l = QuantizedLinear::from_f32(normal(4 * 6, 3), 4, 6);
  std::vector<float> x(3 * 7, 1.0f), y(3 * 5, 0.0f);
  CHECK_THROWS_WITH(
      l.forward(MatrixView<const float>(x.data(), 3, 7), MatrixView<float>(y.data(), 3, 4)),
      Catch::Contains("[4, 6]") && Catch::Contains("input [3, 7]"));
  CHECK_THROWS_WITH(
      l.forward(MatrixView<const float>(x.data(), 3, 6), MatrixView<float>(y.data(), 2, 4)),
      Catch::Contains("output [2, 4]"));
  CHECK_THROWS_WITH(
      l.forward(MatrixView<const float>(x.data(), 3, 6), MatrixView<float>(y.data(), 3, 5)),
      Catch::Contains("output [3, 5]"));
  CHECK_NOTHROW(
      l.forward(MatrixView<const float>(x.data(), 3, 6), MatrixView<float>(y.data(), 3, 4)));
}

TEST_CASE("forward_rows refuses a scratch prepared for another input", "[gemm]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: no SIMD kernels (the reference path keeps no per-call data)");
    return;
  }
  const int64_t n = 8, k = 64;
  const std::vector<float> w = normal(n * k, 5);
  const QuantizedLinear l = QuantizedLinear::from_quantized(
      quantize(MatrixView<const float>(w.data(), n, k), {4, QuantMode::kSym, 32}), Numerics::kFast);
  REQUIRE(l.numerics() == Numerics::kFast);
  const std::vector<float> x = normal(3 * k, 6);
  std::vector<float> y(static_cast<size_t>(3 * n));
  LinearScratch scratch;
  l.prepare(MatrixView<const float>(x.data(), 2, k), scratch);
  CHECK_THROWS_WITH(l.forward_rows(MatrixView<const float>(x.data(), 3, k), scratch,
                                   MatrixView<float>(y.data(), 3, n), 0, n),
                    Catch::Contains("forward_rows needs the scratch prepare() made for this input "
                                    "(3 x 64), not one for 2 x 64"));
  l.prepare(MatrixView<const float>(x.data(), 3, k), scratch);
  CHECK_NOTHROW(l.forward_rows(MatrixView<const float>(x.data(), 3, k), scratch,
                               MatrixView<float>(y.data(), 3, n), 0, n));
}

TEST_CASE("matmul_nt_f32 and dot_f32 against a double loop", "[gemm]") {
  for (int64_t k : {1, 7, 8, 9, 64, 100, 257}) {
    const int64_t m = 3, n = 11;
    const std::vector<float> x = normal(m * k, uint32_t(k)), w = normal(n * k, uint32_t(k + 1));
    std::vector<float> y(static_cast<size_t>(m * n));
    matmul_nt_f32(MatrixView<const float>(x.data(), m, k), MatrixView<const float>(w.data(), n, k),
                  MatrixView<float>(y.data(), m, n), 2);
    check_forward(y, n, x, std::vector<double>(w.begin(), w.end()), m, n, k);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        REQUIRE(y[r * n + c] == dot_f32(x.data() + r * k, w.data() + c * k, k));
      }
    }
  }
  std::vector<float> a(4), b(4), y(4);
  CHECK_THROWS_AS(
      matmul_nt_f32(MatrixView<const float>(a.data(), 2, 2),
                    MatrixView<const float>(b.data(), 1, 4), MatrixView<float>(y.data(), 2, 1)),
      Error);
}
