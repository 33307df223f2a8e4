// The SIMD CPU kernels against the scalar oracle (the reference path), on random data: every bit
// width, mode, group size and scale type, K not a multiple of 64, N odd, M from 1 to 9. The
// tolerance follows from fp32 summation of the same products in another order:
// |y - y_ref| <= 2 (K + 8) u sum |w x|, u = 2^-24 (the levels code - z are exact in fp32 and the
// scale is one more rounding per group).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include "cpu_kernels.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/quant/packing.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

using test::randn;

// The SIMD levels this machine runs natively: AVX2, and AVX-512 (F + BW, then VNNI) where present.
// (tests/gemm/test_avx512_emulated.cpp checks the AVX-512 kernels on any machine.)
std::vector<CpuIsa> simd_isas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Vnni}) {
    if (isa <= best_cpu_isa()) out.push_back(isa);
  }
  return out;
}

// Builds the layer under the given cap (the kernel is chosen at construction).
QuantizedLinear build(CpuIsa isa, const QuantizedMatrix& q) {
  const test::ScopedCpuIsa cap(isa);
  return QuantizedLinear::from_quantized(q);
}

// Exact 4-bit layers whose groups are whole pairs of blocks run AVX2's field kernels, which take
// the zero point off through each group's activation sum: the products they sum are x code (code
// = level + z) and the correction z sum(x), so their rounding is bounded against
// sum |s x| (code + z) instead of sum |w x| = sum |s x| |code - z|.
bool zero_via_sums(const QuantizedLinear& l, const QuantizedMatrix& q) {
  return l.isa() == CpuIsa::kAvx2 && l.numerics() == Numerics::kExact && q.scheme().bits == 4 &&
         q.cols() % 64 == 0 && q.group_size() % 64 == 0;
}

void check_close(const QuantizedLinear& fast, const QuantizedLinear& ref, int64_t m_count,
                 uint32_t seed, const QuantizedMatrix* q = nullptr, float x_scale = 1.0f) {
  const int64_t n = ref.out_features(), k = ref.in_features();
  std::vector<float> x = randn(static_cast<size_t>(m_count * k), seed);
  for (float& v : x) v *= x_scale;
  const bool sums = q != nullptr && zero_via_sums(fast, *q);
  std::vector<float> y(static_cast<size_t>(m_count * n), std::nanf("")), yr(y.size());
  fast.forward(MatrixView<const float>(x.data(), m_count, k),
               MatrixView<float>(y.data(), m_count, n), 2);
  ref.forward(MatrixView<const float>(x.data(), m_count, k),
              MatrixView<float>(yr.data(), m_count, n), 1);
  std::vector<float> w(static_cast<size_t>(k));
  for (int64_t r = 0; r < n; ++r) {
    ref.decode_row(r, w.data());
    for (int64_t m = 0; m < m_count; ++m) {
      double bound = 0;
      for (int64_t c = 0; c < k; ++c) {
        double mag = std::fabs(w[c]);
        if (sums) {
          const int64_t g = c / q->group_size();
          mag = std::fabs(q->scale(r, g)) *
                (unpack_code(q->packed_row(r), c, 4) + static_cast<double>(q->zero(r, g)));
        }
        bound += mag * std::fabs(x[m * k + c]);
      }
      const double tol = 2.0 * double(k + 8) * std::ldexp(1.0, -24) * bound;
      REQUIRE(std::fabs(double(y[m * n + r]) - yr[m * n + r]) <= tol);
    }
  }
}

}  // namespace

