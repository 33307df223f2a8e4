#include "moqe/quant/quantized_matrix.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>

#include "methods.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/quant/numerics.hpp"

namespace moqe {
namespace {

constexpr int64_t kRowsPerChunk = 4;

}  // namespace

QuantizedMatrix QuantizedMatrix::concat_rows(const QuantizedMatrix& a, const QuantizedMatrix& b,
                                             std::string_view name) {
  MOQE_CHECK(a.cols() == b.cols() && a.bits() == b.bits() && a.scheme().mode == b.scheme().mode &&
                 a.scheme().scale_type == b.scheme().scale_type && a.group_size() == b.group_size(),
             "{}: cannot stack [{}, {}] {} on [{}, {}] {} (columns and code layout must match)",
             name, b.rows(), b.cols(), b.scheme().to_string(), a.rows(), a.cols(),
             a.scheme().to_string());
  MOQE_CHECK(std::ranges::equal(a.input_order(), b.input_order()),
             "{}: cannot stack matrices whose columns are stored in different input orders", name);
  auto cat = [](auto x, auto y) {
    std::vector<typename decltype(x)::value_type> out(x.begin(), x.end());
    out.insert(out.end(), y.begin(), y.end());
    return out;
  };
  QuantizedMatrix q =
      from_parts(a.rows() + b.rows(), a.cols(), a.scheme(), cat(a.qweight(), b.qweight()),
                 cat(a.scales(), b.scales()), cat(a.zeros(), b.zeros()), name);
  q.order_ = a.order_;
  q.inverse_ = a.inverse_;
  return q;
}

QuantizedMatrix QuantizedMatrix::take_rows(int64_t first, int64_t count, int64_t step,
                                           std::string_view name) const {
  MOQE_CHECK(
      first >= 0 && count >= 0 && step >= 1 && (count == 0 || first + (count - 1) * step < rows_),
      "{}: rows {}, {}, ... ({} of them) are not all among its {} rows", name, first, first + step,
      count, rows_);
  const int64_t rb = row_bytes(), ng = groups_per_row();
  std::vector<uint8_t> q(static_cast<size_t>(count * rb)), z;
  std::vector<float> sc(static_cast<size_t>(count * ng));
  if (scheme_.has_zeros()) z.resize(sc.size());
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = first + i * step;
    std::copy_n(qweight_.begin() + r * rb, rb, q.begin() + i * rb);
    std::copy_n(scales_.begin() + r * ng, ng, sc.begin() + i * ng);
    if (!z.empty()) std::copy_n(zeros_.begin() + r * ng, ng, z.begin() + i * ng);
  }
  QuantizedMatrix out =
      from_parts(count, cols_, scheme_, std::move(q), std::move(sc), std::move(z), name);
  out.order_ = order_;
  out.inverse_ = inverse_;
  return out;
}

