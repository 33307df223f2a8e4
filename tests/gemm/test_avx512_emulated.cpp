// The AVX-512 kernels (src/gemm/kernels_avx512.cpp) built over emulated intrinsics (SIMDe, see
// avx512_emulation.hpp), against the scalar oracle on random data: every bit width, mode, layout
// (signed and unsigned levels, paired 4-bit), group of one block, of pairs and per-channel, fp16
// and fp32 scales, 1..4 activation rows with strides, and row ranges that start and end inside a
// matrix (nothing outside them written). Machines with AVX-512 also run the native kernels through
// tests/gemm/test_kernels.cpp.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>

#include "cpu_kernels.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/quant/packing.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace moqe::detail::emu512 {
QuantKernel quant_kernel_avx512(int bits, int mcount, bool signed_levels);
FastKernel fast_kernel_avx512vnni(int bits, int mcount, bool paired);
}  // namespace moqe::detail::emu512

namespace {

using test::randn;

// Rows [kRow0, kRow1) of kRows are computed; the others, and the padding of strided outputs,
// must stay NaN.
constexpr int64_t kRows = 37, kRow0 = 3, kRow1 = kRows - 2;

// The rows outside [kRow0, kRow1) and the stride padding of y [m, ldy] are untouched.
void check_untouched(const std::vector<float>& y, int m, int64_t ldy) {
  for (int i = 0; i < m; ++i) {
    for (int64_t r = 0; r < ldy; ++r) {
      if (r >= kRow0 && r < kRow1) continue;
      REQUIRE(std::isnan(y[static_cast<size_t>(i * ldy + r)]));
    }
  }
}

}  // namespace

TEST_CASE("emulated AVX-512 exact kernels match the scalar oracle", "[gemm][kernels][avx512]") {
  uint32_t seed = 1;
  int checked = 0;
  for (int64_t k : {64, 192, 1024}) {
    for (int bits : kSupportedBits) {
      for (QuantMode mode : kSupportedModes) {
        for (int64_t g : {int64_t{32}, int64_t{64}, int64_t{128}, kPerChannel}) {
          for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
            const QuantScheme s{bits, mode, g, st};
            if (!check_scheme(s, k).empty()) continue;
            const auto wv = randn(static_cast<size_t>(kRows * k), seed++);
            const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), kRows, k), s);
            const detail::PackedQuant unsigned_layout = detail::pack(q);
            REQUIRE(detail::avx512_fits(unsigned_layout));
            detail::PackedQuant signed_layout = unsigned_layout;
            const bool can_sign = detail::can_sign(signed_layout);
            if (can_sign) detail::sign_levels(signed_layout);
            const test::ScopedCpuIsa cap(CpuIsa::kReference);
            const QuantizedLinear ref = QuantizedLinear::from_quantized(q);
            CAPTURE(k, s.to_string());
            for (int layout = 0; layout < (can_sign ? 2 : 1); ++layout) {
              const detail::PackedQuant& w = layout ? signed_layout : unsigned_layout;
              for (int m = 1; m <= 4; ++m) {
                CAPTURE(layout, m);
                // Strided rows: x and y wider than K and N.
                const int64_t ldx = k + 5, ldy = kRows + 3;
                const auto x = randn(static_cast<size_t>(m * ldx), seed++);
                std::vector<float> y(static_cast<size_t>(m * ldy), std::nanf(""));
                std::vector<float> xp;  // the kernels read x in pair order, rows K apart
                detail::pair_order_rows(x.data(), ldx, m, k, xp);
                detail::emu512::quant_kernel_avx512(bits, m, w.signed_levels)(
                    w, xp.data(), k, m, y.data(), ldy, kRow0, kRow1);
                check_untouched(y, m, ldy);
                std::vector<float> xr(static_cast<size_t>(m * k)),
                    yr(static_cast<size_t>(m * kRows));
                for (int i = 0; i < m; ++i) {
                  std::copy_n(x.data() + i * ldx, k, xr.data() + i * k);
                }
                ref.forward(MatrixView<const float>(xr.data(), m, k),
                            MatrixView<float>(yr.data(), m, kRows), 1);
                std::vector<float> wr(static_cast<size_t>(k));
                for (int64_t r = kRow0; r < kRow1; ++r) {
                  ref.decode_row(r, wr.data());
                  for (int i = 0; i < m; ++i) {
                    const float got = y[i * ldy + r];
                    double bound = 0;
                    for (int64_t c = 0; c < k; ++c)
                      bound += std::fabs(double(wr[c]) * xr[i * k + c]);
                    const double tol = 2.0 * double(k + 8) * std::ldexp(1.0, -24) * bound;
                    REQUIRE(std::fabs(double(got) - yr[i * kRows + r]) <= tol);
                  }
                }
                ++checked;
              }
            }
          }
        }
      }
    }
  }
  CHECK(checked > 500);
}

