// The scalar quantization core of docs/design.md's numerics, shared by the CPU reference, the SIMD
// kernels' tests and CUDA code: one group of weights -> stored scale, zero point and codes.
// This is the oracle: every faster path must reproduce it bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "moqe/core/config.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/quant/scheme.hpp"

namespace moqe {

// Round half away from zero (C's roundf).
MOQE_HOST_DEVICE MOQE_FORCEINLINE float round_half_away(float x) { return ::roundf(x); }

MOQE_HOST_DEVICE MOQE_FORCEINLINE float clampf(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// The value a scale has once stored (fp16 rounds to nearest even; fp32 is exact).
MOQE_HOST_DEVICE MOQE_FORCEINLINE float store_scale(float s, ScaleType type) {
  return type == ScaleType::kF16 ? round_to_half(s) : s;
}

struct GroupParams {
  float scale;  // the stored scale (0 for an all-zero group)
  int zero;     // the stored code that dequantizes to 0: 2^(b-1) for sym modes, z for asym
};

// Quantizes w[0..n) (finite values) and writes unsigned stored codes to codes[0..n).
// Dequantization is (code - zero) * scale. A non-finite scale (fp16 overflow) is returned as is;
// callers report it.
MOQE_HOST_DEVICE inline GroupParams quantize_group(const float* w, int64_t n, int bits,
                                                   QuantMode mode, ScaleType scale_type,
                                                   uint8_t* codes) {
  GroupParams p{0.0f, 0};
  if (mode == QuantMode::kAsym) {
    float lo = w[0], hi = w[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = w[i] < lo ? w[i] : lo;
      hi = w[i] > hi ? w[i] : hi;
    }
    const float qmax = static_cast<float>((1 << bits) - 1);
    p.scale = store_scale((hi - lo) / qmax, scale_type);
    if (p.scale == 0.0f || !std::isfinite(p.scale)) {
      for (int64_t i = 0; i < n; ++i) codes[i] = 0;
      return p;
    }
    const float z = clampf(round_half_away(-lo / p.scale), 0.0f, qmax);
    p.zero = static_cast<int>(z);
    for (int64_t i = 0; i < n; ++i) {
      codes[i] = static_cast<uint8_t>(clampf(round_half_away(w[i] / p.scale) + z, 0.0f, qmax));
    }
    return p;
  }
  const int half = 1 << (bits - 1);
  p.zero = half;
  float qlo, qhi;
  if (mode == QuantMode::kSym) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; ++i) m = std::fabs(w[i]) > m ? std::fabs(w[i]) : m;
    qhi = static_cast<float>(half - 1);
    qlo = -qhi;
    p.scale = store_scale(m / qhi, scale_type);
  } else {  // kSymFull: the element of largest magnitude, the first one on ties
    float v = 0.0f;
    for (int64_t i = 0; i < n; ++i) v = std::fabs(w[i]) > std::fabs(v) ? w[i] : v;
    qhi = static_cast<float>(half - 1);
    qlo = -static_cast<float>(half);
    p.scale = store_scale(v / qlo, scale_type);
  }
  if (p.scale == 0.0f || !std::isfinite(p.scale)) {
    for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(half);
    return p;
  }
  for (int64_t i = 0; i < n; ++i) {
    codes[i] = static_cast<uint8_t>(
        static_cast<int>(clampf(round_half_away(w[i] / p.scale), qlo, qhi)) + half);
  }
  return p;
}

MOQE_HOST_DEVICE MOQE_FORCEINLINE float dequantize_code(uint32_t code, int zero, float scale) {
  return static_cast<float>(static_cast<int>(code) - zero) * scale;
}

}  // namespace moqe
