// fit_sums_avx2 (methods.hpp): the search's inner loop, eight weights per step, bit for bit the
// scalar version's (the same lanes, the same order, separate multiplies and adds). Compiled with
// -mavx2 and -ffp-contract=off (src/CMakeLists.txt) and called only where the CPU has AVX2.
#include <immintrin.h>

#include "methods.hpp"

namespace moqe::detail {

FitSums fit_sums_avx2(const float* w, int64_t n, float inv, float zf, float cmin, float cmax,
                      uint8_t* codes) {
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(zf), vlo = _mm256_set1_ps(cmin),
               vhi = _mm256_set1_ps(cmax), half = _mm256_set1_ps(0.5f);
  __m256 q1 = _mm256_setzero_ps(), q2 = _mm256_setzero_ps(), qw = _mm256_setzero_ps();
  const int64_t whole = n / 8 * 8;
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 x = _mm256_loadu_ps(w + i);
    __m256 t = _mm256_add_ps(_mm256_mul_ps(x, vinv), vz);
    t = _mm256_min_ps(_mm256_max_ps(t, vlo), vhi);
    const __m256i qi = _mm256_cvttps_epi32(_mm256_add_ps(t, half));
    const __m256 q = _mm256_cvtepi32_ps(qi);
    q1 = _mm256_add_ps(q1, q);
    q2 = _mm256_add_ps(q2, _mm256_mul_ps(q, q));
    qw = _mm256_add_ps(qw, _mm256_mul_ps(q, x));
    if (codes != nullptr) {
      // 8 int32 (0..255) to 8 bytes.
      const __m128i lo = _mm256_castsi256_si128(qi), hi = _mm256_extracti128_si256(qi, 1);
      const __m128i w16 = _mm_packus_epi32(lo, hi);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w16, w16));
    }
  }
  alignas(32) float l1[8], l2[8], lw[8];
  _mm256_store_ps(l1, q1);
  _mm256_store_ps(l2, q2);
  _mm256_store_ps(lw, qw);
  FitSums f;
  for (int j = 0; j < 8; ++j) {
    f.q1 += l1[j];
    f.q2 += l2[j];
    f.qw += lw[j];
  }
  for (int64_t i = whole; i < n; ++i) {  // the rest one by one, in order (as the scalar loop)
    float t = w[i] * inv + zf;
    t = t < cmin ? cmin : t;
    t = t > cmax ? cmax : t;
    const int qi = static_cast<int>(t + 0.5f);
    const auto q = static_cast<float>(qi);
    f.q1 += q;
    const float qq = q * q, qx = q * w[i];
    f.q2 += qq;
    f.qw += qx;
    if (codes != nullptr) codes[i] = static_cast<uint8_t>(qi);
  }
  return f;
}

}  // namespace moqe::detail
