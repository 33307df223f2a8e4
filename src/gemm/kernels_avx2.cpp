// AVX2 + FMA + F16C kernels (this file alone is compiled with -mavx2 -mfma -mf16c and only
// called after runtime detection). Exact mode: codes minus the zero point become fp32 levels in
// registers, products are accumulated in fp32 per group, and the group's scale is applied once
// per group.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_kernels.hpp"
#include "kernel_common_avx2.hpp"
#include "kernel_dispatch.hpp"

namespace moqe::detail {
namespace {

// The four code vectors of a 32-code block (see PackedQuant): c[j] lane i = column 8j + i.
template <int B>
inline void extract(const uint8_t* p, __m256i c[4]) {
  if constexpr (B == 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi32(0xff);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi32(v, 8), m);
    c[2] = _mm256_and_si256(_mm256_srli_epi32(v, 16), m);
    c[3] = _mm256_srli_epi32(v, 24);
  } else if constexpr (B == 4) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i m = _mm256_set1_epi32(0xf);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi32(v, 4), m);
    c[2] = _mm256_and_si256(_mm256_srli_epi32(v, 8), m);
    c[3] = _mm256_srli_epi32(v, 12);
  } else if constexpr (B == 2) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i m = _mm256_set1_epi32(0x3);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi32(v, 2), m);
    c[2] = _mm256_and_si256(_mm256_srli_epi32(v, 4), m);
    c[3] = _mm256_srli_epi32(v, 6);
  } else {  // 3 bits: lane i is the 12-bit field at bit 12 i, i.e. bytes 3i/2 and 3i/2 + 1
    const __m256i v16 =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sel = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,  //
                                         6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    const __m256i v =
        _mm256_srlv_epi32(_mm256_shuffle_epi8(v16, sel), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    const __m256i m = _mm256_set1_epi32(0x7);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi32(v, 3), m);
    c[2] = _mm256_and_si256(_mm256_srli_epi32(v, 6), m);
    c[3] = _mm256_and_si256(_mm256_srli_epi32(v, 9), m);
  }
}

// The four level vectors of a 32-code block of the signed layout (2-, 3-, 4- and 8-bit codes stored
// as two's complement levels): sign extension of each field, no mask and no subtraction.
template <int B>
inline void extract_signed(const uint8_t* p, __m256i c[4]) {
  if constexpr (B == 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    c[0] = _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24);
    c[1] = _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24);
    c[2] = _mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24);
    c[3] = _mm256_srai_epi32(v, 24);
  } else if constexpr (B == 4) {  // each lane's 16-bit field, sign-extended to 32 bits
    const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    c[0] = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28);
    c[1] = _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28);
    c[2] = _mm256_srai_epi32(_mm256_slli_epi32(v, 20), 28);
    c[3] = _mm256_srai_epi32(v, 12);
  } else if constexpr (B == 3) {  // lane i's 12-bit field at bits 0..11 (see extract)
    const __m256i v16 =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i sel = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,  //
                                         6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    const __m256i v =
        _mm256_srlv_epi32(_mm256_shuffle_epi8(v16, sel), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    c[0] = _mm256_srai_epi32(_mm256_slli_epi32(v, 29), 29);
    c[1] = _mm256_srai_epi32(_mm256_slli_epi32(v, 26), 29);
    c[2] = _mm256_srai_epi32(_mm256_slli_epi32(v, 23), 29);
    c[3] = _mm256_srai_epi32(_mm256_slli_epi32(v, 20), 29);
  } else {
    static_assert(B == 2, "signed levels: 2-, 3-, 4- or 8-bit codes");
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    c[0] = _mm256_srai_epi32(_mm256_slli_epi32(v, 30), 30);
    c[1] = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 30);
    c[2] = _mm256_srai_epi32(_mm256_slli_epi32(v, 26), 30);
    c[3] = _mm256_srai_epi32(v, 6);
  }
}

// The levels (code - zero) of a block as fp32 vectors, from either layout.
template <int B, bool S>
inline void block_levels(const uint8_t* p, __m256i z, __m256 d[4]) {
  __m256i c[4];
  if constexpr (S) {
    extract_signed<B>(p, c);
    for (int j = 0; j < 4; ++j) d[j] = _mm256_cvtepi32_ps(c[j]);
  } else {
    extract<B>(p, c);
    for (int j = 0; j < 4; ++j) d[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(c[j], z));
  }
}

// Groups [g0, g1) of weight row n against M activation rows, added to total: per group, the
// products in NA chains per activation row, then the group's scale once.
template <int B, int M, bool S>
inline void quant_row_groups(const PackedQuant& w, const float* x, int64_t ldx, int64_t n,
                             int64_t g0, int64_t g1, __m256 (&total)[M]) {
  // One accumulator chain per m is FMA-latency bound for small M: split the block's four code
  // vectors over NA accumulators.
  constexpr int NA = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t blocks_per_group = w.group / 32, gi = n * w.groups;
  const uint8_t* blk = w.data.data() + n * w.row_bytes + g0 * blocks_per_group * w.block_bytes;
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m) {
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    }
    // The zero point comes off in integers, so each d is the exact level (code - z): the
    // products are those of the dequantized weight without the scale, no cancellation.
    const __m256i z = _mm256_set1_epi32(w.zero_at(gi + g));
    const int64_t k0 = g * w.group;
    for (int64_t b = 0; b < blocks_per_group; ++b, blk += w.block_bytes) {
      __m256 d[4];
      block_levels<B, S>(blk, z, d);
      const int64_t kb = k0 + 32 * b;
      for (int j = 0; j < 4; ++j) {
        for (int m = 0; m < M; ++m) {
          acc[m][j % NA] =
              _mm256_fmadd_ps(d[j], _mm256_loadu_ps(x + m * ldx + kb + 8 * j), acc[m][j % NA]);
        }
      }
    }
    const __m256 s = _mm256_set1_ps(scale_at(w, gi + g));
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int t = 1; t < NA; ++t) a = _mm256_add_ps(a, acc[m][t]);
      total[m] = _mm256_fmadd_ps(s, a, total[m]);
    }
  }
}

