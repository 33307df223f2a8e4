// QuantizedMatrix: an owning [N, K] weight matrix in one of moqe's schemes (packed codes, scales,
// zero points), with the scalar reference quantize / dequantize and error metrics.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/core/view.hpp"
#include "moqe/quant/packing.hpp"
#include "moqe/quant/scheme.hpp"

namespace moqe {

// How each group's scale and zero point are chosen (docs/design.md, "Quantization methods"). The
// result is moqe's format whatever the method; only the numbers differ.
enum class QuantMethod : uint8_t {
  kRtn,     // round to nearest from the group's range (max |w|, or min and max): the reference
  kSearch,  // clipping search with a least-squares refinement (never worse than kRtn per group)
  kHqq,     // HQQ's proximal optimization of the zero point (asym; sym modes: as kRtn)
};
std::string_view to_string(QuantMethod m);
std::optional<QuantMethod> parse_quant_method(std::string_view s);

class QuantizedMatrix {
 public:
  QuantizedMatrix() = default;

  // Assembles a matrix from stored parts (as read from a file), checking every size and that the
  // zero points and scales are valid. `name` is used in messages.
  //   qweight: rows * packed_row_bytes(cols, bits) bytes
  //   scales:  rows * groups_per_row stored values (fp16 values when scale_type is kF16)
  //   zeros:   rows * groups_per_row for asym, empty otherwise
  static QuantizedMatrix from_parts(int64_t rows, int64_t cols, const QuantScheme& scheme,
                                    std::vector<uint8_t> qweight, std::vector<float> scales,
                                    std::vector<uint8_t> zeros, std::string_view name = "matrix");
  // The rows of a, then the rows of b (valid because groups never cross rows): both must have
  // the same columns, bits, mode, scale type and resolved group size (per channel = groups of K).
  static QuantizedMatrix concat_rows(const QuantizedMatrix& a, const QuantizedMatrix& b,
                                     std::string_view name = "matrix");

  // Rows first, first + step, ... (count of them) as a matrix of their own (groups never cross
  // rows): gpt-oss's interleaved gate and up rows, or one expert's rows of a stacked matrix.
  QuantizedMatrix take_rows(int64_t first, int64_t count, int64_t step = 1,
                            std::string_view name = "matrix") const;

  // Act-order checkpoints (GPTQ desc_act): the codes are stored with their columns in
  // `order` (stored column c holds input column order[c], a permutation of 0..K-1) so that every
  // group is contiguous; the matrix still means W [N, K] in the input's order. Empty: the
  // identity. Errors name `name` when `order` is not a permutation of K.
  void set_input_order(std::vector<int32_t> order, std::string_view name = "matrix");
  std::span<const int32_t> input_order() const {
    return order_ ? std::span<const int32_t>(order_->data(), order_->size())
                  : std::span<const int32_t>();
  }
  bool has_input_order() const { return order_ != nullptr; }

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t numel() const { return rows_ * cols_; }
  const QuantScheme& scheme() const { return scheme_; }
  int bits() const { return scheme_.bits; }
  int64_t group_size() const { return scheme_.resolved_group_size(cols_); }
  int64_t groups_per_row() const { return group_size() == 0 ? 0 : cols_ / group_size(); }
  int64_t row_bytes() const { return packed_row_bytes(cols_, scheme_.bits); }

  // Spans built from pointer and size: nvcc's front end rejects the range constructor here.
  std::span<const uint8_t> qweight() const { return {qweight_.data(), qweight_.size()}; }
  std::span<const float> scales() const { return {scales_.data(), scales_.size()}; }
  std::span<const uint8_t> zeros() const { return {zeros_.data(), zeros_.size()}; }
  const uint8_t* packed_row(int64_t r) const { return qweight_.data() + r * row_bytes(); }
  float scale(int64_t r, int64_t g) const { return scales_[r * groups_per_row() + g]; }
  // The stored code that dequantizes to 0 in group g of row r.
  int zero(int64_t r, int64_t g) const {
    return scheme_.has_zeros() ? zeros_[r * groups_per_row() + g] : scheme_.code_offset();
  }
  // Dequantized element (r, c) (c in the input's order), the scalar reference.
  float at(int64_t r, int64_t c) const;
  // Row r dequantized into out[0..K) in the input's order, the scalar reference; codes is
  // scratch for K codes.
  void dequantize_row(int64_t r, float* out, uint8_t* codes) const;
  // The same in stored column order (equal to dequantize_row without an input order).
  void dequantize_stored_row(int64_t r, float* out, uint8_t* codes) const;

  // Bytes as stored: packed codes + scales at their storage width + zero points.
  int64_t storage_bytes() const;
  // storage_bytes() * 8 / numel(): the exact bits per weight, padding included. It equals
  // scheme().bits_per_weight(cols()) when cols * bits is a multiple of 8.
  double bits_per_weight() const;

 private:
  friend QuantizedMatrix quantize_impl(MatrixView<const float>, const QuantScheme&, int,
                                       std::string_view, QuantMethod);
  int64_t rows_ = 0;
  int64_t cols_ = 0;
  QuantScheme scheme_{};
  std::vector<uint8_t> qweight_;
  std::vector<float> scales_;
  std::vector<uint8_t> zeros_;
  // Shared: copies and row selections of one matrix keep one permutation.
  std::shared_ptr<const std::vector<int32_t>> order_;    // stored column -> input column
  std::shared_ptr<const std::vector<int32_t>> inverse_;  // input column -> stored column
};

struct QuantizeOptions {
  int num_threads = 0;               // 0: default_num_threads()
  std::string_view name = "matrix";  // the tensor name used in error messages
  QuantMethod method = QuantMethod::kRtn;
};

// Quantizes w [N, K] with the scalar reference (multithreaded over rows). Throws moqe::Error
// naming the tensor, row and column of a NaN or Inf, the unsupported scheme value, or the group
// whose scale overflows fp16.
QuantizedMatrix quantize(MatrixView<const float> w, const QuantScheme& scheme,
                         const QuantizeOptions& options = {});

// Dequantizes into out (shape [N, K]; checked).
void dequantize(const QuantizedMatrix& q, MatrixView<float> out, int num_threads = 0);
std::vector<float> dequantize(const QuantizedMatrix& q, int num_threads = 0);

struct ErrorStats {
  double rel_frobenius = 0;  // ||W - W'||_F / ||W||_F (0 when both are 0)
  double max_abs = 0;        // max |W - W'|
  double sqnr_db = 0;        // 10 log10(sum W^2 / sum (W - W')^2); +inf when exact
};

// Error of q against the original w, dequantizing row by row (no full copy). Deterministic: sums
// are taken per row, then over rows in order, whatever the thread count.
ErrorStats quantization_error(MatrixView<const float> w, const QuantizedMatrix& q,
                              int num_threads = 0);
// Error of any approximation against a reference of the same shape.
ErrorStats compare(MatrixView<const float> reference, MatrixView<const float> approx,
                   int num_threads = 0);

// Throws moqe::Error naming `name`, the row and the column of the first NaN or Inf in w.
void check_finite(MatrixView<const float> w, std::string_view name, int num_threads = 0);

}  // namespace moqe