QuantizedMatrix QuantizedMatrix::from_parts(int64_t rows, int64_t cols, const QuantScheme& scheme,
                                            std::vector<uint8_t> qweight, std::vector<float> scales,
                                            std::vector<uint8_t> zeros, std::string_view name) {
  MOQE_CHECK(rows >= 0 && cols > 0, "{}: invalid quantized shape [{}, {}]", name, rows, cols);
  int64_t bits_total = 0;  // rows * cols * 8 bounds every size computed below
  MOQE_CHECK(!__builtin_mul_overflow(rows, cols, &bits_total) &&
                 !__builtin_mul_overflow(bits_total, int64_t{8}, &bits_total),
             "{}: quantized shape [{}, {}] is too large (its size overflows 64 bits)", name, rows,
             cols);
  validate_scheme(scheme, cols, name);
  QuantizedMatrix q;
  q.rows_ = rows;
  q.cols_ = cols;
  q.scheme_ = scheme;
  const int64_t want_q = rows * q.row_bytes();
  const int64_t want_s = rows * q.groups_per_row();
  MOQE_CHECK(static_cast<int64_t>(qweight.size()) == want_q,
             "{}: qweight holds {} bytes, but shape [{}, {}] at {} bits needs {} ({} per row)",
             name, qweight.size(), rows, cols, scheme.bits, want_q, q.row_bytes());
  MOQE_CHECK(static_cast<int64_t>(scales.size()) == want_s,
             "{}: scales hold {} values, but shape [{}, {}] with group size {} needs [{}, {}]",
             name, scales.size(), rows, cols, q.group_size(), rows, q.groups_per_row());
  if (scheme.has_zeros()) {
    MOQE_CHECK(static_cast<int64_t>(zeros.size()) == want_s,
               "{}: zeros hold {} values, but asym shape [{}, {}] needs [{}, {}]", name,
               zeros.size(), rows, cols, rows, q.groups_per_row());
    const int zmax = (1 << scheme.bits) - 1;
    for (size_t i = 0; i < zeros.size(); ++i) {
      MOQE_CHECK(zeros[i] <= zmax, "{}: zero point {} at row {}, group {} exceeds {} for {} bits",
                 name, zeros[i], static_cast<int64_t>(i) / q.groups_per_row(),
                 static_cast<int64_t>(i) % q.groups_per_row(), zmax, scheme.bits);
    }
  } else {
    MOQE_CHECK(zeros.empty(), "{}: zero points given for {} mode, which has none", name,
               to_string(scheme.mode));
  }
  for (size_t i = 0; i < scales.size(); ++i) {
    MOQE_CHECK(std::isfinite(scales[i]), "{}: scale {} at row {}, group {} is not finite", name,
               scales[i], static_cast<int64_t>(i) / q.groups_per_row(),
               static_cast<int64_t>(i) % q.groups_per_row());
  }
  q.qweight_ = std::move(qweight);
  q.scales_ = std::move(scales);
  q.zeros_ = std::move(zeros);
  return q;
}

void QuantizedMatrix::set_input_order(std::vector<int32_t> order, std::string_view name) {
  if (order.empty()) {
    order_.reset();
    inverse_.reset();
    return;
  }
  MOQE_CHECK(static_cast<int64_t>(order.size()) == cols_,
             "{}: an input order of {} columns for {} columns", name, order.size(), cols_);
  std::vector<int32_t> inv(order.size(), -1);
  for (size_t c = 0; c < order.size(); ++c) {
    const int32_t i = order[c];
    MOQE_CHECK(i >= 0 && i < cols_ && inv[static_cast<size_t>(i)] < 0,
               "{}: the input order is not a permutation of the {} columns (column {} at {})", name,
               cols_, i, c);
    inv[static_cast<size_t>(i)] = static_cast<int32_t>(c);
  }
  bool identity = true;
  for (size_t c = 0; c < order.size() && identity; ++c) identity = order[c] == int32_t(c);
  if (identity) {
    order_.reset();
    inverse_.reset();
    return;
  }
  order_ = std::make_shared<const std::vector<int32_t>>(std::move(order));
  inverse_ = std::make_shared<const std::vector<int32_t>>(std::move(inv));
}

void QuantizedMatrix::dequantize_row(int64_t r, float* out, uint8_t* codes) const {
  if (!order_) {
    dequantize_stored_row(r, out, codes);
    return;
  }
  thread_local std::vector<float> stored;
  stored.resize(static_cast<size_t>(cols_));
  dequantize_stored_row(r, stored.data(), codes);
  const int32_t* o = order_->data();
  for (int64_t c = 0; c < cols_; ++c) out[o[c]] = stored[c];
}

void QuantizedMatrix::dequantize_stored_row(int64_t r, float* out, uint8_t* codes) const {
  const int64_t g = group_size();
  unpack_row(packed_row(r), cols_, bits(), codes);
  for (int64_t j = 0; j < groups_per_row(); ++j) {
    const float s = scale(r, j);
    const int z = zero(r, j);
    for (int64_t c = j * g; c < (j + 1) * g; ++c) out[c] = dequantize_code(codes[c], z, s);
  }
}

float QuantizedMatrix::at(int64_t r, int64_t c) const {
  if (inverse_) c = (*inverse_)[static_cast<size_t>(c)];
  const int64_t g = c / group_size();
  return dequantize_code(unpack_code(packed_row(r), c, bits()), zero(r, g), scale(r, g));
}