TEST_CASE("SIMD quantized kernels match the scalar oracle", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  uint32_t seed = 1;
  for (int64_t k : {32, 96, 160, 1024}) {
    for (int bits : kSupportedBits) {
      for (QuantMode mode : kSupportedModes) {
        for (int64_t g : {int64_t{32}, int64_t{64}, kPerChannel}) {
          for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
            const QuantScheme s{bits, mode, g, st};
            if (!check_scheme(s, k).empty()) continue;
            const int64_t n = 37;  // odd
            const auto wv = randn(static_cast<size_t>(n * k), seed++);
            const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), n, k), s);
            const QuantizedLinear ref = build(CpuIsa::kReference, q);
            REQUIRE(ref.isa() == CpuIsa::kReference);
            for (CpuIsa isa : simd_isas()) {
              const QuantizedLinear fast = build(isa, q);
              // AVX-512 kernels take rows of whole pairs of blocks (K % 64 == 0) whose groups
              // are one block or whole pairs; other rows keep AVX2's.
              const bool pairs = k % 64 == 0 && (q.group_size() == 32 || q.group_size() % 64 == 0);
              REQUIRE(fast.isa() ==
                      (isa >= CpuIsa::kAvx512 && pairs ? CpuIsa::kAvx512 : CpuIsa::kAvx2));
              CAPTURE(k, s.to_string(), to_string(isa));
              // The repacked layout (signed levels for sym 2/3/4/8 bits) decodes to the
              // reference.
              CHECK(fast.to_f32() == dequantize(q));
              // 17 and 64 rows: the tiled GEMM of exact mode (kGemmMinRows; row counts with
              // and without a remainder of its three-row tiles, N not a multiple of its
              // four-row blocks, K in chunks of whole groups or one per-channel row).
              for (int64_t m : {1, 2, 3, 4, 5, 9, 17, 64}) check_close(fast, ref, m, seed++, &q);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("SIMD kernels: row blocks, tiled GEMM chunks and odd group sizes", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  struct Shape {
    int64_t n, k, group;
    int bits;
    QuantMode mode;
  };
  // N = 300 on two threads: ranges of 150 rows, several L2 row blocks of 16+ rows at K = 4096
  // (5..11 rows: the four-row kernels over row blocks). Groups of 96 (K = 960: chunks of 480), a
  // group of 1024 beyond the 512-column chunk (K = 2048), per-channel K = 1056 (not a multiple of
  // 512), with 12..14 and 40 rows: the tiled GEMM's tails in M (3-row tiles), N (4-row blocks) and
  // its chunking. Rows longer than the decode kernels' column chunk (128 / M blocks: K > 4096 at
  // one activation row, > 1024 at four) are walked in chunks that end inside groups (K = 4128,
  // groups of 96; groups of 128 and 1024 and per-channel rows at 3 and 4 rows).
  const Shape shapes[] = {
      {300, 4096, 128, 8, QuantMode::kSym},
      {40, 4128, 96, 4, QuantMode::kAsym},
      {37, 960, 96, 4, QuantMode::kSym},
      {37, 960, 96, 3, QuantMode::kAsym},
      {21, 2048, 1024, 4, QuantMode::kSymFull},
      {19, 1056, kPerChannel, 2, QuantMode::kSym},
      // 4-bit field kernels (exact, groups of whole pairs of blocks) over row blocks and chunks.
      {300, 4096, 128, 4, QuantMode::kSym},
      {40, 4096, 64, 4, QuantMode::kAsym},
      {24, 2048, kPerChannel, 4, QuantMode::kSym}};
  uint32_t seed = 500;
  for (const Shape& sh : shapes) {
    const QuantScheme s{sh.bits, sh.mode, sh.group};
    REQUIRE(check_scheme(s, sh.k).empty());
    const auto wv = randn(static_cast<size_t>(sh.n * sh.k), seed++);
    const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), sh.n, sh.k), s);
    const QuantizedLinear fast = build(CpuIsa::kAvx2, q), ref = build(CpuIsa::kReference, q);
    CAPTURE(sh.n, sh.k, s.to_string());
    CHECK(fast.to_f32() == dequantize(q));
    for (int64_t m : {1, 2, 5, 7, 11, 12, 13, 14, 40}) check_close(fast, ref, m, seed++, &q);
  }
  // Strided x and y (as the MoE layer's grouped pass hands them over) give the same results as
  // dense ones, on the four-row kernels and on the tiled GEMM.
  {
    const int64_t n = 37, k = 960;
    const auto wv = randn(static_cast<size_t>(n * k), 91);
    const QuantizedMatrix q =
        quantize(MatrixView<const float>(wv.data(), n, k), {4, QuantMode::kSym, 96});
    const QuantizedLinear l = build(CpuIsa::kAvx2, q);
    for (int64_t m : {3, 13}) {
      const auto x = randn(static_cast<size_t>(m * k), 92);
      std::vector<float> xs(static_cast<size_t>(m * (k + 8)), std::nanf(""));
      for (int64_t r = 0; r < m; ++r) {
        std::copy_n(x.begin() + r * k, k, xs.begin() + r * (k + 8));
      }
      std::vector<float> y(static_cast<size_t>(m * n)), ys(static_cast<size_t>(m * (n + 5)), -7.0f);
      l.forward(MatrixView<const float>(x.data(), m, k), MatrixView<float>(y.data(), m, n), 2);
      l.forward(MatrixView<const float>(xs.data(), m, k, k + 8),
                MatrixView<float>(ys.data(), m, n, n + 5), 2);
      int differ = 0, touched = 0;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < n + 5; ++c) {
          const float v = ys[static_cast<size_t>(r * (n + 5) + c)];
          if (c < n) {
            differ += v != y[static_cast<size_t>(r * n + c)];
          } else {
            touched += v != -7.0f;
          }
        }
      }
      CAPTURE(m);
      CHECK(differ == 0);
      CHECK(touched == 0);
    }
  }
  // Dense weights through the tiled GEMM with a two-row tail (14 = 3 * 4 + 2).
  const auto wd = randn(static_cast<size_t>(23 * 512), 77);
  const auto make = [&](CpuIsa isa) {
    const test::ScopedCpuIsa cap(isa);
    return QuantizedLinear::from_f32(wd, 23, 512);
  };
  const QuantizedLinear df = make(CpuIsa::kAvx2), dr = make(CpuIsa::kReference);
  for (int64_t m : {14, 15}) check_close(df, dr, m, seed++);
}