// Weight rows [n0, n1) against M activation rows: row_groups(n, g0, g1, total) adds groups
// [g0, g1) of row n to its totals, y[m * ldy + n] gets their sum. (At one activation row the
// decode kernels take rows in pairs instead: quant_rows_pair, field_rows_pair.)
template <int M, class RowGroups>
void walk_rows(const PackedQuant& w, float* y, int64_t ldy, int64_t n0, int64_t n1,
               const RowGroups& row_groups) {
  // Activations beyond ~16 KiB (K > 4096 at one row, > 1024 at four) come from L2 for every
  // weight row. When the caller hands over an L2-sized block of rows (forward_rows does for more
  // than four activation rows, so that W is read from memory once), the rows go in blocks of
  // kRows, each walked in chunks of whole groups whose activations stay in L1, every row's totals
  // kept between chunks: the same operations in the same order per row. Streaming W from memory
  // (larger ranges), walking 16 rows side by side measured slower than the L2 reads (4096x14336
  // int4 g128, batch 1: 2.2 -> 2.8 ms; 2.5 ms with 4 rows), so those ranges are walked row by
  // row. Groups longer than a chunk (per-channel rows) are not split.
  constexpr int64_t kChunkBlocks = 128 / M, kRows = 16, kL2Bytes = 512 << 10;
  const int64_t chunk_groups = std::max<int64_t>(1, kChunkBlocks / (w.group / 32));
  if (w.groups <= chunk_groups || (n1 - n0) * w.row_bytes > kL2Bytes) {
    for (int64_t n = n0; n < n1; ++n) {
      __m256 total[M];
      for (int m = 0; m < M; ++m) total[m] = _mm256_setzero_ps();
      row_groups(n, int64_t{0}, w.groups, total);
      for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(total[m]);
    }
    return;
  }
  __m256 totals[kRows][M];
  for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
    const int64_t rows = std::min(kRows, n1 - r0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int m = 0; m < M; ++m) totals[r][m] = _mm256_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < w.groups; g0 += chunk_groups) {
      const int64_t g1 = std::min(w.groups, g0 + chunk_groups);
      for (int64_t r = 0; r < rows; ++r) row_groups(r0 + r, g0, g1, totals[r]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int m = 0; m < M; ++m) y[m * ldy + r0 + r] = hsum(totals[r][m]);
    }
  }
}

// At one activation row the decode kernels take weight rows [n0, n1) in pairs, row i with row
// i + half (one from each half: each activation load serves both rows, the second row's work
// hides the first's per-group reduction, and each half of W is still read as one stream; adjacent
// rows side by side ran ~30% slower cold at K = 4096), the last row of an odd range alone:
// rows(Int<R>{}, n, dn) runs rows n and n + dn (R = 2) or n (R = 1).
template <class Rows>
inline void in_row_pairs(int64_t n0, int64_t n1, const Rows& rows) {
  const int64_t half = (n1 - n0) / 2;
  for (int64_t i = 0; i < half; ++i) rows(Int<2>{}, n0 + i, half);
  if (n0 + 2 * half < n1) rows(Int<1>{}, n1 - 1, int64_t{1});
}

