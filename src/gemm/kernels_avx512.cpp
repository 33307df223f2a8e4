// AVX-512 kernels (this file alone is compiled with -mavx512f -mavx512bw -mavx512vnni and only
// called after runtime detection): exact mode's decode kernels (AVX-512 F + BW) and fast mode's
// integer dot products through VNNI (vpdpbusd). They read the AVX2 kernels' layouts (PackedQuant)
// two blocks at a time: the low eight 32-bit lanes hold block b, the high eight block b + 1, so a
// 512-bit vector covers 64 columns, and rows of an even number of blocks whose groups are one
// block or whole pairs of blocks qualify (avx512_fits); other rows keep the AVX2 kernels. The
// exact kernels take the activations in pair order (pair_order_rows, done once per call by
// QuantizedLinear::prepare). The prefill GEMM and the dense kernels stay AVX2's.
//
// Built a second time for the tests with MOQE_AVX512_EMULATED, into namespace emu512, over
// SIMDe's portable intrinsics (tests/gemm/avx512_emulation.hpp): machines without AVX-512 check
// these kernels against the scalar oracle too.
#if defined(MOQE_AVX512_EMULATED)
#include "avx512_emulation.hpp"
#else
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_kernels.hpp"
#include "kernel_common_avx2.hpp"
#include "kernel_dispatch.hpp"

namespace moqe::detail {
#if defined(MOQE_AVX512_EMULATED)
namespace emu512 {
#endif
namespace {

inline float hsum512(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

// Lanes 0..7 = a, lanes 8..15 = b: a value per block of a pair.
inline __m512 halves(float a, float b) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b));
}
inline __m512i halves(int a, int b) {
  return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(a), _mm512_set1_epi32(b));
}

// The code fields of blocks b and b + 1 (at p, consecutive): c[j] lane i < 8 is column 8j + i of
// block b, lane 8 + i the same column of block b + 1. The signed layout's fields sign-extended
// (levels), the unsigned layout's masked (codes).
template <int B, bool S>
inline void pair_fields(const uint8_t* p, __m512i c[4]) {
  __m512i v;
  if constexpr (B == 8) {
    v = _mm512_loadu_si512(p);
  } else if constexpr (B == 4) {
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v = S ? _mm512_cvtepi16_epi32(r) : _mm512_cvtepu16_epi32(r);
  } else if constexpr (B == 2) {
    const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    v = S ? _mm512_cvtepi8_epi32(r) : _mm512_cvtepu8_epi32(r);
  } else {  // 3 bits: each lane's 12-bit field at bits 0..11 (the AVX2 kernels' shuffle, per block)
    const __m256i b0 =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12)));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
    const __m512i sel =
        _mm512_set_epi8(-1, -1, 11, 10, -1, -1, 10, 9, -1, -1, 8, 7, -1, -1, 7, 6,  //
                        -1, -1, 5, 4, -1, -1, 4, 3, -1, -1, 2, 1, -1, -1, 1, 0,     //
                        -1, -1, 11, 10, -1, -1, 10, 9, -1, -1, 8, 7, -1, -1, 7, 6,  //
                        -1, -1, 5, 4, -1, -1, 4, 3, -1, -1, 2, 1, -1, -1, 1, 0);
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    v = _mm512_srlv_epi32(_mm512_shuffle_epi8(both, sel), shift);
  }
  // Field j of each lane at bits [B j, B j + B) (3 bits: of its 12-bit field).
  if constexpr (S) {
    for (int j = 0; j < 4; ++j) {
      const int up = 32 - B * (j + 1);
      __m512i t = up ? _mm512_slli_epi32(v, static_cast<unsigned>(up)) : v;
      c[j] = _mm512_srai_epi32(t, static_cast<unsigned>(32 - B));
    }
  } else {
    const __m512i m = _mm512_set1_epi32((1 << B) - 1);
    for (int j = 0; j < 4; ++j) {
      const __m512i t = j ? _mm512_srli_epi32(v, static_cast<unsigned>(B * j)) : v;
      c[j] = B * (j + 1) == 32 ? t : _mm512_and_si512(t, m);
    }
  }
}