TEST_CASE("4-bit field kernels: tiny, infinite and NaN activations", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  const int64_t n = 37, k = 1024;
  uint32_t seed = 900;
  for (QuantMode mode : {QuantMode::kSym, QuantMode::kAsym}) {
    const QuantScheme s{4, mode, 128};
    const auto wv = randn(static_cast<size_t>(n * k), seed++);
    const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), n, k), s);
    const QuantizedLinear fast = build(CpuIsa::kAvx2, q), ref = build(CpuIsa::kReference, q);
    CAPTURE(s.to_string());
    // Activations of ~1e-37 would lose their bits scaled by 2^-12 for some fields: the call
    // takes the unscaled kernels (exact levels) and matches the reference as closely as ever.
    for (int64_t m : {1, 3, 6}) check_close(fast, ref, m, seed++, &q, 1e-37f);
    // An infinity gives what the reference gives (+-inf by the weight's sign, NaN where it is 0);
    // a NaN gives NaN everywhere. Group sums would turn every infinity into NaN.
    std::vector<float> w(static_cast<size_t>(k));
    for (float bad : {std::numeric_limits<float>::infinity(), std::nanf("")}) {
      std::vector<float> x = randn(static_cast<size_t>(2 * k), seed++);
      x[static_cast<size_t>(k + 77)] = bad;  // row 1 only: row 0 stays finite in the same call
      std::vector<float> y(static_cast<size_t>(2 * n)), yr(y.size());
      fast.forward(MatrixView<const float>(x.data(), 2, k), MatrixView<float>(y.data(), 2, n), 1);
      ref.forward(MatrixView<const float>(x.data(), 2, k), MatrixView<float>(yr.data(), 2, n), 1);
      for (int64_t r = 0; r < n; ++r) {
        ref.decode_row(r, w.data());
        CAPTURE(bad, r, w[77]);
        CHECK(std::isfinite(y[static_cast<size_t>(r)]));
        const float v = y[static_cast<size_t>(n + r)], vr = yr[static_cast<size_t>(n + r)];
        if (std::isnan(bad) || w[77] == 0.0f) {
          CHECK(std::isnan(v));
          CHECK(std::isnan(vr));
        } else {
          CHECK(v == vr);
          CHECK(std::isinf(v));
        }
      }
    }
  }
}