int64_t QuantizedMatrix::storage_bytes() const {
  return static_cast<int64_t>(qweight_.size()) +
         static_cast<int64_t>(scales_.size()) * (scheme_.scale_bits() / 8) +
         static_cast<int64_t>(zeros_.size());
}

double QuantizedMatrix::bits_per_weight() const {
  return numel() == 0 ? scheme_.bits_per_weight(cols_)
                      : static_cast<double>(storage_bytes()) * 8.0 / static_cast<double>(numel());
}

void check_finite(MatrixView<const float> w, std::string_view name, int num_threads) {
  int64_t bad = std::numeric_limits<int64_t>::max();  // first bad flat index (row-major)
  std::mutex m;
  parallel_for(w.rows(), num_threads, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = w.row(r);
      for (int64_t c = 0; c < w.cols(); ++c) {
        if (!std::isfinite(row[c])) {
          std::lock_guard<std::mutex> lock(m);
          bad = std::min(bad, r * w.cols() + c);
          return;
        }
      }
    }
  });
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t r = bad / w.cols(), c = bad % w.cols();
    MOQE_FAIL("tensor '{}' of shape [{}, {}]: non-finite weight {} at row {}, column {}", name,
              w.rows(), w.cols(), w(r, c), r, c);
  }
}

QuantizedMatrix quantize_impl(MatrixView<const float> w, const QuantScheme& scheme, int threads,
                              std::string_view name, QuantMethod method) {
  const detail::GroupQuantizer choose = detail::group_quantizer(method);
  validate_scheme(scheme, w.cols(),
                  fmt::format("tensor '{}' of shape [{}, {}]", name, w.rows(), w.cols()));
  check_finite(w, name, threads);
  QuantizedMatrix q;
  q.rows_ = w.rows();
  q.cols_ = w.cols();
  q.scheme_ = scheme;
  const int64_t g = q.group_size(), ng = q.groups_per_row(), rb = q.row_bytes();
  q.qweight_.resize(static_cast<size_t>(w.rows() * rb));
  q.scales_.resize(static_cast<size_t>(w.rows() * ng));
  if (scheme.has_zeros()) q.zeros_.resize(q.scales_.size());
  // First group (flat row * ng + group) whose scale is not finite, for a deterministic message.
  int64_t bad = std::numeric_limits<int64_t>::max();
  std::mutex m;
  parallel_for(w.rows(), threads, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(static_cast<size_t>(w.cols()));
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = w.row(r);
      for (int64_t j = 0; j < ng; ++j) {
        const GroupParams p = choose(row + j * g, g, scheme.bits, scheme.mode, scheme.scale_type,
                                     codes.data() + j * g);
        if (!std::isfinite(p.scale)) {
          std::lock_guard<std::mutex> lock(m);
          bad = std::min(bad, r * ng + j);
        }
        q.scales_[r * ng + j] = p.scale;
        if (scheme.has_zeros()) q.zeros_[r * ng + j] = static_cast<uint8_t>(p.zero);
      }
      pack_row(codes.data(), w.cols(), scheme.bits, q.qweight_.data() + r * rb);
    }
  });
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t r = bad / ng, j = bad % ng;
    float m_abs = 0;
    for (int64_t c = j * g; c < (j + 1) * g; ++c) m_abs = std::max(m_abs, std::fabs(w(r, c)));
    MOQE_FAIL(
        "tensor '{}': the scale of row {}, group {} (columns {}..{}, max |w| = {}) overflows {}; "
        "use fp32 scales",
        name, r, j, j * g, (j + 1) * g - 1, m_abs, to_string(scheme.scale_type));
  }
  return q;
}

QuantizedMatrix quantize(MatrixView<const float> w, const QuantScheme& scheme,
                         const QuantizeOptions& options) {
  return quantize_impl(w, scheme, options.num_threads, options.name, options.method);
}

std::string_view to_string(QuantMethod m) {
  switch (m) {
    case QuantMethod::kRtn:
      return "rtn";
    case QuantMethod::kSearch:
      return "search";
    case QuantMethod::kHqq:
      return "hqq";
  }
  return "?";
}

