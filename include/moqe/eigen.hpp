// Eigen interoperability (optional: include this only where Eigen 3.4 is found; moqe itself does
// not depend on it). moqe's views are row-major with a row stride, which is what an Eigen
// expression with direct access, row-major storage and unit inner stride already is: a RowMajor
// Matrix, a Map or Ref of one, a block of those, or the transpose of a column-major matrix
// (Eigen's usual "one token per column" layout, x [H, T], is moqe's x [T, H]). No copy is ever
// made: anything else is a compile-time error (a column-major matrix, an expression without
// storage), or a moqe::Error at run time (an inner stride other than 1).
//
//   Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> x(t, h), y(t, n);
//   linear.forward(moqe::view(x), moqe::view(y));              // y = x W^T
//   Eigen::MatrixXf xc(h, t);                                   // column-major, tokens as columns
//   layer.run(moqe::view(xc.transpose()), ...);                 // viewed as [t, h]
//   auto m = moqe::eigen_map(some_view);                       // and back: an Eigen::Map
#pragma once

#include <Eigen/Core>
#include <type_traits>

#include "moqe/core/error.hpp"
#include "moqe/core/view.hpp"

namespace moqe {

namespace detail {

template <class Derived>
constexpr bool eigen_row_major_direct() {
  using Flags = Eigen::internal::traits<Derived>;
  return (int(Flags::Flags) & Eigen::DirectAccessBit) != 0 &&
         (int(Flags::Flags) & Eigen::RowMajorBit) != 0;
}

template <class Derived>
void check_eigen_inner_stride(const Derived& m) {
  MOQE_CHECK(m.innerStride() == 1 || m.cols() <= 1,
             "moqe::view: an Eigen matrix with inner stride {} (moqe views need consecutive "
             "columns)",
             static_cast<int64_t>(m.innerStride()));
}

}  // namespace detail

// A read-only view of a row-major Eigen expression with direct access ([rows, cols], row stride
// = its outer stride).
template <class Derived>
MatrixView<const typename Derived::Scalar> view(const Eigen::DenseBase<Derived>& e) {
  static_assert(detail::eigen_row_major_direct<Derived>(),
                "moqe::view needs row-major Eigen storage with direct access (a RowMajor matrix, "
                "a Map/Ref/block of one, or the transpose of a column-major matrix); a "
                "column-major matrix would need a copy");
  const Derived& m = e.derived();
  detail::check_eigen_inner_stride(m);
  return MatrixView<const typename Derived::Scalar>(m.data(), m.rows(), m.cols(),
                                                    m.rows() > 1 ? m.outerStride() : m.cols());
}

// A writable view of the same (an lvalue: a RowMajor matrix, a Map, a block of one, ...).
template <class Derived>
MatrixView<typename Derived::Scalar> view(Eigen::DenseBase<Derived>& e) {
  static_assert(detail::eigen_row_major_direct<Derived>(),
                "moqe::view needs row-major Eigen storage with direct access (a RowMajor matrix, "
                "a Map/Ref/block of one, or the transpose of a column-major matrix); a "
                "column-major matrix would need a copy");
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(e.derived().data())>>,
                "moqe::view: this Eigen expression is read-only; use it as an input view");
  Derived& m = e.derived();
  detail::check_eigen_inner_stride(m);
  return MatrixView<typename Derived::Scalar>(m.data(), m.rows(), m.cols(),
                                              m.rows() > 1 ? m.outerStride() : m.cols());
}

// A moqe view as an Eigen::Map of a row-major matrix with its row stride.
template <class T>
using EigenRowMajorMap = Eigen::Map<
    std::conditional_t<std::is_const_v<T>,
                       const Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                           Eigen::RowMajor>,
                       Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>,
    0, Eigen::OuterStride<>>;

template <class T>
EigenRowMajorMap<T> eigen_map(MatrixView<T> v) {
  return EigenRowMajorMap<T>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(v.row_stride()));
}

}  // namespace moqe