TEST_CASE("decode kernels at one activation row: two weight rows per pass", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  // One activation row: weight rows go in pairs (one from each half of the range) sharing each
  // activation load, the last one of an odd range alone, in the same order: a row's result must
  // not depend on the split. 4-bit field kernels (K >= 8192: activations beyond L1) and the
  // other widths' kernels.
  struct Case {
    int bits;
    int64_t n, k, group;
    QuantMode mode;
    ScaleType st;
  };
  const Case cases[] = {{4, 37, 8192, 128, QuantMode::kSym, ScaleType::kF16},
                        {4, 21, 8192, 64, QuantMode::kAsym, ScaleType::kF16},
                        {4, 19, 8256, kPerChannel, QuantMode::kSym, ScaleType::kF32},
                        {4, 18, 8448, 256, QuantMode::kAsym, ScaleType::kF32},
                        {3, 37, 1024, 64, QuantMode::kAsym, ScaleType::kF16},
                        {8, 21, 4096, kPerChannel, QuantMode::kSym, ScaleType::kF16},
                        {4, 23, 2048, 32, QuantMode::kSym, ScaleType::kF32}};
  uint32_t seed = 950;
  for (const Case& c : cases) {
    const QuantScheme s{c.bits, c.mode, c.group, c.st};
    REQUIRE(check_scheme(s, c.k).empty());
    const auto wv = randn(static_cast<size_t>(c.n * c.k), seed++);
    const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), c.n, c.k), s);
    const QuantizedLinear fast = build(CpuIsa::kAvx2, q), ref = build(CpuIsa::kReference, q);
    CAPTURE(c.n, c.k, s.to_string());
    CHECK(zero_via_sums(fast, q) == (c.bits == 4 && c.group != 32));
    for (int64_t m : {1, 2, 5}) check_close(fast, ref, m, seed++, &q);
    // The same rows paired differently (ranges starting at 0 and at 1) give the same bits.
    const std::vector<float> x = randn(static_cast<size_t>(c.k), seed++);
    const MatrixView<const float> xv(x.data(), 1, c.k);
    LinearScratch scratch;
    fast.prepare(xv, scratch);
    std::vector<float> ya(static_cast<size_t>(c.n)), yb(ya.size());
    fast.forward_rows(xv, scratch, MatrixView<float>(ya.data(), 1, c.n), 0, c.n);
    fast.forward_rows(xv, scratch, MatrixView<float>(yb.data(), 1, c.n), 0, 1);
    fast.forward_rows(xv, scratch, MatrixView<float>(yb.data(), 1, c.n), 1, c.n);
    CHECK(ya == yb);
  }
  // Fast mode's paired 4-bit kernel pairs rows the same way (groups of one block and longer).
  for (int64_t g : {int64_t{32}, int64_t{128}}) {
    const int64_t n = 29, k = 2048;
    const auto wv = randn(static_cast<size_t>(n * k), seed++);
    const QuantizedMatrix q =
        quantize(MatrixView<const float>(wv.data(), n, k), QuantScheme{4, QuantMode::kSym, g});
    const test::ScopedCpuIsa cap(CpuIsa::kAvx2);
    const QuantizedLinear fast = QuantizedLinear::from_quantized(q, Numerics::kFast);
    REQUIRE(fast.numerics() == Numerics::kFast);
    const std::vector<float> x = randn(static_cast<size_t>(k), seed++);
    const MatrixView<const float> xv(x.data(), 1, k);
    LinearScratch scratch;
    fast.prepare(xv, scratch);
    std::vector<float> ya(static_cast<size_t>(n)), yb(ya.size());
    fast.forward_rows(xv, scratch, MatrixView<float>(ya.data(), 1, n), 0, n);
    fast.forward_rows(xv, scratch, MatrixView<float>(yb.data(), 1, n), 0, 1);
    fast.forward_rows(xv, scratch, MatrixView<float>(yb.data(), 1, n), 1, n);
    CAPTURE(g);
    CHECK(ya == yb);
  }
}