// One activation row against R = 1 or 2 weight rows (n and n + dn), whole rows, each activation
// vector loaded once for both; two accumulators per weight row, in the same order whether the row
// is paired or not.
template <int B, bool S, int R>
inline void quant_rows_pair(const PackedQuant& w, const float* x, int64_t n, int64_t dn, float* y) {
  const int64_t blocks_per_group = w.group / 32;
  const uint8_t* blk[R];
  __m256 total[R];
  for (int r = 0; r < R; ++r) {
    blk[r] = w.data.data() + (n + r * dn) * w.row_bytes;
    total[r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[R][2];
    __m256i z[R];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      z[r] = _mm256_set1_epi32(w.zero_at((n + r * dn) * w.groups + g));
    }
    const int64_t k0 = g * w.group;
    for (int64_t b = 0; b < blocks_per_group; ++b) {
      __m256 d[R][4];
      for (int r = 0; r < R; ++r) {
        block_levels<B, S>(blk[r], z[r], d[r]);
        blk[r] += w.block_bytes;
      }
      const int64_t kb = k0 + 32 * b;
      for (int j = 0; j < 4; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + kb + 8 * j);
        for (int r = 0; r < R; ++r) acc[r][j % 2] = _mm256_fmadd_ps(d[r][j], xv, acc[r][j % 2]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(scale_at(w, (n + r * dn) * w.groups + g));
      total[r] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[r][0], acc[r][1]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[n + r * dn] = hsum(total[r]);
}

template <int B, int M, bool S>
void quant_kernel(const PackedQuant& w, const float* x, int64_t ldx, int /*mcount*/, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  if constexpr (M == 1) {
    in_row_pairs(n0, n1, [&](auto r, int64_t n, int64_t dn) {
      quant_rows_pair<B, S, decltype(r)::value>(w, x, n, dn, y);
    });
  } else {
    walk_rows<M>(w, y, ldy, n0, n1, [&](int64_t n, int64_t g0, int64_t g1, __m256(&total)[M]) {
      quant_row_groups<B, M, S>(w, x, ldx, n, g0, g1, total);
    });
  }
}

// Group scale i of w, for scales known to be fp16 (Scales = 16) or fp32 (32), or either (0).
template <int Scales>
inline float group_scale(const PackedQuant& w, int64_t i) {
  if constexpr (Scales == 16) return _cvtsh_ss(w.scale16[static_cast<size_t>(i)]);
  if constexpr (Scales == 32) return w.scale32[static_cast<size_t>(i)];
  return scale_at(w, i);
}

// Field f (0..7) of a pair's eight 32-bit lanes (see PackedQuant). Scaled: masked in place, the
// code times 2^e (fields 4..6 masked in v16 = v >> 16, so four masks serve all fields: seven left
// too few registers, the compiler rebuilt two masks every group); otherwise shifted down to the
// code.
template <bool Scaled>
inline __m256i field_bits(__m256i v, __m256i v16, int f) {
  if constexpr (Scaled) {
    return f < 4   ? _mm256_and_si256(v, _mm256_set1_epi32(0xf << (4 * f)))
           : f < 7 ? _mm256_and_si256(v16, _mm256_set1_epi32(0xf << (4 * (f - 4))))
                   : _mm256_srli_epi32(v, 28);
  }
  const __m256i c = f == 0 ? v : _mm256_srli_epi32(v, 4 * f);
  return f < 7 ? _mm256_and_si256(c, _mm256_set1_epi32(0xf)) : c;
}

// Exact mode, 4-bit codes in the paired layout (see PackedQuant): per 64 weights one 32-byte load
// and one shift, then per field one AND (the top field: one shift), one convert and M FMAs.
// Scaled: x is in field order and scaled by 2^-e (field_order_rows_avx2), the field's value is
// code x 2^e, so each product is exactly x times the code; the group's sum less z x (its activation
// sum), times its scale, goes into the total. Otherwise (x not scaled) each field is shifted down
// and its zero point subtracted in integers: exact levels, as quant_row_groups. Scales: 16 or 32
// (fp16 or fp32 scales), 0 (either: scale_at). PPG: pairs of blocks per group, 0 for any (the
// common groups of 64 and 128 columns unrolled: 15% faster at g128).
template <int M, bool Scaled, bool ConstZero, int Scales, int PPG>
inline void field_row_groups(const PackedQuant& w, const float* const (&xs)[M],
                             const float* const (&gcorr)[M], int64_t n, int64_t g0, int64_t g1,
                             __m256 (&total)[M]) {
  constexpr int NA = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t pairs_per_group = PPG > 0 ? PPG : w.group / 64, gi = n * w.groups;
  const uint8_t* pair = w.data.data() + n * w.row_bytes + g0 * pairs_per_group * 32;
  for (int64_t g = g0; g < g1; ++g) {
    // Scaled: acc[m][0] starts with -z x sum(x) in lane 0 (gcorr), the zero point's share; the
    // total's lanes are summed at the end.
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m) {
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
      if constexpr (Scaled) {
        const float corr =
            ConstZero ? gcorr[m][g] : gcorr[m][g] * static_cast<float>(w.zero[gi + g]);
        acc[m][0] = _mm256_zextps128_ps256(_mm_set_ss(corr));
      }
    }
    const __m256i zv = _mm256_set1_epi32(w.zero_at(gi + g));
    const int64_t k0 = g * w.group;
    for (int64_t q = 0; q < pairs_per_group; ++q, pair += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));
      const __m256i v16 = Scaled ? _mm256_srli_epi32(v, 16) : v;
      const int64_t kq = k0 + 64 * q;
      for (int f = 0; f < 8; ++f) {
        const __m256i c = field_bits<Scaled>(v, v16, f);
        const __m256 d = _mm256_cvtepi32_ps(Scaled ? c : _mm256_sub_epi32(c, zv));
        for (int m = 0; m < M; ++m) {
          acc[m][f % NA] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xs[m] + kq + 8 * f), acc[m][f % NA]);
        }
      }
    }
    const float sg = group_scale<Scales>(w, gi + g);
    const __m256 s = _mm256_set1_ps(sg);
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int t = 1; t < NA; ++t) a = _mm256_add_ps(a, acc[m][t]);
      total[m] = _mm256_fmadd_ps(s, a, total[m]);
    }
  }
}

