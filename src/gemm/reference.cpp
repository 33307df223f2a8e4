#include "moqe/gemm/reference.hpp"

#include "moqe/core/threading.hpp"

namespace moqe {

void matmul_nt_f32(MatrixView<const float> x, MatrixView<const float> w, MatrixView<float> y,
                   int num_threads) {
  MOQE_CHECK(x.cols() == w.cols() && y.rows() == x.rows() && y.cols() == w.rows(),
             "matmul_nt_f32: x {} . w^T {} does not give y {}", shape_string(x), shape_string(w),
             shape_string(y));
  parallel_for(w.rows(), num_threads, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < x.rows(); ++m) y(m, n) = dot_f32(x.row(m), w.row(n), x.cols());
    }
  });
}

}  // namespace moqe