TEST_CASE("SIMD dense kernels (f32, f16, bf16) match the scalar oracle", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  for (int64_t k : {1, 7, 33, 100, 1024, 1400}) {
    const int64_t n = 19;
    const auto wv = randn(static_cast<size_t>(n * k), static_cast<uint32_t>(k));
    std::vector<uint16_t> h(wv.size()), b(wv.size());
    for (size_t i = 0; i < wv.size(); ++i) {
      h[i] = float_to_half_bits(wv[i]);
      b[i] = float_to_bf16_bits(wv[i]);
    }
    for (int variant = 0; variant < 3; ++variant) {
      auto make = [&](CpuIsa isa) {
        const test::ScopedCpuIsa cap(isa);
        return variant == 0   ? QuantizedLinear::from_f32(wv, n, k)
               : variant == 1 ? QuantizedLinear::from_half(h, DType::kF16, n, k)
                              : QuantizedLinear::from_half(b, DType::kBF16, n, k);
      };
      const QuantizedLinear fast = make(CpuIsa::kAvx2), ref = make(CpuIsa::kReference);
      REQUIRE(fast.isa() == CpuIsa::kAvx2);
      CAPTURE(k, variant);
      // 13 and 40 rows: the tiled GEMM where K is a multiple of 8 (1024; 1400 in chunks of
      // 512, 512 and 376), else the four-row kernels.
      for (int64_t m : {1, 2, 4, 6, 13, 40}) check_close(fast, ref, m, static_cast<uint32_t>(m));
    }
  }
}

TEST_CASE("rows the SIMD layout cannot hold keep the reference kernel", "[gemm][kernels]") {
  // Per-channel rows of 100 weights are not whole 32-blocks.
  const auto wv = randn(5 * 100, 3);
  const QuantizedMatrix q =
      quantize(MatrixView<const float>(wv.data(), 5, 100), {4, QuantMode::kSym, 0});
  CHECK(QuantizedLinear::from_quantized(q).isa() == CpuIsa::kReference);
  CHECK(parse_cpu_isa("avx2") == CpuIsa::kAvx2);
  for (CpuIsa isa : {CpuIsa::kReference, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Vnni}) {
    CHECK(parse_cpu_isa(to_string(isa)) == isa);
  }
  CHECK_FALSE(parse_cpu_isa("sse9").has_value());
  const test::ScopedCpuIsa cap(CpuIsa::kReference);
  CHECK(active_cpu_isa() == CpuIsa::kReference);
}

TEST_CASE("without a cap, each kernel family runs the level measured fastest", "[gemm][kernels]") {
  // AVX-512's decode kernels measured slower than AVX2's at one row (docs/kernels.md): by default
  // a layer on an AVX-512 machine runs AVX2's; an explicit cap of avx512 / avx512vnni runs them.
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    SUCCEED("no AVX2: the reference kernels are the only level");
    return;
  }
  const auto wv = randn(64 * 256, 5);
  const QuantizedMatrix q =
      quantize(MatrixView<const float>(wv.data(), 64, 256), {4, QuantMode::kSym, 128});
  {
    const test::ScopedCpuIsa none(std::nullopt);
    CHECK(active_cpu_isa() == best_cpu_isa());
    CHECK(QuantizedLinear::from_quantized(q).isa() == CpuIsa::kAvx2);
    CHECK(QuantizedLinear::from_quantized(q, Numerics::kFast).isa() == CpuIsa::kAvx2);
  }
  if (best_cpu_isa() >= CpuIsa::kAvx512) {
    const test::ScopedCpuIsa cap(CpuIsa::kAvx512);
    CHECK(QuantizedLinear::from_quantized(q).isa() == CpuIsa::kAvx512);
  }
  if (best_cpu_isa() >= CpuIsa::kAvx512Vnni) {
    const test::ScopedCpuIsa cap(CpuIsa::kAvx512Vnni);
    CHECK(QuantizedLinear::from_quantized(q, Numerics::kFast).isa() == CpuIsa::kAvx512Vnni);
  }
}