std::optional<QuantMethod> parse_quant_method(std::string_view s) {
  for (const QuantMethod m : {QuantMethod::kRtn, QuantMethod::kSearch, QuantMethod::kHqq}) {
    if (s == to_string(m)) return m;
  }
  return std::nullopt;
}

namespace {

void dequantize_row(const QuantizedMatrix& q, int64_t r, float* out, uint8_t* codes) {
  q.dequantize_row(r, out, codes);
}

struct RowSums {
  double ref2 = 0, err2 = 0, max_abs = 0;
};

ErrorStats finish(const std::vector<RowSums>& rows) {
  RowSums t;
  for (const RowSums& r : rows) {
    t.ref2 += r.ref2;
    t.err2 += r.err2;
    t.max_abs = std::max(t.max_abs, r.max_abs);
  }
  ErrorStats s;
  s.max_abs = t.max_abs;
  if (t.err2 == 0) {
    s.rel_frobenius = 0;
    s.sqnr_db = std::numeric_limits<double>::infinity();
  } else {
    s.rel_frobenius =
        t.ref2 == 0 ? std::numeric_limits<double>::infinity() : std::sqrt(t.err2 / t.ref2);
    s.sqnr_db =
        t.ref2 == 0 ? -std::numeric_limits<double>::infinity() : 10.0 * std::log10(t.ref2 / t.err2);
  }
  return s;
}

RowSums row_sums(const float* ref, const float* approx, int64_t k) {
  RowSums s;
  for (int64_t c = 0; c < k; ++c) {
    const double a = ref[c], d = static_cast<double>(ref[c]) - approx[c];
    s.ref2 += a * a;
    s.err2 += d * d;
    s.max_abs = std::max(s.max_abs, std::fabs(d));
  }
  return s;
}

}  // namespace

void dequantize(const QuantizedMatrix& q, MatrixView<float> out, int num_threads) {
  MOQE_CHECK(out.rows() == q.rows() && out.cols() == q.cols(),
             "dequantize: output shape {} does not match the quantized matrix [{}, {}]",
             shape_string(out), q.rows(), q.cols());
  parallel_for(q.rows(), num_threads, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(static_cast<size_t>(q.cols()));
    for (int64_t r = r0; r < r1; ++r) dequantize_row(q, r, out.row(r), codes.data());
  });
}

std::vector<float> dequantize(const QuantizedMatrix& q, int num_threads) {
  std::vector<float> out(static_cast<size_t>(q.numel()));
  if (q.numel() > 0) dequantize(q, MatrixView<float>(out.data(), q.rows(), q.cols()), num_threads);
  return out;
}

ErrorStats quantization_error(MatrixView<const float> w, const QuantizedMatrix& q,
                              int num_threads) {
  MOQE_CHECK(w.rows() == q.rows() && w.cols() == q.cols(),
             "quantization_error: weights {} and quantized matrix [{}, {}] differ in shape",
             shape_string(w), q.rows(), q.cols());
  std::vector<RowSums> sums(static_cast<size_t>(w.rows()));
  parallel_for(w.rows(), num_threads, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(static_cast<size_t>(q.cols()));
    std::vector<float> row(static_cast<size_t>(q.cols()));
    for (int64_t r = r0; r < r1; ++r) {
      dequantize_row(q, r, row.data(), codes.data());
      sums[r] = row_sums(w.row(r), row.data(), w.cols());
    }
  });
  return finish(sums);
}

ErrorStats compare(MatrixView<const float> reference, MatrixView<const float> approx,
                   int num_threads) {
  MOQE_CHECK(reference.rows() == approx.rows() && reference.cols() == approx.cols(),
             "compare: reference {} and approximation {} differ in shape", shape_string(reference),
             shape_string(approx));
  std::vector<RowSums> sums(static_cast<size_t>(reference.rows()));
  parallel_for(reference.rows(), num_threads, kRowsPerChunk, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      sums[r] = row_sums(reference.row(r), approx.row(r), approx.cols());
  });
  return finish(sums);
}

}  // namespace moqe
