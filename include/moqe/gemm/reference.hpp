// Reference fp32 kernels: the dot product and y = x . W^T with a fixed summation order (eight
// interleaved partial sums, combined pairwise), so that every path that uses them agrees bit for
// bit, whatever the thread count.
#pragma once

#include <cstdint>

#include "moqe/core/view.hpp"

namespace moqe {

inline float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  const int64_t rest = n - i;  // < 8
  for (int64_t j = 0; j < rest && j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// y [M, N] = x [M, K] . w^T, w [N, K] in fp32; parallel over N.
void matmul_nt_f32(MatrixView<const float> x, MatrixView<const float> w, MatrixView<float> y,
                   int num_threads = 0);

}  // namespace moqe