// One activation row against R = 1 or 2 weight rows (n and n + dn), whole rows, each activation
// vector loaded once for both. Scaled x only; two accumulators per weight row, in the same order
// whether the row is paired or not, so a row's result does not depend on how the rows were split.
template <int R, bool ConstZero, int Scales, int PPG>
inline void field_rows_pair(const PackedQuant& w, const float* xs, const float* gcorr, int64_t n,
                            int64_t dn, float* y) {
  const int64_t pairs_per_group = PPG > 0 ? PPG : w.group / 64;
  const uint8_t* pair[R];
  __m256 total[R];
  for (int r = 0; r < R; ++r) {
    pair[r] = w.data.data() + (n + r * dn) * w.row_bytes;
    total[r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
      const int64_t gi = (n + r * dn) * w.groups + g;
      const float corr = ConstZero ? gcorr[g] : gcorr[g] * static_cast<float>(w.zero[gi]);
      acc[r][0] = _mm256_zextps128_ps256(_mm_set_ss(corr));
      acc[r][1] = _mm256_setzero_ps();
    }
    const int64_t k0 = g * w.group;
    for (int64_t q = 0; q < pairs_per_group; ++q) {
      __m256i v[R], v16[R];
      for (int r = 0; r < R; ++r) {
        v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair[r]));
        v16[r] = _mm256_srli_epi32(v[r], 16);
        pair[r] += 32;
      }
      const int64_t kq = k0 + 64 * q;
      for (int f = 0; f < 8; ++f) {
        const __m256 xv = _mm256_loadu_ps(xs + kq + 8 * f);
        for (int r = 0; r < R; ++r) {
          const __m256i c = field_bits<true>(v[r], v16[r], f);
          acc[r][f % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), xv, acc[r][f % 2]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t gi = (n + r * dn) * w.groups + g;
      const float sg = group_scale<Scales>(w, gi);
      total[r] = _mm256_fmadd_ps(_mm256_set1_ps(sg), _mm256_add_ps(acc[r][0], acc[r][1]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[n + r * dn] = hsum(total[r]);
}

template <int M>
void field_kernel(const PackedQuant& w, const LinearScratch& x, int64_t m0, int /*mcount*/,
                  float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const float* xs[M];
  const float* gsum[M];
  for (int m = 0; m < M; ++m) {
    xs[m] = x.xp.data() + (m0 + m) * x.k;
    gsum[m] = x.gsum.data() + (m0 + m) * x.groups;
  }
  auto run = [&]<bool Scaled, bool ConstZero, int Scales, int PPG>() {
    if constexpr (M == 1 && Scaled) {
      in_row_pairs(n0, n1, [&](auto r, int64_t n, int64_t dn) {
        field_rows_pair<decltype(r)::value, ConstZero, Scales, PPG>(w, xs[0], gsum[0], n, dn, y);
      });
    } else {
      walk_rows<M>(w, y, ldy, n0, n1, [&](int64_t n, int64_t g0, int64_t g1, __m256(&total)[M]) {
        field_row_groups<M, Scaled, ConstZero, Scales, PPG>(w, xs, gsum, n, g0, g1, total);
      });
    }
  };
  if (!x.xp_scaled) return run.template operator()<false, false, 0, 0>();
  by_flag(w.zero.empty(), [&](auto const_zero) {
    constexpr bool cz = decltype(const_zero)::value;
    if (!w.f16_scales) return run.template operator()<true, cz, 32, 0>();
    switch (w.group) {
      case 64:
        return run.template operator()<true, cz, 16, 1>();
      case 128:
        return run.template operator()<true, cz, 16, 2>();
      default:
        return run.template operator()<true, cz, 16, 0>();
    }
  });
}

// Many activation rows: a register-tiled GEMM. For each block of four weight rows and each chunk
// of K (512 columns, or one group when groups are longer), the rows' weights are decoded once
// into an L1-resident buffer: for quantized weights their dequantized values ((code - zero) x
// scale, rounded once, the reference's decode), for dense ones the fp32 values. Every three
// activation rows then run a 3 x 4 tile of accumulators over it (12 FMAs per 7 loads; twelve
// independent chains cover the FMA latency) and add the tile's partial sums into the outputs'
// running totals (in memory, one vector per output) once per chunk. Results are the reference's
// dequantized weights times x, summed in another order. (Scaling levels once per group instead, the
// decode kernels' way, flushed the tile every group: at batch 64, groups of 32 ran 1.6x and groups
// of 128 1.17x slower.)
constexpr int kGemmRows = 4;  // weight rows per block
constexpr int64_t kGemmChunk = 512;

template <int MR>
inline void gemm_tile(const float* x, int64_t ldx, const float* lev, int64_t lev_stride, int64_t k0,
                      int64_t k1, __m256 (&part)[MR][kGemmRows]) {
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < kGemmRows; ++j) part[i][j] = _mm256_setzero_ps();
  }
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < kGemmRows; ++j) {
      const __m256 wv = _mm256_load_ps(lev + j * lev_stride + k - k0);
      for (int i = 0; i < MR; ++i) part[i][j] = _mm256_fmadd_ps(xv[i], wv, part[i][j]);
    }
  }
}