TEST_CASE("emulated AVX-512 VNNI fast kernels match fast mode's definition",
          "[gemm][kernels][avx512]") {
  uint32_t seed = 500;
  int checked = 0;
  for (int64_t k : {64, 192, 1024}) {
    for (int bits : {4, 8}) {
      for (QuantMode mode : kSupportedModes) {
        for (int64_t g : {int64_t{32}, int64_t{64}, kPerChannel}) {
          for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
            const QuantScheme s{bits, mode, g, st};
            if (!check_scheme(s, k).empty()) continue;
            const auto wv = randn(static_cast<size_t>(kRows * k), seed++);
            const QuantizedMatrix q = quantize(MatrixView<const float>(wv.data(), kRows, k), s);
            detail::PackedQuant w = detail::pack(q);
            REQUIRE(detail::avx512_fits(w));
            if (bits == 4) {
              REQUIRE(detail::can_pair(w));
              detail::pair_blocks(w);
            }
            CAPTURE(k, s.to_string());
            // Six activation rows; the kernels take rows m0 .. m0 + m - 1 of them.
            const int64_t rows = 6, ldy = kRows + 2;
            const auto x = randn(static_cast<size_t>(rows * k), seed++);
            detail::QuantizedX xq;
            detail::quantize_activations(x.data(), k, rows, k, w.group, xq);
            for (int m = 1; m <= 4; ++m) {
              const int64_t m0 = rows - m;
              CAPTURE(m, m0);
              std::vector<float> y(static_cast<size_t>(m * ldy), std::nanf(""));
              const detail::FastKernel f = detail::emu512::fast_kernel_avx512vnni(bits, m, true);
              REQUIRE(f != nullptr);
              f(w, xq, m0, m, y.data(), ldy, kRow0, kRow1);
              check_untouched(y, m, ldy);
              for (int i = 0; i < m; ++i) {
                // The definition, in double: int8 activations times the block scale, codes
                // minus the zero point times the group scale.
                const int8_t* qa = xq.q.data() + (m0 + i) * k;
                const float* d = xq.d.data() + (m0 + i) * (k / 32);
                for (int64_t r = kRow0; r < kRow1; ++r) {
                  const float got = y[i * ldy + r];
                  double ref = 0, bound = 0;
                  for (int64_t c = 0; c < k; ++c) {
                    const int64_t grp = c / q.group_size();
                    const int u = static_cast<int>(unpack_code(q.packed_row(r), c, bits));
                    // Quantized activations are stored permuted per block: byte 4i + j holds
                    // column 8j + i.
                    const int64_t b = c / 32, col = c % 32;
                    const int xa = qa[32 * b + 4 * (col % 8) + col / 8];
                    const double sd = double(q.scale(r, grp)) * d[b];
                    ref += sd * (u - q.zero(r, grp)) * xa;
                    bound += std::fabs(sd) * (std::abs(u) + 128 + q.zero(r, grp)) * std::abs(xa);
                  }
                  const double tol = 2.0 * double(k + 8) * std::ldexp(1.0, -24) * bound;
                  REQUIRE(std::fabs(got - ref) <= tol);
                }
              }
              ++checked;
            }
          }
        }
      }
    }
  }
  CHECK(checked > 100);
  // The unpaired 4-bit layout has no VNNI kernel (the layer keeps AVX2's).
  CHECK(detail::emu512::fast_kernel_avx512vnni(4, 1, false) == nullptr);
}
