// Activation element types of the CPU layer API: fp32, and fp16 / bf16 (moqe::Half,
// moqe::BFloat16) for models whose hidden states are 16-bit. Layers compute in fp32: a 16-bit
// input is widened exactly, the output rounded once (round to nearest even) at the end.
#pragma once

#include <concepts>
#include <cstdint>

#include "moqe/core/dtypes.hpp"
#include "moqe/core/view.hpp"

namespace moqe {

template <class T>
concept ActivationType =
    std::same_as<T, float> || std::same_as<T, Half> || std::same_as<T, BFloat16>;

// A 16-bit activation type (the ones the fp32 paths convert).
template <class T>
concept HalfActivation = std::same_as<T, Half> || std::same_as<T, BFloat16>;

// dst = src, widened to fp32 (exact). Shapes must match (checked).
template <HalfActivation T>
void widen_rows(MatrixView<const T> src, MatrixView<float> dst) {
  MOQE_CHECK(src.rows() == dst.rows() && src.cols() == dst.cols(), "widen_rows: {} into {}",
             shape_string(src), shape_string(dst));
  for (int64_t r = 0; r < src.rows(); ++r) {
    const T* s = src.row(r);
    float* d = dst.row(r);
    for (int64_t c = 0; c < src.cols(); ++c) d[c] = static_cast<float>(s[c]);
  }
}

// dst = src rounded to T (nearest even). Shapes must match (checked).
template <HalfActivation T>
void round_rows(MatrixView<const float> src, MatrixView<T> dst) {
  MOQE_CHECK(src.rows() == dst.rows() && src.cols() == dst.cols(), "round_rows: {} into {}",
             shape_string(src), shape_string(dst));
  for (int64_t r = 0; r < src.rows(); ++r) {
    const float* s = src.row(r);
    T* d = dst.row(r);
    for (int64_t c = 0; c < src.cols(); ++c) d[c] = T(s[c]);
  }
}

}  // namespace moqe