// decode(row, c0, c1, dst): weight row `row` over columns [c0, c1) into dst (32-byte aligned), as
// the fp32 values it multiplies x with. k and chunk are multiples of 8 (chunk: columns per decode).
template <class Decode>
void tiled_gemm(const Decode& decode, int64_t k, int64_t chunk, const float* x, int64_t ldx,
                int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  // Grown once per thread: weights [4][chunk] (32-byte aligned rows) and totals [m][4].
  struct alignas(32) Vec8 {
    float v[8];
  };
  thread_local std::vector<Vec8> lev_store, totals_store;
  if (lev_store.size() < static_cast<size_t>(kGemmRows * chunk / 8)) {
    lev_store.resize(static_cast<size_t>(kGemmRows * chunk / 8));
  }
  if (totals_store.size() < static_cast<size_t>(m * kGemmRows)) {
    totals_store.resize(static_cast<size_t>(m * kGemmRows));
  }
  float* lev = lev_store.data()->v;
  float* totals = totals_store.data()->v;  // [m][4] vectors of 8
  for (int64_t nb = n0; nb < n1; nb += kGemmRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, n1 - nb));
    for (int64_t i = 0; i < m * kGemmRows; ++i)
      _mm256_store_ps(totals + 8 * i, _mm256_setzero_ps());
    for (int64_t c0 = 0; c0 < k; c0 += chunk) {
      const int64_t c1 = std::min(k, c0 + chunk);
      // The block's rows over [c0, c1); missing rows (the last block) are zeros.
      for (int j = 0; j < kGemmRows; ++j) {
        float* dst = lev + j * chunk;
        if (j < rows) {
          decode(nb + j, c0, c1, dst);
        } else {
          for (int64_t c = 0; c < c1 - c0; c += 8) _mm256_store_ps(dst + c, _mm256_setzero_ps());
        }
      }
      // The chunk, for every three activation rows; its partial sums into the totals.
      auto flush = [&]<int MR>(int64_t i0, const __m256(&part)[MR][kGemmRows]) {
        for (int i = 0; i < MR; ++i) {
          for (int j = 0; j < kGemmRows; ++j) {
            float* t = totals + 8 * ((i0 + i) * kGemmRows + j);
            _mm256_store_ps(t, _mm256_add_ps(part[i][j], _mm256_load_ps(t)));
          }
        }
      };
      int64_t i0 = 0;
      for (; i0 + 3 <= m; i0 += 3) {
        __m256 part[3][kGemmRows];
        gemm_tile<3>(x + i0 * ldx, ldx, lev, chunk, c0, c1, part);
        flush(i0, part);
      }
      if (m - i0 == 2) {
        __m256 part[2][kGemmRows];
        gemm_tile<2>(x + i0 * ldx, ldx, lev, chunk, c0, c1, part);
        flush(i0, part);
      } else if (m - i0 == 1) {
        __m256 part[1][kGemmRows];
        gemm_tile<1>(x + i0 * ldx, ldx, lev, chunk, c0, c1, part);
        flush(i0, part);
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int j = 0; j < rows; ++j) {
        y[i * ldy + nb + j] = hsum(_mm256_load_ps(totals + 8 * (i * kGemmRows + j)));
      }
    }
  }
}

template <int B, bool S, bool Paired>
void quant_gemm_kernel(const PackedQuant& w, const float* x, int64_t ldx, int64_t m, float* y,
                       int64_t ldy, int64_t n0, int64_t n1) {
  // The decoded tile holds the dequantized weights, (code - zero) x scale in fp32 exactly as the
  // reference decodes them (the level is exact; one rounding), so the tile runs like dense fp32
  // weights: whole chunks of K between flushes instead of one flush per group (for groups of 32
  // columns the flushes cost more than the FMAs). One multiply per weight per decode, shared by
  // all activation rows.
  auto decode = [&](int64_t row, int64_t c0, int64_t c1, float* dst) {
    if constexpr (Paired) {  // 4-bit fields (see PackedQuant); chunks are whole pairs of blocks
      const uint8_t* pair = w.data.data() + row * w.row_bytes + (c0 / 64) * 32;
      for (int64_t c = c0; c < c1; c += 64, pair += 32) {
        const int64_t gi = row * w.groups + c / w.group;
        const __m256i z = _mm256_set1_epi32(w.zero_at(gi));
        const __m256 s = _mm256_set1_ps(scale_at(w, gi));
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));
        for (int f = 0; f < 8; ++f) {
          const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(field_bits<false>(v, v, f), z));
          _mm256_store_ps(dst + (c - c0) + 8 * (f / 2) + 32 * (f % 2), _mm256_mul_ps(d, s));
        }
      }
      return;
    }
    const uint8_t* blk = w.data.data() + row * w.row_bytes + (c0 / 32) * w.block_bytes;
    for (int64_t c = c0; c < c1; c += 32, blk += w.block_bytes) {
      const int64_t gi = row * w.groups + c / w.group;
      const __m256i z = _mm256_set1_epi32(w.zero_at(gi));
      const __m256 s = _mm256_set1_ps(scale_at(w, gi));
      __m256 d[4];
      block_levels<B, S>(blk, z, d);
      for (int q = 0; q < 4; ++q) _mm256_store_ps(dst + (c - c0) + 8 * q, _mm256_mul_ps(d[q], s));
    }
  };
  // Chunks of 512 columns, or of one group when groups are longer (per-channel rows measured
  // ~10% faster at batch 64 with one flush per row than with one per 512 columns).
  tiled_gemm(decode, w.k, std::max(w.group, kGemmChunk), x, ldx, m, y, ldy, n0, n1);
}

template <DenseKind D>
inline __m256 load_w(const void* w, int64_t i) {
  if constexpr (D == DenseKind::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (D == DenseKind::kF16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
  } else {  // bf16: the high half of an fp32
    const __m256i v = _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}

template <DenseKind D>
inline float load_w1(const void* w, int64_t i) {
  if constexpr (D == DenseKind::kF32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (D == DenseKind::kF16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(w)[i]);
  } else {
    const uint32_t b = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[i]) << 16;
    float f;
    __builtin_memcpy(&f, &b, 4);
    return f;
  }
}

template <DenseKind D, int M>
void dense_kernel(const void* w, int64_t k, const float* x, int64_t ldx, int /*mcount*/, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int NA = M == 1 ? 4 : (M == 2 ? 2 : 1);
  constexpr size_t es = D == DenseKind::kF32 ? 4 : 2;
  const int64_t k32 = k - k % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const void* row = static_cast<const uint8_t*>(w) + static_cast<size_t>(n * k) * es;
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m) {
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < k32; i += 32) {
      for (int j = 0; j < 4; ++j) {
        const __m256 d = load_w<D>(row, i + 8 * j);
        for (int m = 0; m < M; ++m) {
          acc[m][j % NA] =
              _mm256_fmadd_ps(d, _mm256_loadu_ps(x + m * ldx + i + 8 * j), acc[m][j % NA]);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int t = 1; t < NA; ++t) a = _mm256_add_ps(a, acc[m][t]);
      float s = hsum(a);
      for (int64_t i = k32; i < k; ++i) s += load_w1<D>(row, i) * x[m * ldx + i];
      y[m * ldy + n] = s;
    }
  }
}

