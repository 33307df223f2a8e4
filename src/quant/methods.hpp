// Private to src/quant: the calibration-free quantizers other than round-to-nearest
// (docs/design.md, "Quantization methods"). Each chooses one group's stored scale and zero point
// to lower its reconstruction error, and writes the codes nearest to the weights for them: the
// result is moqe's ordinary format, which every kernel, file and loader reads as any other.
#pragma once

#include <cstdint>

#include "moqe/quant/numerics.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::detail {

// A clipping search with a least-squares refinement (in the spirit of llama.cpp's k-quant makers,
// with moqe's integer zero points): candidate ranges narrower than the group's (clipping the
// extremes, at three positions for asym), the least-squares scale for the codes each gives, the
// best by squared error; then two rounds of "codes for the scale, scale for the codes". Never
// worse than round-to-nearest on the group's squared error (RTN is its first candidate).
GroupParams search_group(const float* w, int64_t n, int bits, QuantMode mode, ScaleType scale_type,
                         uint8_t* codes);

// Half-quadratic quantization (HQQ, Badri & Shaji 2023), as moqe stores it: from round to nearest,
// HQQ's proximal iterations under an l_p error (p = 0.7, beta from 10, x1.01 per iteration, 20
// iterations) move the zero point (continuous meanwhile) and, in HQQ's spirit, the scale (least
// squares against the proximal target); then the nearest integer zero point (moqe stores integer
// zero points), its least-squares scale and codes. Kept only when better than round to nearest
// on the group's squared error. asym only: the sym modes (no zero point) are round to nearest.
GroupParams hqq_group(const float* w, int64_t n, int bits, QuantMode mode, ScaleType scale_type,
                      uint8_t* codes);

// The group quantizer of a method (quantize_group for kRtn).
using GroupQuantizer = GroupParams (*)(const float*, int64_t, int, QuantMode, ScaleType, uint8_t*);
inline GroupQuantizer group_quantizer(QuantMethod m) {
  return m == QuantMethod::kSearch ? search_group
         : m == QuantMethod::kHqq  ? hqq_group
                                   : quantize_group;
}

// The search's inner loop, exposed for its AVX2 twin and the tests: for each w[i] the code
// q = (int)(clamp(w[i] inv + zf, cmin, cmax) + 1/2) (the nearest, ties up; the clamped value is
// >= 0), stored in codes[i] when codes is not null, and the sums of q, q^2 and q w[i] in eight
// lanes (element i in lane i mod 8 up to the last whole eight, lanes added in order, then the
// rest one by one), without fused multiply-adds: the scalar and AVX2 versions give the same bits.
struct FitSums {
  float q1 = 0, q2 = 0, qw = 0;
};
FitSums fit_sums_scalar(const float* w, int64_t n, float inv, float zf, float cmin, float cmax,
                        uint8_t* codes);
#if defined(MOQE_HAVE_AVX2_KERNELS)
FitSums fit_sums_avx2(const float* w, int64_t n, float inv, float zf, float cmin, float cmax,
                      uint8_t* codes);
#endif

}  // namespace moqe::detail