TEST_CASE("fast mode matches its scalar definition and stays near exact mode", "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  uint32_t seed = 100;
  for (int64_t k : {32, 96, 1024}) {
    for (int bits : {4, 8}) {
      for (QuantMode mode : kSupportedModes) {
        for (int64_t g : {int64_t{32}, int64_t{64}, kPerChannel}) {
          const QuantScheme s{bits, mode, g};
          if (!check_scheme(s, k).empty()) continue;
          const int64_t n = 21;
          const auto wv = randn(static_cast<size_t>(n * k), seed++);
          const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), n, k), s);
          for (CpuIsa isa : simd_isas()) {
            const test::ScopedCpuIsa cap(isa);
            const QuantizedLinear fast = QuantizedLinear::from_quantized(q, Numerics::kFast);
            const QuantizedLinear exact = QuantizedLinear::from_quantized(q);
            REQUIRE(fast.numerics() == Numerics::kFast);
            REQUIRE(exact.numerics() == Numerics::kExact);
            CAPTURE(k, s.to_string(), to_string(isa), to_string(fast.isa()));
            // VNNI kernels: rows of whole pairs of blocks, groups of one block or whole pairs.
            const bool pairs = k % 64 == 0 && (q.group_size() == 32 || q.group_size() % 64 == 0);
            REQUIRE(fast.isa() ==
                    (isa >= CpuIsa::kAvx512Vnni && pairs ? CpuIsa::kAvx512Vnni : CpuIsa::kAvx2));
            for (int64_t m_count : {1, 3, 6}) {
              const auto x = randn(static_cast<size_t>(m_count * k), seed++);
              std::vector<float> y(static_cast<size_t>(m_count * n)), ye(y.size());
              fast.forward(MatrixView<const float>(x.data(), m_count, k),
                           MatrixView<float>(y.data(), m_count, n), 2);
              exact.forward(MatrixView<const float>(x.data(), m_count, k),
                            MatrixView<float>(ye.data(), m_count, n), 2);
              double err2 = 0, ref2 = 0;
              for (int64_t m = 0; m < m_count; ++m) {
                // The definition: x quantized per 32-block to int8 (round to nearest even, scale
                // max|x| / 127), integer products with the codes, block and group scales applied.
                std::vector<int> xq(static_cast<size_t>(k));
                std::vector<double> d(static_cast<size_t>(k / 32));
                for (int64_t b = 0; b < k / 32; ++b) {
                  float amax = 0;
                  for (int i = 0; i < 32; ++i)
                    amax = std::max(amax, std::fabs(x[m * k + 32 * b + i]));
                  const float db = amax / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
                  d[b] = db;
                  for (int i = 0; i < 32; ++i) {
                    xq[32 * b + i] = static_cast<int>(std::lrintf(x[m * k + 32 * b + i] * inv));
                  }
                }
                for (int64_t r = 0; r < n; ++r) {
                  double ref = 0, bound = 0;
                  for (int64_t c = 0; c < k; ++c) {
                    const int64_t grp = c / q.group_size();
                    const int u = static_cast<int>(unpack_code(q.packed_row(r), c, bits));
                    const double sd = double(q.scale(r, grp)) * d[c / 32];
                    ref += sd * (u - q.zero(r, grp)) * xq[c];
                    bound += std::fabs(sd) * (std::abs(u) + 128 + q.zero(r, grp)) * std::abs(xq[c]);
                  }
                  const double tol = 2.0 * double(k + 8) * std::ldexp(1.0, -24) * bound;
                  REQUIRE(std::fabs(y[m * n + r] - ref) <= tol);
                  err2 += (double(y[m * n + r]) - ye[m * n + r]) *
                          (double(y[m * n + r]) - ye[m * n + r]);
                  ref2 += double(ye[m * n + r]) * ye[m * n + r];
                }
              }
              // Against exact mode: int8 activations carry about 1/254 relative rounding per value.
              CHECK(std::sqrt(err2 / ref2) < 0.02);
            }
          }
        }
      }
    }
  }
  // Fast mode's paired 4-bit layout (rows of an even number of blocks) decodes to the reference,
  // fuses only with layers of the same layout, and a fused layer computes each part's rows.
  // Groups of one block (pairs span two groups, fp16 scales) and of three blocks (groups end in
  // the middle of a pair, fp32 scales).
  for (const auto& [k, s] :
       {std::pair<int64_t, QuantScheme>{320, {4, QuantMode::kAsym, 32}},
        std::pair<int64_t, QuantScheme>{192, {4, QuantMode::kSym, 96, ScaleType::kF32}}}) {
    const int64_t n = 13;
    const auto wa = randn(static_cast<size_t>(n * k), 7), wb = randn(static_cast<size_t>(n * k), 8);
    const QuantizedMatrix qa = quantize(MatrixView<const float>(wa.data(), n, k), s);
    const QuantizedMatrix qb = quantize(MatrixView<const float>(wb.data(), n, k), s);
    const test::ScopedCpuIsa cap(CpuIsa::kAvx2);
    const QuantizedLinear fa = QuantizedLinear::from_quantized(qa, Numerics::kFast);
    const QuantizedLinear fb = QuantizedLinear::from_quantized(qb, Numerics::kFast);
    const QuantizedLinear ea = QuantizedLinear::from_quantized(qa);
    CHECK(fa.to_f32() == dequantize(qa));
    CHECK(fa.weight_bytes() == ea.weight_bytes());
    CHECK_FALSE(QuantizedLinear::can_concat(fa, ea));
    REQUIRE(QuantizedLinear::can_concat(fa, fb));
    const QuantizedLinear fab = QuantizedLinear::concat_rows(fa, fb);
    CHECK(fab.numerics() == Numerics::kFast);
    const auto x = randn(static_cast<size_t>(3 * k), 9);
    std::vector<float> y(static_cast<size_t>(3 * 2 * n)), ya(static_cast<size_t>(3 * n)),
        yb(ya.size());
    fab.forward(MatrixView<const float>(x.data(), 3, k), MatrixView<float>(y.data(), 3, 2 * n), 2);
    fa.forward(MatrixView<const float>(x.data(), 3, k), MatrixView<float>(ya.data(), 3, n), 2);
    fb.forward(MatrixView<const float>(x.data(), 3, k), MatrixView<float>(yb.data(), 3, n), 2);
    int differ = 0;
    for (int64_t m = 0; m < 3; ++m) {
      for (int64_t r = 0; r < n; ++r) {
        differ += y[static_cast<size_t>(m * 2 * n + r)] != ya[static_cast<size_t>(m * n + r)];
        differ += y[static_cast<size_t>(m * 2 * n + n + r)] != yb[static_cast<size_t>(m * n + r)];
      }
    }
    CHECK(differ == 0);
  }
  // Layers of different numerics never fuse, even where their layouts coincide (8-bit asym).
  {
    const auto w8 = randn(8 * 64, 11);
    const QuantizedMatrix q8 =
        quantize(MatrixView<const float>(w8.data(), 8, 64), {8, QuantMode::kAsym, 32});
    const test::ScopedCpuIsa cap(CpuIsa::kAvx2);
    CHECK_FALSE(QuantizedLinear::can_concat(QuantizedLinear::from_quantized(q8, Numerics::kFast),
                                            QuantizedLinear::from_quantized(q8)));
  }
  // Widths fast mode does not cover run exact.
  const auto wv = randn(4 * 64, 1);
  const QuantizedMatrix q3 =
      quantize(MatrixView<const float>(wv.data(), 4, 64), {3, QuantMode::kSym, 32});
  CHECK(QuantizedLinear::from_quantized(q3, Numerics::kFast).numerics() == Numerics::kExact);
}