template <DenseKind D>
void dense_gemm_kernel(const void* w, int64_t k, const float* x, int64_t ldx, int64_t m, float* y,
                       int64_t ldy, int64_t n0, int64_t n1) {
  constexpr size_t es = D == DenseKind::kF32 ? 4 : 2;
  auto decode = [&](int64_t row, int64_t c0, int64_t c1, float* dst) {
    const void* r = static_cast<const uint8_t*>(w) + static_cast<size_t>(row * k) * es;
    for (int64_t c = c0; c < c1; c += 8) _mm256_store_ps(dst + (c - c0), load_w<D>(r, c));
  };
  tiled_gemm(decode, k, kGemmChunk, x, ldx, m, y, ldy, n0, n1);
}

// The 32 codes of a block as bytes, in the block's lane order (lane i's codes j = 0..3 at bytes
// 4i + j); 8-bit codes come out as u - 128 (signed), 4-bit as u (0..15).
template <int B>
inline __m256i code_bytes(const uint8_t* p) {
  if constexpr (B == 8) {
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                            _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {  // the lane fields are consecutive nibbles: expand each byte to (low, high)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
  }
}

// Groups of one block: the block's activation scale and the group's scale are one product, so
// each block's integers go straight into the totals (one FMA), alternating between two totals per
// row to halve the dependency chain. The products are those of fast mode's definition,
// (s_g d_b) sum(c x), accumulated in another order. (Computing the scalars eight blocks at a time
// in vectors measured ~6% slower.)
template <int B, int M>
void fast_kernel_g32(const PackedQuant& w, const QuantizedX& x, int64_t m0, float* y, int64_t ldy,
                     int64_t n0, int64_t n1) {
  const int64_t blocks = w.k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const float zshift = B == 8 ? 128.0f : 0.0f;
  const FastRows<M> xr(x, m0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* blk = w.data.data() + n * w.row_bytes;
    const int64_t gi = n * w.groups;
    __m256 total[M][2];
    float corr[M];
    for (int m = 0; m < M; ++m) {
      total[m][0] = total[m][1] = _mm256_setzero_ps();
      corr[m] = 0.0f;
    }
    for (int64_t b = 0; b < blocks; ++b, blk += w.block_bytes) {
      const __m256i c = code_bytes<B>(blk);
      const __m256i ca = B == 8 ? _mm256_abs_epi8(c) : c;
      const float sg = scale_at(w, gi + b);
      const float off = sg * (static_cast<float>(w.zero_at(gi + b)) - zshift);
      for (int m = 0; m < M; ++m) {
        __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q[m] + 32 * b));
        if constexpr (B == 8) q = _mm256_sign_epi8(q, c);
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ca, q), ones);
        total[m][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xr.d[m][b] * sg),
                                          total[m][b & 1]);
        corr[m] += off * xr.gsum[m][b];
      }
    }
    for (int m = 0; m < M; ++m) {
      y[m * ldy + n] = hsum(_mm256_add_ps(total[m][0], total[m][1])) - corr[m];
    }
  }
}

template <int B, int M>
void fast_kernel(const PackedQuant& w, const QuantizedX& x, int64_t m0, int /*mcount*/, float* y,
                 int64_t ldy, int64_t n0, int64_t n1) {
  if (w.group == 32) return fast_kernel_g32<B, M>(w, x, m0, y, ldy, n0, n1);
  const int64_t blocks_per_group = w.group / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  // 8-bit codes are stored u - 128: the zero point is z - 128 for them.
  const float zshift = B == 8 ? 128.0f : 0.0f;
  const FastRows<M> xr(x, m0);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* blk = w.data.data() + n * w.row_bytes;
    const int64_t gi = n * w.groups;
    __m256 total[M];
    float corr[M];
    for (int m = 0; m < M; ++m) {
      total[m] = _mm256_setzero_ps();
      corr[m] = 0.0f;
    }
    for (int64_t g = 0; g < w.groups; ++g) {
      __m256 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks_per_group; ++b, blk += w.block_bytes) {
        const int64_t bi = g * blocks_per_group + b;
        const __m256i c = code_bytes<B>(blk);
        const __m256i ca = B == 8 ? _mm256_abs_epi8(c) : c;
        for (int m = 0; m < M; ++m) {
          __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q[m] + 32 * bi));
          if constexpr (B == 8) q = _mm256_sign_epi8(q, c);  // |c| * sign(c) q = c q
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ca, q), ones);
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xr.d[m][bi]), acc[m]);
        }
      }
      const float sg = scale_at(w, gi + g);
      const __m256 s = _mm256_set1_ps(sg);
      const float off = sg * (static_cast<float>(w.zero_at(gi + g)) - zshift);
      for (int m = 0; m < M; ++m) {
        total[m] = _mm256_fmadd_ps(s, acc[m], total[m]);
        corr[m] += off * xr.gsum[m][g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(total[m]) - corr[m];
  }
}

