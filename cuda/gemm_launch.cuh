// Private to cuda/: the argument block of the GEMM kernels and the launchers that the
// instantiation units (gemm_mma_*.cu, gemm_simple.cu) define, one per configuration.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "activation.cuh"
#include "moqe/core/config.hpp"

namespace moqe::cuda::detail {

enum class OutType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// Everything a GEMM kernel reads; passed by value (kernel parameter space).
struct GemmArgs {
  const void* x = nullptr;  // activations, [rows, k] with row stride ldx (elements)
  int64_t ldx = 0;
  void* y = nullptr;  // output, [rows, n] with row stride ldy (elements)
  int64_t ldy = 0;
  OutType out_type = OutType::kF16;
  const int64_t* offsets = nullptr;  // [E + 1] (grouped), or nullptr: one expert of m rows
  // Grouped: blockIdx.z indexes this device list of the experts with rows (-1: none), when
  // given, instead of every expert (a decode step's grid holds only its active experts).
  const int32_t* expert_list = nullptr;
  int64_t m = 0;
  int n = 0, k = 0;
  int expert = 0;  // first expert (blockIdx.z, or expert_list[blockIdx.z], is added)
  // Weights of expert e start at base + e * stride.
  const uint8_t* qweight = nullptr;
  int64_t qweight_stride = 0;
  const void* scales = nullptr;  // fp16 (scales_f16) or fp32
  bool scales_f16 = false;
  int64_t scales_stride = 0;       // elements
  const uint8_t* zeros = nullptr;  // nullptr: every group's zero is zero_const
  int64_t zeros_stride = 0;
  int zero_const = 0;
  int group_size = 0;  // resolved (K for per channel)
  int groups = 0;      // k / group_size
  int bits = 0;
  int64_t row_bytes = 0;  // packed bytes per row (kSimple layout)
  int warps = 1;          // mma kernel: warps per block (mma_warps)
  int tiles = 0;          // mma kernel: 16-row tiles of the packed weights (grid.y)
  int64_t hi_offset = 0;  // mma kernel, 3-bit codes: bytes from an expert's codes to its hi plane
  // The epilogue (GemmEpilogue). glu: the GLU pair layout (mma) or [gate; up] rows with up row
  // n at glu_rows + n (simple); n counts outputs (I). act: an Activation, or -1 for none.
  bool glu = false;
  int64_t glu_rows = 0;
  int act = -1;
  const float* row_scale = nullptr;  // y row r *= row_scale[row_index ? row_index[r] : r]
  const int32_t* row_index = nullptr;
};

// The mma kernel's weight layout and conversion constants: moqe/cuda/mma_layout.hpp.

// Scale i of an fp16 or fp32 scale array (uniform branch, once per group).
__device__ __forceinline__ float load_scale(const void* scales, int64_t i, bool f16) {
  return f16 ? __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(scales) + i)))
             : __ldg(static_cast<const float*>(scales) + i);
}

// Writes element i of an output of type `type` (uniform branch: one kernel serves all three).
__device__ __forceinline__ void store_out(void* y, int64_t i, OutType type, float v) {
  if (type == OutType::kF16) {
    static_cast<__half*>(y)[i] = __float2half_rn(v);
  } else if (type == OutType::kBF16) {
    static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(y)[i] = v;
  }
}

// The epilogue of output element (x row `row`, any column): v is the accumulated value (the gate
// for a GLU matrix), up the matching up value (GLU only). fp32 throughout; GemmEpilogue's order.
__device__ __forceinline__ float epilogue(const GemmArgs& p, float v, float up, int64_t row) {
  if (p.act >= 0) v = activate_dev(static_cast<Activation>(p.act), v);
  if (p.glu) v *= up;
  if (p.row_scale != nullptr) {
    v *= p.row_scale[p.row_index != nullptr ? static_cast<int64_t>(p.row_index[row]) : row];
  }
  return v;
}

// Warps per block of the mma kernel (they split K; blockDim.x = 32 * warps) for `blocks` blocks of
// work (tiles x token blocks x experts with rows) on `sms` multiprocessors: doubled from 1 while
// the grid holds fewer warps than the GPU keeps resident (16 per SM at ~128 registers), each
// warp keeps at least 2 chunks of K, and up to 8. Large N gets few warps per block and many
// blocks (one balanced wave); small N splits K further to keep enough loads in flight.
inline int mma_warps(int k, int64_t blocks, int sms) {
  const int chunks = k / 32;
  int w = 1;
  while (w < 8 && 4 * w <= chunks && blocks * w < 16 * static_cast<int64_t>(sms)) w *= 2;
  return w;
}
// The one list of mma kernel configurations, X(bits, act, token tiles of 8 rows): the
// instantiation units and the dispatch table of gemm.cu are generated from it. A new width or
// tile size is added here (and to the dispatch's index functions).
// clang-format off
#define MOQE_GEMM_MMA_CONFIGS(X, act)                  \
  X(2, act, 1) X(2, act, 2) X(2, act, 4)               \
  X(3, act, 1) X(3, act, 2) X(3, act, 4)               \
  X(4, act, 1) X(4, act, 2) X(4, act, 4)               \
  X(8, act, 1) X(8, act, 2) X(8, act, 4)
// clang-format on

// The mma kernel for kBits-bit codes, activations TAct (0 = fp16, 1 = bf16) and kMT token tiles
// of 8; m_blocks blocks along the token dimension, `experts` along z.
template <int kBits, int kAct, int kMT>
void launch_gemm_mma(const GemmArgs& args, int64_t m_blocks, int experts, cudaStream_t stream);

// The simple kernel (every scheme, the file layout).
template <int kAct>
void launch_gemm_simple(const GemmArgs& args, int64_t m_blocks, int experts, cudaStream_t stream);

}  // namespace moqe::cuda::detail
