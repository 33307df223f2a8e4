#include "check.cuh"
#include "moqe/cuda/dequantize.hpp"
#include "moqe/quant/numerics.hpp"
#include "moqe/quant/packing.hpp"

namespace moqe::cuda {
namespace {

// One thread per output element; row r, column c reads its packed code from row r's bytes
// (little-endian bit stream) and its group's scale and zero point. zeros == nullptr means the
// symmetric offset `zero_const`.
__global__ void dequantize_kernel(const uint8_t* __restrict__ qweight,
                                  const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, int zero_const, int64_t rows,
                                  int64_t cols, int64_t row_bytes, int64_t group, int bits,
                                  float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols, g = r * (cols / group) + c / group;
  const uint32_t code = unpack_code(qweight + r * row_bytes, c, bits);
  out[i] = dequantize_code(code, zeros != nullptr ? zeros[g] : zero_const, scales[g]);
}

}  // namespace

void dequantize(const QuantizedMatrix& q, std::span<float> out, Stream stream) {
  MOQE_CHECK(static_cast<int64_t>(out.size()) == q.numel(),
             "cuda::dequantize: output holds {} floats, the matrix [{}, {}] needs {}", out.size(),
             q.rows(), q.cols(), q.numel());
  if (q.numel() == 0) return;
  DeviceBuffer qw(q.qweight().size_bytes()), sc(q.scales().size_bytes()),
      zs(q.zeros().size_bytes()), y(out.size_bytes());
  qw.upload(q.qweight());
  sc.upload(q.scales());
  zs.upload(q.zeros());
  constexpr int kThreads = 256;
  const int64_t blocks = (q.numel() + kThreads - 1) / kThreads;
  dequantize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      qw.as<uint8_t>(), sc.as<float>(), q.scheme().has_zeros() ? zs.as<uint8_t>() : nullptr,
      q.scheme().code_offset(), q.rows(), q.cols(), q.row_bytes(), q.group_size(), q.bits(),
      y.as<float>());
  MOQE_CUDA_CHECK(cudaGetLastError());
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream));
  y.download(out);
}

}  // namespace moqe::cuda