// Exact mode: levels (code - zero) in fp32, products accumulated in fp32 per group (lanewise),
// the group's scale applied once per group; a pair of groups of one block each keeps one per half.
// x is in pair order (pair_order_rows), rows ldx apart.
template <int B, int M, bool S>
void quant_kernel(const PackedQuant& w, const float* x, int64_t ldx, int /*mcount*/, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int NA = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t k = w.k;
  const float* xp = x;  // in pair order (pair_order_rows)
  const bool g32 = w.group == 32;
  // A unit: one group of whole pairs, or one pair of two one-block groups.
  const int64_t pairs_per_unit = g32 ? 1 : w.group / 64, units = k / (64 * pairs_per_unit);
  const int64_t pair_bytes = 2 * w.block_bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = w.data.data() + n * w.row_bytes;
    const int64_t gi = n * w.groups;
    __m512 total[M];
    for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; ++u) {
      __m512i z;
      __m512 s;
      if (g32) {
        z = halves(w.zero_at(gi + 2 * u), w.zero_at(gi + 2 * u + 1));
        s = halves(scale_at(w, gi + 2 * u), scale_at(w, gi + 2 * u + 1));
      } else {
        z = _mm512_set1_epi32(w.zero_at(gi + u));
        s = _mm512_set1_ps(scale_at(w, gi + u));
      }
      __m512 acc[M][NA];
      for (int m = 0; m < M; ++m) {
        for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
      }
      for (int64_t t = 0; t < pairs_per_unit; ++t, pr += pair_bytes) {
        __m512i c[4];
        pair_fields<B, S>(pr, c);
        const int64_t col = 64 * (u * pairs_per_unit + t);
        for (int j = 0; j < 4; ++j) {
          // The zero point comes off in integers: each lane is the exact level.
          const __m512 d = _mm512_cvtepi32_ps(S ? c[j] : _mm512_sub_epi32(c[j], z));
          for (int m = 0; m < M; ++m) {
            acc[m][j % NA] =
                _mm512_fmadd_ps(d, _mm512_loadu_ps(xp + m * ldx + col + 16 * j), acc[m][j % NA]);
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        __m512 a = acc[m][0];
        for (int t = 1; t < NA; ++t) a = _mm512_add_ps(a, acc[m][t]);
        total[m] = _mm512_fmadd_ps(s, a, total[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum512(total[m]);
  }
}

// Fast mode through VNNI: vpdpbusd sums four u8 x s8 products per 32-bit lane, the same lane sums
// as the AVX2 kernels' maddubs + madd, so every block's integers are the same; the block scale
// (activations) and group scale (weights) follow as in fast_kernel. B = 4: the paired layout
// (blocks b, b + 1 in the low and high nibbles of 32 bytes); B = 8: codes u stored as bytes, taken
// as c = u - 128 (signed) like the AVX2 kernel: dpbusd(x + 128, c) - 128 sum(c) = sum(x c).
template <int B, int M>
void fast_kernel(const PackedQuant& w, const QuantizedX& x, int64_t m0, int /*mcount*/, float* y,
                 int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t blocks = w.k / 32, blocks_per_group = w.group / 32;
  const bool g32 = blocks_per_group == 1;
  const __m512i low4 = _mm512_set1_epi8(0x0f), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const float zshift = B == 8 ? 128.0f : 0.0f;
  const FastRows<M> xr(x, m0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = w.data.data() + n * w.row_bytes;
    const int64_t gi = n * w.groups;
    __m512 total[M], acc[M];
    float corr[M];
    for (int m = 0; m < M; ++m) {
      total[m] = acc[m] = _mm512_setzero_ps();
      corr[m] = 0.0f;
    }
    for (int64_t bi = 0; bi < blocks; bi += 2) {
      __m512i c, start = _mm512_setzero_si512();
      if constexpr (B == 4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr));
        c = _mm512_and_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), low4);
        pr += 32;
      } else {
        c = _mm512_xor_si512(_mm512_loadu_si512(pr), bias);
        start = _mm512_sub_epi32(start, _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, c));
        pr += 64;
      }
      for (int m = 0; m < M; ++m) {
        __m512i q = _mm512_loadu_si512(xr.q[m] + 32 * bi);
        __m512i p;
        if constexpr (B == 4) {
          p = _mm512_dpbusd_epi32(start, c, q);
        } else {
          p = _mm512_dpbusd_epi32(start, _mm512_xor_si512(q, bias), c);
        }
        acc[m] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), halves(xr.d[m][bi], xr.d[m][bi + 1]), acc[m]);
      }
      if (g32) {  // blocks bi and bi + 1 are groups bi and bi + 1
        const float s0 = scale_at(w, gi + bi), s1 = scale_at(w, gi + bi + 1);
        const __m512 s = halves(s0, s1);
        const float off0 = s0 * (static_cast<float>(w.zero_at(gi + bi)) - zshift);
        const float off1 = s1 * (static_cast<float>(w.zero_at(gi + bi + 1)) - zshift);
        for (int m = 0; m < M; ++m) {
          total[m] = _mm512_fmadd_ps(s, acc[m], total[m]);
          corr[m] += off0 * xr.gsum[m][bi];
          corr[m] += off1 * xr.gsum[m][bi + 1];
          acc[m] = _mm512_setzero_ps();
        }
      } else if ((bi + 2) % blocks_per_group == 0) {  // the group's last pair
        const int64_t g = bi / blocks_per_group;
        const float sg = scale_at(w, gi + g);
        const __m512 s = _mm512_set1_ps(sg);
        const float off = sg * (static_cast<float>(w.zero_at(gi + g)) - zshift);
        for (int m = 0; m < M; ++m) {
          total[m] = _mm512_fmadd_ps(s, acc[m], total[m]);
          corr[m] += off * xr.gsum[m][g];
          acc[m] = _mm512_setzero_ps();
        }
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum512(total[m]) - corr[m];
  }
}

}  // namespace

QuantKernel quant_kernel_avx512(int bits, int mcount, bool signed_levels) {
  return by_bits(bits, [&](auto b) {
    return by_rows(mcount, [&](auto m) -> QuantKernel {
      constexpr int B = decltype(b)::value, M = decltype(m)::value;
      return signed_levels ? quant_kernel<B, M, true> : quant_kernel<B, M, false>;
    });
  });
}

FastKernel fast_kernel_avx512vnni(int bits, int mcount, bool paired) {
  if (bits == 4 && !paired) return nullptr;  // the unpaired 4-bit layout: AVX2's kernel
  return by_rows(mcount, [&](auto m) -> FastKernel {
    constexpr int M = decltype(m)::value;
    return bits == 8 ? fast_kernel<8, M> : fast_kernel<4, M>;
  });
}

#if defined(MOQE_AVX512_EMULATED)
}  // namespace emu512
#endif
}  // namespace moqe::detail
