#include <climits>
#include <cmath>

#include "check.cuh"
#include "moqe/cuda/quantize.hpp"
#include "moqe/quant/numerics.hpp"
#include "moqe/quant/packing.hpp"

namespace moqe::cuda {
namespace {

// One thread per group: the reference quantize_group writes the group's codes (one byte each)
// and its stored scale and zero point. The first group (flat index) whose scale is not finite
// is recorded for the error message.
__global__ void quantize_groups(const float* __restrict__ w, int64_t rows, int64_t cols,
                                int64_t group, int bits, QuantMode mode, ScaleType scale_type,
                                uint8_t* __restrict__ codes, float* __restrict__ scales,
                                uint8_t* __restrict__ zeros, unsigned long long* bad) {
  const int64_t groups = cols / group;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t r = i / groups, j = i % groups;
  const int64_t at = r * cols + j * group;
  const GroupParams p = quantize_group(w + at, group, bits, mode, scale_type, codes + at);
  scales[i] = p.scale;
  if (zeros != nullptr) zeros[i] = static_cast<uint8_t>(p.zero);
  if (!isfinite(p.scale)) atomicMin(bad, static_cast<unsigned long long>(i));
}

// One thread per packed byte: byte b of a row holds bits [8b, 8b + 8) of the row's
// little-endian bit stream, i.e. parts of codes 8b / bits .. (8b + 7) / bits.
__global__ void pack_codes(const uint8_t* __restrict__ codes, int64_t rows, int64_t cols, int bits,
                           int64_t row_bytes, uint8_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * row_bytes) return;
  const int64_t r = i / row_bytes, b = i % row_bytes;
  const uint8_t* row = codes + r * cols;
  const int64_t bit0 = 8 * b;
  uint32_t v = 0;
  for (int64_t j = bit0 / bits; j < cols && j * bits < bit0 + 8; ++j) {
    const int64_t shift = j * bits - bit0;  // may be negative for a code that began earlier
    const uint32_t c = row[j];
    v |= shift >= 0 ? c << shift : c >> -shift;
  }
  out[i] = static_cast<uint8_t>(v & 0xffu);
}

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  MOQE_CHECK(b <= INT_MAX, "cuda::quantize: {} elements need too many blocks", n);
  return static_cast<unsigned>(b);
}

}  // namespace

QuantizedMatrix quantize(MatrixView<const float> w, const QuantScheme& scheme,
                         std::string_view name, Stream stream) {
  const int64_t rows = w.rows(), cols = w.cols();
  validate_scheme(scheme, cols, MOQE_FORMAT("tensor '{}' of shape [{}, {}]", name, rows, cols));
  check_finite(w, name);
  const int64_t group = scheme.resolved_group_size(cols);
  const int64_t groups = group == 0 ? 0 : cols / group;
  const int64_t row_bytes = packed_row_bytes(cols, scheme.bits);
  std::vector<uint8_t> qweight(static_cast<size_t>(rows * row_bytes));
  std::vector<float> scales(static_cast<size_t>(rows * groups));
  std::vector<uint8_t> zeros(scheme.has_zeros() ? scales.size() : 0);
  if (rows * cols > 0) {
    // The view may be strided: upload row by row into a dense buffer.
    DeviceBuffer dw(static_cast<size_t>(rows * cols) * sizeof(float));
    if (w.row_stride() == cols) {
      dw.upload(w.data(), dw.size());
    } else {
      std::vector<float> dense(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(w.row(r), w.row(r) + cols, dense.begin() + r * cols);
      }
      dw.upload(std::span<const float>(dense));
    }
    DeviceBuffer codes(static_cast<size_t>(rows * cols)), qw(qweight.size()),
        sc(scales.size() * sizeof(float)), zs(zeros.size()), bad(sizeof(unsigned long long));
    const unsigned long long none = ULLONG_MAX;
    bad.upload(&none, sizeof none);
    constexpr int kThreads = 128;
    quantize_groups<<<blocks_for(rows * groups, kThreads), kThreads, 0, stream>>>(
        dw.as<float>(), rows, cols, group, scheme.bits, scheme.mode, scheme.scale_type,
        codes.as<uint8_t>(), sc.as<float>(), zeros.empty() ? nullptr : zs.as<uint8_t>(),
        bad.as<unsigned long long>());
    MOQE_CUDA_CHECK(cudaGetLastError());
    pack_codes<<<blocks_for(rows * row_bytes, 256), 256, 0, stream>>>(
        codes.as<uint8_t>(), rows, cols, scheme.bits, row_bytes, qw.as<uint8_t>());
    MOQE_CUDA_CHECK(cudaGetLastError());
    MOQE_CUDA_CHECK(cudaStreamSynchronize(stream));
    unsigned long long first_bad = none;
    bad.download(&first_bad, sizeof first_bad);
    if (first_bad != none) {
      const int64_t r = static_cast<int64_t>(first_bad) / groups;
      const int64_t j = static_cast<int64_t>(first_bad) % groups;
      float m_abs = 0;
      for (int64_t c = j * group; c < (j + 1) * group; ++c)
        m_abs = std::max(m_abs, std::fabs(w(r, c)));
      MOQE_FAIL(
          "tensor '{}': the scale of row {}, group {} (columns {}..{}, max |w| = {}) overflows {}; "
          "use fp32 scales",
          name, r, j, j * group, (j + 1) * group - 1, m_abs, to_string(scheme.scale_type));
    }
    qw.download(std::span<uint8_t>(qweight));
    sc.download(std::span<float>(scales));
    if (!zeros.empty()) zs.download(std::span<uint8_t>(zeros));
  }
  return QuantizedMatrix::from_parts(rows, cols, scheme, std::move(qweight), std::move(scales),
                                     std::move(zeros), name);
}

}  // namespace moqe::cuda