// Fast mode over the paired 4-bit layout: per 64 codes one 32-byte load, one shift and two masks
// (the unpaired kernel spends seven operations per 32). The same operations in the same order per
// block as fast_kernel, so results are identical. R = 2 runs weight rows n and n + dn side by
// side (one activation row: pairs from the two halves of the range, as the exact kernels), each
// row with its own totals in the same order, so pairing changes no result either.
template <int M, bool G32, int R>
inline void fast_pair_rows(const PackedQuant& w, const FastRows<M>& xr, int64_t n, int64_t dn,
                           float* y, int64_t ldy) {
  const int64_t blocks_per_group = w.group / 32, blocks = w.k / 32;
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0f);
  const uint8_t* pr[R];
  int64_t gi[R];
  // Groups of one block (G32): two alternating totals, as fast_kernel_g32; otherwise one total
  // and the group's partial sums in acc.
  __m256 total[R][M][2], acc[R][M];
  float corr[R][M];
  for (int r = 0; r < R; ++r) {
    pr[r] = w.data.data() + (n + r * dn) * w.row_bytes;
    gi[r] = (n + r * dn) * w.groups;
    for (int m = 0; m < M; ++m) {
      total[r][m][0] = total[r][m][1] = acc[r][m] = _mm256_setzero_ps();
      corr[r][m] = 0.0f;
    }
  }
  int64_t g = 0, group_end = blocks_per_group;
  // Block bi of row r: G32 straight into the totals; otherwise into acc, and at a group's last
  // block the group into the total.
  auto block = [&](int r, int64_t bi, __m256i c) {
    if constexpr (G32) {
      const float sg = scale_at(w, gi[r] + bi);
      const float off = sg * static_cast<float>(w.zero_at(gi[r] + bi));
      for (int m = 0; m < M; ++m) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q[m] + 32 * bi));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), ones);
        total[r][m][bi & 1] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(p), _mm256_set1_ps(xr.d[m][bi] * sg), total[r][m][bi & 1]);
        corr[r][m] += off * xr.gsum[m][bi];
      }
      return;
    }
    for (int m = 0; m < M; ++m) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.q[m] + 32 * bi));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), ones);
      acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xr.d[m][bi]), acc[r][m]);
    }
    if (bi + 1 == group_end) {
      const float sg = scale_at(w, gi[r] + g);
      const __m256 s = _mm256_set1_ps(sg);
      const float off = sg * static_cast<float>(w.zero_at(gi[r] + g));
      for (int m = 0; m < M; ++m) {
        total[r][m][0] = _mm256_fmadd_ps(s, acc[r][m], total[r][m][0]);
        corr[r][m] += off * xr.gsum[m][g];
        acc[r][m] = _mm256_setzero_ps();
      }
    }
  };
  auto next_group = [&](int64_t bi) {
    if (!G32 && bi + 1 == group_end) {
      ++g;
      group_end += blocks_per_group;
    }
  };
  for (int64_t bi = 0; bi < blocks; bi += 2) {
    __m256i v[R];
    for (int r = 0; r < R; ++r) {
      v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr[r]));
      pr[r] += 32;
    }
    for (int r = 0; r < R; ++r) block(r, bi, _mm256_and_si256(v[r], mask));
    next_group(bi);
    for (int r = 0; r < R; ++r)
      block(r, bi + 1, _mm256_and_si256(_mm256_srli_epi16(v[r], 4), mask));
    next_group(bi + 1);
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      const __m256 t = G32 ? _mm256_add_ps(total[r][m][0], total[r][m][1]) : total[r][m][0];
      y[m * ldy + n + r * dn] = hsum(t) - corr[r][m];
    }
  }
}

template <int M, bool G32>
void fast_pair_kernel_impl(const PackedQuant& w, const QuantizedX& x, int64_t m0, float* y,
                           int64_t ldy, int64_t n0, int64_t n1) {
  const FastRows<M> xr(x, m0);
  if constexpr (M == 1) {
    in_row_pairs(n0, n1, [&](auto r, int64_t n, int64_t dn) {
      fast_pair_rows<M, G32, decltype(r)::value>(w, xr, n, dn, y, ldy);
    });
  } else {
    for (int64_t n = n0; n < n1; ++n) fast_pair_rows<M, G32, 1>(w, xr, n, 1, y, ldy);
  }
}

template <int M>
void fast_pair_kernel(const PackedQuant& w, const QuantizedX& x, int64_t m0, int /*mcount*/,
                      float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (w.group == 32) return fast_pair_kernel_impl<M, true>(w, x, m0, y, ldy, n0, n1);
  fast_pair_kernel_impl<M, false>(w, x, m0, y, ldy, n0, n1);
}

// quantize_activations (pack.cpp) in vectors, with the same results bit for bit: the same max,
// scale and reciprocal per block (scalar), x * inv rounded to nearest even by vcvtps2dq (lrintf
// under the default rounding mode), the same integer sums, and the group sums by the same
// function (add_group_sums, compiled without FMA).
}  // namespace

