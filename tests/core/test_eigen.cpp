// <moqe/eigen.hpp>: Eigen matrices viewed as moqe views without a copy, and back.
#include <catch2/catch.hpp>

#include <moqe/eigen.hpp>

#include "moqe/gemm/linear.hpp"
#include "test_util.hpp"

using namespace moqe;

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

TEST_CASE("Eigen row-major storage is viewed in place, strides kept", "[core][eigen]") {
  RowMajor a(5, 7);
  a.setRandom();
  const MatrixView<float> v = view(a);
  CHECK(v.data() == a.data());
  CHECK((v.rows() == 5 && v.cols() == 7 && v.row_stride() == 7));
  v(2, 3) = 42.0f;
  CHECK(a(2, 3) == 42.0f);
  // A block keeps the matrix's row stride.
  auto b = a.block(1, 2, 3, 4);
  const MatrixView<float> bv = view(b);
  CHECK(bv.data() == &a(1, 2));
  CHECK((bv.rows() == 3 && bv.cols() == 4 && bv.row_stride() == 7));
  // A column-major matrix with tokens as columns is the transpose of a row-major one.
  Eigen::MatrixXf c(6, 3);
  c.setRandom();
  const MatrixView<const float> cv = view(c.transpose());
  CHECK(cv.data() == c.data());
  CHECK((cv.rows() == 3 && cv.cols() == 6 && cv.row_stride() == 6));
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t k = 0; k < 6; ++k) CHECK(cv(r, k) == c(k, r));
  }
  // A Map with an outer stride (padded rows), and back to Eigen.
  std::vector<float> buf(4 * 10, -1.0f);
  Eigen::Map<RowMajor, 0, Eigen::OuterStride<>> m(buf.data(), 4, 8, Eigen::OuterStride<>(10));
  m.setConstant(3.0f);
  const MatrixView<float> mv = view(m);
  CHECK(mv.row_stride() == 10);
  const auto back = eigen_map(mv);
  CHECK(back.data() == buf.data());
  CHECK(back.outerStride() == 10);
  CHECK(back(3, 7) == 3.0f);
  CHECK(buf[8] == -1.0f);  // padding untouched
}

TEST_CASE("A moqe layer runs on Eigen matrices", "[core][eigen]") {
  const int64_t n = 24, k = 64, t = 5;
  const std::vector<float> w = test::randn(static_cast<size_t>(n * k), 3);
  const QuantizedLinear lin = QuantizedLinear::from_f32(w, n, k);
  Eigen::MatrixXf x(k, t);  // tokens as columns, Eigen's usual layout
  x.setRandom();
  RowMajor y(t, n);
  lin.forward(view(x.transpose()), view(y));
  const Eigen::Map<const RowMajor> wm(w.data(), n, k);
  const RowMajor want = (wm * x).transpose();
  CHECK((y - want).norm() <= 1e-5f * want.norm());
}
