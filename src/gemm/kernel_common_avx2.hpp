// Private: small helpers of the SIMD kernel files (AVX2 and AVX-512 both build them with AVX2 and
// F16C enabled). Internal linkage, so each file keeps its own copy compiled with its own flags.
#pragma once

#include <cstdint>

#include "cpu_kernels.hpp"

namespace moqe::detail {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Group scale i of w: fp16 scales through F16C (one instruction, exact like half_bits_to_float).
inline float scale_at(const PackedQuant& w, int64_t i) {
  return w.f16_scales ? _cvtsh_ss(w.scale16[static_cast<size_t>(i)])
                      : w.scale32[static_cast<size_t>(i)];
}

}  // namespace
}  // namespace moqe::detail