#if defined(MOQE_HAVE_AVX2_KERNELS)
TEST_CASE("fast mode's activation quantization: AVX2 equals the scalar loop bit for bit",
          "[gemm][kernels]") {
  if (best_cpu_isa() < CpuIsa::kAvx2) {
    WARN("SKIPPED: this CPU has no AVX2 kernels");
    return;
  }
  for (const auto& [m, k, group] : {std::tuple<int64_t, int64_t, int64_t>{1, 32, 32},
                                    {3, 96, 32},
                                    {2, 256, 128},
                                    {5, 4096, 4096}}) {
    const int64_t ldx = k + 3;
    std::vector<float> x = randn(static_cast<size_t>(m * ldx), static_cast<uint32_t>(k + m));
    // Values at the rounding ties and extremes: halves (ties to even), a zero block, a block of
    // one sign, tiny and huge magnitudes.
    for (int i = 0; i < 32 && i < k; ++i) x[static_cast<size_t>(i)] = 0.0f;
    if (k >= 64) {
      for (int i = 32; i < 64; ++i) x[static_cast<size_t>(i)] = 127.0f * (i % 5) / 4.0f + 0.5f;
    }
    if (k >= 96) {
      for (int i = 64; i < 96; ++i) x[static_cast<size_t>(i)] = (i % 2 ? 1e-30f : -3e30f) * i;
    }
    detail::QuantizedX a, b;
    detail::quantize_activations(x.data(), ldx, m, k, group, a);
    detail::quantize_activations_avx2(x.data(), ldx, m, k, group, b);
    CAPTURE(m, k, group);
    CHECK(a.m == b.m);
    CHECK(a.k == b.k);
    CHECK(a.groups == b.groups);
    CHECK(a.q == b.q);
    CHECK(a.d == b.d);
    CHECK(a.gsum == b.gsum);
  }
}
#endif