void quantize_activations_avx2(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                               QuantizedX& out) {
  size_quantized_x(out, m, k, group);
  const int64_t blocks = k / 32, per_group = group / 32;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i byte = _mm256_set1_epi32(0xff);
  constexpr int64_t kChunk = 64;  // blocks whose integer sums wait for add_group_sums
  int32_t sums[kChunk];
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xr + 32 * b + 8 * j);
      __m256 mx = _mm256_max_ps(
          _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
          _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vinv));
      // Lane i of q[j] is column 8j + i; byte 4i + j of the block gets it.
      const __m256i packed =
          _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(q[0], byte),
                                          _mm256_slli_epi32(_mm256_and_si256(q[1], byte), 8)),
                          _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(q[2], byte), 16),
                                          _mm256_slli_epi32(q[3], 24)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + r * k + 32 * b), packed);
      const __m256i s4 =
          _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i si = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
      si = _mm_add_epi32(si, _mm_shuffle_epi32(si, 0x4e));
      si = _mm_add_epi32(si, _mm_shuffle_epi32(si, 0xb1));
      out.d[static_cast<size_t>(r * blocks + b)] = d;
      sums[b % kChunk] = _mm_cvtsi128_si32(si);
      if (b % kChunk == kChunk - 1 || b + 1 == blocks) {
        add_group_sums(out.d.data() + r * blocks, sums, b - b % kChunk, b + 1, per_group,
                       out.gsum.data() + r * out.groups);
      }
    }
  }
}

FastKernel fast_kernel_avx2(int bits, int mcount, bool paired) {
  return by_rows(mcount, [&](auto m) -> FastKernel {
    constexpr int M = decltype(m)::value;
    if (paired) return fast_pair_kernel<M>;
    return bits == 8 ? fast_kernel<8, M> : fast_kernel<4, M>;
  });
}

QuantGemmKernel quant_gemm_kernel_avx2(int bits, bool signed_levels, bool paired) {
  if (paired) return quant_gemm_kernel<4, false, true>;
  return by_bits(bits, [&](auto b) {
    return by_flag(signed_levels, [](auto s) -> QuantGemmKernel {
      return quant_gemm_kernel<decltype(b)::value, decltype(s)::value, false>;
    });
  });
}

FieldKernel field_kernel_avx2(int mcount) {
  return by_rows(mcount, [](auto m) -> FieldKernel { return field_kernel<decltype(m)::value>; });
}

void field_order_rows_avx2(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                           int zero_factor, LinearScratch& out) {
  size_field_x(out, m, k, group);
  // Scaling by 2^-e (at least 2^-12) is exact for zero and for |x| >= 2^-114; a smaller value, an
  // infinity or a NaN (whose group sum could not take the zero point off) sends the call to the
  // unscaled kernels: the rows are then written again unscaled (rare; one pass otherwise).
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 tiny = _mm256_set1_ps(0x1p-114f), huge = _mm256_set1_ps(3.40282347e38f);
  // 2^-e per field (see PackedQuant).
  constexpr float kFieldScale[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 1.0f, 0x1p-4f, 0x1p-8f, 1.0f};
  const int64_t pairs_per_group = group / 64;
  // Writes the rows scaled or not; true when scaling kept every value exact.
  auto fill = [&](bool scaled) {
    __m256 odd = _mm256_setzero_ps();
    for (int64_t r = 0; r < m; ++r) {
      const float* src = x + r * ldx;
      float* dst = out.xp.data() + r * k;
      float* gsum = out.gsum.data() + r * out.groups;
      for (int64_t g = 0; g < out.groups; ++g) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t q = 0; q < pairs_per_group; ++q) {
          const int64_t c = g * group + 64 * q;
          for (int f = 0; f < 8; ++f) {
            const __m256 v = _mm256_loadu_ps(src + c + 8 * (f / 2) + 32 * (f % 2));
            const __m256 a = _mm256_and_ps(v, abs_mask);
            odd = _mm256_or_ps(odd,
                               _mm256_and_ps(_mm256_cmp_ps(a, tiny, _CMP_LT_OQ),
                                             _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_OQ)));
            odd = _mm256_or_ps(odd, _mm256_cmp_ps(a, huge, _CMP_NLE_UQ));
            sum = _mm256_add_ps(sum, v);
            const float scale = scaled ? kFieldScale[f] : 1.0f;
            _mm256_storeu_ps(dst + c + 8 * f, _mm256_mul_ps(v, _mm256_set1_ps(scale)));
          }
        }
        gsum[g] = -static_cast<float>(zero_factor) * hsum(sum);
      }
    }
    return _mm256_movemask_ps(odd) == 0;
  };
  out.xp_scaled = fill(true);
  if (!out.xp_scaled) fill(false);
}

QuantKernel quant_kernel_avx2(int bits, int mcount, bool signed_levels) {
  return by_bits(bits, [&](auto b) {
    return by_flag(signed_levels, [&](auto s) {
      return by_rows(mcount, [](auto m) -> QuantKernel {
        return quant_kernel<decltype(b)::value, decltype(m)::value, decltype(s)::value>;
      });
    });
  });
}

DenseGemmKernel dense_gemm_kernel_avx2(DenseKind kind) {
  switch (kind) {
    case DenseKind::kF32:
      return dense_gemm_kernel<DenseKind::kF32>;
    case DenseKind::kF16:
      return dense_gemm_kernel<DenseKind::kF16>;
    default:
      return dense_gemm_kernel<DenseKind::kBF16>;
  }
}

DenseKernel dense_kernel_avx2(DenseKind kind, int mcount) {
  return by_rows(mcount, [&](auto m) -> DenseKernel {
    constexpr int M = decltype(m)::value;
    switch (kind) {
      case DenseKind::kF32:
        return dense_kernel<DenseKind::kF32, M>;
      case DenseKind::kF16:
        return dense_kernel<DenseKind::kF16, M>;
      default:
        return dense_kernel<DenseKind::kBF16, M>;
    }
  });
}

}  // namespace moqe::detail
