// The quantizers of methods.hpp. They run on the host only (the oracle, quantize_group, stays the
// one shared with CUDA); their choices are checked by their results: every group's codes are the
// nearest to its weights for the stored scale and zero point, which the tests verify, and the
// errors are measured (bench/bench_quant.cpp).
#include "methods.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "moqe/core/cpu.hpp"

namespace moqe::detail {

FitSums fit_sums_scalar(const float* w, int64_t n, float inv, float zf, float cmin, float cmax,
                        uint8_t* codes) {
  constexpr int kLanes = 8;
  float q1[kLanes] = {}, q2[kLanes] = {}, qw[kLanes] = {};
  auto code = [&](float x) {
    float t = x * inv + zf;
    t = t < cmin ? cmin : t;
    t = t > cmax ? cmax : t;
    return static_cast<int>(t + 0.5f);
  };
  const int64_t whole = n / kLanes * kLanes;
  for (int64_t i = 0; i < whole; ++i) {
    const int qi = code(w[i]);
    const auto q = static_cast<float>(qi);
    const int j = static_cast<int>(i % kLanes);
    q1[j] += q;
    const float qq = q * q, qx = q * w[i];  // rounded products, then the adds: no contraction
    q2[j] += qq;
    qw[j] += qx;
    if (codes != nullptr) codes[i] = static_cast<uint8_t>(qi);
  }
  FitSums f;
  for (int j = 0; j < kLanes; ++j) {
    f.q1 += q1[j];
    f.q2 += q2[j];
    f.qw += qw[j];
  }
  for (int64_t i = whole; i < n; ++i) {
    const int qi = code(w[i]);
    const auto q = static_cast<float>(qi);
    f.q1 += q;
    const float qq = q * q, qx = q * w[i];
    f.q2 += qq;
    f.qw += qx;
    if (codes != nullptr) codes[i] = static_cast<uint8_t>(qi);
  }
  return f;
}

namespace {

// The codes a mode may use and, for sym modes, the fixed zero point.
struct Range {
  float cmin = 0, cmax = 0;
  int zero = 0;    // sym modes: 2^(b-1)
  bool free_zero;  // asym: the zero point is chosen
};

Range range_of(int bits, QuantMode mode) {
  const int half = 1 << (bits - 1), top = (1 << bits) - 1;
  switch (mode) {
    case QuantMode::kAsym:
      return {0.0f, static_cast<float>(top), 0, true};
    case QuantMode::kSym:
      return {1.0f, static_cast<float>(top), half, false};
    case QuantMode::kSymFull:
      break;
  }
  return {0.0f, static_cast<float>(top), half, false};
}

// The codes and sums of w's fit by s (q - z) (fit_sums_* in methods.hpp, with a and b, the
// sums over d = q - z, filled in by with_zero).
struct Sums {
  float a = 0, b = 0, q1 = 0, q2 = 0, qw = 0;
};

Sums fit(const float* w, int64_t n, float s, int z, const Range& r, uint8_t* codes) {
  const float inv = 1.0f / s, zf = static_cast<float>(z);
#if defined(MOQE_HAVE_AVX2_KERNELS)
  const bool avx2 = active_cpu_isa() >= CpuIsa::kAvx2;  // the cap may change (tests)
  const FitSums f = avx2 ? fit_sums_avx2(w, n, inv, zf, r.cmin, r.cmax, codes)
                         : fit_sums_scalar(w, n, inv, zf, r.cmin, r.cmax, codes);
#else
  const FitSums f = fit_sums_scalar(w, n, inv, zf, r.cmin, r.cmax, codes);
#endif
  return {0, 0, f.q1, f.q2, f.qw};
}

// The group's constant sums.
struct Stats {
  float lo = 0, hi = 0, w1 = 0, w2 = 0;
};

Stats stats_of(const float* w, int64_t n) {
  Stats st{w[0], w[0], 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    st.lo = std::min(st.lo, w[i]);
    st.hi = std::max(st.hi, w[i]);
    st.w1 += w[i];
    st.w2 += w[i] * w[i];
  }
  return st;
}

// a and b of the fit of w by s (q - z) from the sums: d = q - z.
void with_zero(Sums& f, const Stats& st, int z, int64_t n) {
  const float zf = static_cast<float>(z);
  f.a = f.qw - zf * st.w1;
  f.b = f.q2 - 2 * zf * f.q1 + zf * zf * static_cast<float>(n);
}

// sum (w - s (q - z))^2 from the sums.
float error_at(const Sums& f, const Stats& st, float s) {
  return st.w2 - 2 * s * f.a + s * s * f.b;
}

int clamp_zero(float z, const Range& r) {
  return static_cast<int>(std::min(std::max(std::nearbyint(z), r.cmin), r.cmax));
}

}  // namespace

GroupParams search_group(const float* w, int64_t n, int bits, QuantMode mode, ScaleType scale_type,
                         uint8_t* codes) {
  const Range r = range_of(bits, mode);
  const Stats st = stats_of(w, n);
  // Round-to-nearest's scale and zero point (quantize_group's), and its error.
  const float qmax = r.cmax;
  float rtn_s = 0;
  int rtn_z = r.zero;
  if (r.free_zero) {
    rtn_s = store_scale((st.hi - st.lo) / qmax, scale_type);
    if (rtn_s > 0 && std::isfinite(rtn_s)) rtn_z = clamp_zero(-st.lo / rtn_s, r);
  } else {
    float m = 0, v = 0;
    for (int64_t i = 0; i < n; ++i) {
      m = std::max(m, std::fabs(w[i]));
      v = std::fabs(w[i]) > std::fabs(v) ? w[i] : v;
    }
    const float half = static_cast<float>(1 << (bits - 1));
    rtn_s = store_scale(mode == QuantMode::kSym ? m / (half - 1) : v / -half, scale_type);
  }
  if (!(rtn_s > 0) || !std::isfinite(rtn_s) || n < 2) {
    return quantize_group(w, n, bits, mode, scale_type, codes);
  }
  Sums f = fit(w, n, rtn_s, rtn_z, r, nullptr);
  with_zero(f, st, rtn_z, n);
  const float rtn_error = error_at(f, st, rtn_s);
  // Candidates: the range shrunk to ratio `c` of the full one (asym: the window at the low end,
  // middle or high end), each scored by the error of its codes at their least-squares scale.
  float best_s = 0, best_err = std::numeric_limits<float>::infinity();
  int best_z = rtn_z;
  auto consider = [&](float s, int z) {
    if (!(s > 0) || !std::isfinite(s)) return;
    Sums c = fit(w, n, s, z, r, nullptr);
    with_zero(c, st, z, n);
    if (!(c.b > 0) || !(c.a > 0)) return;
    const float err = st.w2 - c.a * c.a / c.b;
    if (err < best_err) {
      best_err = err;
      best_s = c.a / c.b;
      best_z = z;
    }
  };
  auto try_ratio = [&](float c, float at) {
    if (r.free_zero) {
      const float width = (st.hi - st.lo) * c, s = width / qmax;
      const float low = st.lo + (st.hi - st.lo - width) * at;
      consider(s, clamp_zero(-low / s, r));
    } else {
      consider(rtn_s * c, r.zero);
    }
  };
  // Coarse to fine: ratios 1, 0.9, ..., 0.6 with the window centred, then around the best ratio
  // every position (asym) at it and at +-0.05.
  float best_c = 1.0f;
  for (const float c : {1.0f, 0.9f, 0.8f, 0.7f, 0.6f}) {
    const float before = best_err;
    try_ratio(c, 0.5f);
    if (best_err < before) best_c = c;
  }
  for (const float c : {best_c - 0.05f, best_c, best_c + 0.05f}) {
    if (c > 1.0f) continue;
    for (const float at : {0.0f, 0.5f, 1.0f}) {
      if (r.free_zero || at == 0.5f) try_ratio(c, at);
    }
  }
  // Refinement: codes for the scale (and, asym, the zero point), scale for the codes.
  float s = best_s;
  int z = best_z;
  for (int round = 0; round < 2 && s > 0; ++round) {
    const float stored = store_scale(s, scale_type);
    if (!(stored > 0) || !std::isfinite(stored)) break;
    Sums c = fit(w, n, stored, z, r, nullptr);
    if (r.free_zero) {
      // Joint least squares of w ~ slope q + offset over the codes, then the nearest integer
      // zero point and the codes for it.
      const float nf = static_cast<float>(n), var = c.q2 - c.q1 * c.q1 / nf;
      if (var > 0) {
        const float slope = (c.qw - c.q1 * st.w1 / nf) / var;
        const float offset = (st.w1 - slope * c.q1) / nf;
        if (slope > 0 && std::isfinite(slope)) {
          z = clamp_zero(-offset / slope, r);
          c = fit(w, n, slope, z, r, nullptr);
        }
      }
    }
    with_zero(c, st, z, n);
    if (!(c.b > 0) || !(c.a > 0)) break;
    s = c.a / c.b;
  }
  const float stored = store_scale(s, scale_type);
  if (stored > 0 && std::isfinite(stored)) {
    Sums c = fit(w, n, stored, z, r, codes);
    with_zero(c, st, z, n);
    if (error_at(c, st, stored) < rtn_error) return {stored, z};
  }
  return quantize_group(w, n, bits, mode, scale_type, codes);
}

GroupParams hqq_group(const float* w, int64_t n, int bits, QuantMode mode, ScaleType scale_type,
                      uint8_t* codes) {
  const GroupParams rtn = quantize_group(w, n, bits, mode, scale_type, codes);
  if (mode != QuantMode::kAsym || rtn.scale == 0.0f || !std::isfinite(rtn.scale) || n < 2) {
    return rtn;
  }
  const Range r = range_of(bits, mode);
  const Stats st = stats_of(w, n);
  Sums f = fit(w, n, rtn.scale, rtn.zero, r, nullptr);
  with_zero(f, st, rtn.zero, n);
  const float rtn_error = error_at(f, st, rtn.scale);
  // HQQ's half-quadratic iterations: the error's l_p proximal step (p = 0.7) gives a target with
  // the outliers' share taken out, then the zero point (continuous while it iterates) and, in
  // the spirit of HQQ's scale update, the least-squares scale for that target; codes for both.
  constexpr float kP = 0.7f, kKappa = 1.01f;
  constexpr int kIters = 20;
  float beta = 10.0f, s = rtn.scale, z = static_cast<float>(rtn.zero);
  auto codes_for = [&](float scale, float zf) {
    const float inv = 1.0f / scale;
    for (int64_t i = 0; i < n; ++i) {
      const float t = std::min(std::max(w[i] * inv + zf, r.cmin), r.cmax);
      codes[i] = static_cast<uint8_t>(static_cast<int>(t + 0.5f));
    }
  };
  codes_for(s, z);
  std::vector<float> target(static_cast<size_t>(n));
  for (int it = 0; it < kIters; ++it) {
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float e = w[i] - (static_cast<float>(codes[i]) - z) * s;
      const float a = std::fabs(e);
      // sign(e) max(|e| - |e|^(p-1) / beta, 0): the part of the error kept as "outlier".
      const float shrunk = a > 0 ? std::max(a - std::pow(a, kP - 1.0f) / beta, 0.0f) : 0.0f;
      target[static_cast<size_t>(i)] = w[i] - std::copysign(shrunk, e);
      acc += static_cast<double>(codes[i]) - target[static_cast<size_t>(i)] / s;
    }
    z = std::min(std::max(static_cast<float>(acc / n), r.cmin), r.cmax);
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(codes[i]) - z;
      num += target[static_cast<size_t>(i)] * d;
      den += d * d;
    }
    if (den > 0 && num > 0) s = static_cast<float>(num / den);
    beta *= kKappa;
    codes_for(s, z);
  }
  // moqe's zero points are integers: the nearest one, its least-squares scale, its codes.
  const int zi = clamp_zero(z, r);
  Sums g = fit(w, n, s, zi, r, nullptr);
  with_zero(g, st, zi, n);
  if (g.b > 0 && g.a > 0) {
    const float stored = store_scale(g.a / g.b, scale_type);
    if (stored > 0 && std::isfinite(stored)) {
      Sums c = fit(w, n, stored, zi, r, codes);
      with_zero(c, st, zi, n);
      if (error_at(c, st, stored) < rtn_error) return {stored, zi};
    }
  }
  return quantize_group(w, n, bits, mode, scale_type, codes);
}

}  // namespace moqe::detail