TEST_CASE("act-order matrices: the kernels read x in the stored column order", "[gemm][kernels]") {
  // A matrix stored with its columns in `order` (GPTQ desc_act) equals, bit for bit, the plain
  // stored matrix applied to x gathered in that order, at every level and row count.
  const int64_t n = 40, k = 256;
  std::mt19937 rng(11);
  std::vector<int32_t> order(k);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (const QuantScheme s :
       {QuantScheme{4, QuantMode::kSym, 64}, QuantScheme{3, QuantMode::kAsym, 32},
        QuantScheme{8, QuantMode::kSym, kPerChannel}}) {
    CAPTURE(s.to_string());
    const auto wv = randn(static_cast<size_t>(n * k), 21);
    const QuantizedMatrix stored = quantize(MatrixView<const float>(wv.data(), n, k), s);
    QuantizedMatrix ordered = stored;
    ordered.set_input_order(order, "ordered");
    // Dequantized in the input's order.
    const std::vector<float> ws = dequantize(stored), wo = dequantize(ordered);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < k; ++c) {
        REQUIRE(wo[r * k + order[c]] == ws[r * k + c]);
        REQUIRE(ordered.at(r, order[c]) == ws[r * k + c]);
      }
    }
    std::vector<CpuIsa> levels = simd_isas();
    levels.push_back(CpuIsa::kReference);
    for (const CpuIsa isa : levels) {
      for (const Numerics nm : {Numerics::kExact, Numerics::kFast}) {
        const test::ScopedCpuIsa cap(isa);
        const QuantizedLinear lo = QuantizedLinear::from_quantized(ordered, nm);
        const QuantizedLinear ls = QuantizedLinear::from_quantized(stored, nm);
        for (const int64_t m : {int64_t{1}, int64_t{3}, int64_t{13}}) {
          CAPTURE(to_string(isa), m, int(nm));
          const auto x = randn(static_cast<size_t>(m * k), 31);
          std::vector<float> xg(x.size()), yo(static_cast<size_t>(m * n)), yg(yo.size());
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t c = 0; c < k; ++c) xg[i * k + c] = x[i * k + order[c]];
          }
          lo.forward(MatrixView<const float>(x.data(), m, k), MatrixView<float>(yo.data(), m, n));
          ls.forward(MatrixView<const float>(xg.data(), m, k), MatrixView<float>(yg.data(), m, n));
          if (isa == CpuIsa::kReference) {
            // The reference decodes rows in the input's order: the same products, reordered.
            for (size_t i = 0; i < yo.size(); ++i) {
              REQUIRE(yo[i] == Approx(yg[i]).margin(1e-4).epsilon(1e-5));
            }
          } else {
            REQUIRE(yo == yg);
          }
          std::vector<float> row(k);
          lo.decode_row(5, row.data());
          for (int64_t c = 0; c < k; ++c) REQUIRE(row[order[c]] == ws[5 * k + c]);
        }
      }
    }
    // Stacking needs the same order on both sides.
    CHECK_THROWS_WITH(QuantizedMatrix::concat_rows(ordered, stored, "gu"),
                      Catch::Contains("different input orders"));
    CHECK(QuantizedMatrix::concat_rows(ordered, ordered, "gu").input_order().size() == k);
  }
  std::vector<int32_t> bad(k, 0);
  QuantizedMatrix q =
      quantize(MatrixView<const float>(randn(k * 2, 1).data(), 2, k), {4, QuantMode::kSym, 32});
  CHECK_THROWS_WITH(q.set_input_order(bad, "w"), Catch::Contains("not a permutation"));
}
