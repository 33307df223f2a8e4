// Non-owning strided views over caller memory (in the spirit of Eigen's Map): a row-major matrix
// whose rows may be padded (row_stride >= cols). Views never allocate or copy.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include "moqe/core/error.hpp"

namespace moqe {

template <class T>
class MatrixView {
 public:
  MatrixView() = default;
  MatrixView(T* data, int64_t rows, int64_t cols, int64_t row_stride = -1)
      : data_(data), rows_(rows), cols_(cols), row_stride_(row_stride < 0 ? cols : row_stride) {
    MOQE_CHECK(rows >= 0 && cols >= 0, "MatrixView: negative shape [{}, {}]", rows, cols);
    MOQE_CHECK(row_stride_ >= cols_, "MatrixView: row stride {} is smaller than the {} columns",
               row_stride_, cols_);
    MOQE_CHECK(data != nullptr || rows == 0 || cols == 0,
               "MatrixView: null data for shape [{}, {}]", rows, cols);
  }
  // A contiguous [rows, cols] view of a span, checked for size.
  MatrixView(std::span<T> s, int64_t rows, int64_t cols) : MatrixView(s.data(), rows, cols) {
    MOQE_CHECK(static_cast<int64_t>(s.size()) == rows * cols,
               "MatrixView: a buffer of {} elements cannot hold shape [{}, {}]", s.size(), rows,
               cols);
  }

  // A view of const T from a view of T.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
      MatrixView(const MatrixView<U>& o)  // NOLINT(google-explicit-constructor)
      : data_(o.data()), rows_(o.rows()), cols_(o.cols()), row_stride_(o.row_stride()) {}

  T* data() const { return data_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t row_stride() const { return row_stride_; }
  int64_t size() const { return rows_ * cols_; }
  bool empty() const { return rows_ == 0 || cols_ == 0; }
  bool contiguous() const { return row_stride_ == cols_; }
  T* row(int64_t r) const { return data_ + r * row_stride_; }
  T& operator()(int64_t r, int64_t c) const { return data_[r * row_stride_ + c]; }
  std::span<T> row_span(int64_t r) const { return {row(r), static_cast<size_t>(cols_)}; }

  // Rows [r0, r0 + n) and columns [c0, c0 + m).
  MatrixView block(int64_t r0, int64_t c0, int64_t n, int64_t m) const {
    MOQE_CHECK(r0 >= 0 && c0 >= 0 && n >= 0 && m >= 0 && r0 + n <= rows_ && c0 + m <= cols_,
               "MatrixView: block [{}:{}, {}:{}] is outside shape [{}, {}]", r0, r0 + n, c0, c0 + m,
               rows_, cols_);
    return MatrixView(data_ + r0 * row_stride_ + c0, n, m, row_stride_);
  }

 private:
  T* data_ = nullptr;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  int64_t row_stride_ = 0;
};

// "[r, c]" for messages.
template <class T>
std::string shape_string(const MatrixView<T>& v) {
  return MOQE_FORMAT("[{}, {}]", v.rows(), v.cols());
}

}  // namespace moqe
