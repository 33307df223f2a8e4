// Instantiation unit: the simple GEMM kernel, for every scheme and K (the fallback for K not a
// multiple of 32) and a second device oracle in the tests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "check.cuh"
#include "gemm_launch.cuh"
#include "moqe/quant/packing.hpp"

namespace moqe::cuda::detail {
namespace {

template <int kAct>
__device__ __forceinline__ float act_to_float(uint16_t bits) {
  if constexpr (kAct == 0) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
}

// One warp per output element: warp w of block (bx, by, bz) computes output n = by * 8 + w for
// the tokens bx, bx + gridDim.x, ... of expert bz. The file layout (packed rows, scales [N,
// groups], zeros [N, groups]); lane l takes columns l, l + 32, ... of each group. The numerics are
// the mma path's: per group an fp32 sum of x (q - z) (each product exact: <= 11 x 8 significant
// bits), scaled once per group, then a butterfly sum over the lanes. A GLU matrix ([gate; up] rows)
// computes rows n and glu_rows + n and hands both to the epilogue.
template <int kAct>
__global__ void __launch_bounds__(256) gemm_simple_kernel(const GemmArgs p) {
  int z = static_cast<int>(blockIdx.z);
  if (p.expert_list != nullptr) {
    z = p.expert_list[z];
    if (z < 0) return;  // fewer experts with rows than the grid holds
  }
  const int64_t e = p.expert + z;
  int64_t row0 = 0, rows = p.m;
  if (p.offsets != nullptr) {
    row0 = p.offsets[z];
    rows = p.offsets[z + 1] - row0;
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * 8 + (threadIdx.x >> 5);
  if (n >= p.n) return;
  const int64_t group = p.group_size;
  // The full dot product of x with weight row `wr` of expert e, in every lane.
  auto dot = [&](const uint16_t* x, int64_t wr) {
    const uint8_t* wrow = p.qweight + e * p.qweight_stride + wr * p.row_bytes;
    const int64_t srow = e * p.scales_stride + wr * p.groups;  // the row's first scale
    const uint8_t* zrow =
        p.zeros != nullptr ? p.zeros + e * p.zeros_stride + wr * p.groups : nullptr;
    float acc = 0.0f;
    for (int gi = 0; gi < p.groups; ++gi) {
      const int zero = zrow != nullptr ? zrow[gi] : p.zero_const;
      float part = 0.0f;
      for (int64_t k = gi * group + lane; k < (gi + 1) * group; k += 32) {
        const int q = static_cast<int>(unpack_code(wrow, k, p.bits)) - zero;
        part = fmaf(act_to_float<kAct>(x[k]), static_cast<float>(q), part);
      }
      acc = fmaf(load_scale(p.scales, srow + gi, p.scales_f16), part, acc);
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, d);
    return acc;
  };
  for (int64_t m = blockIdx.x; m < rows; m += gridDim.x) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + (row0 + m) * p.ldx;
    const float v = dot(x, n);
    const float up = p.glu ? dot(x, p.glu_rows + n) : 0.0f;
    if (lane == 0) {
      store_out(p.y, (row0 + m) * p.ldy + n, p.out_type, epilogue(p, v, up, row0 + m));
    }
  }
}

}  // namespace

template <int kAct>
void launch_gemm_simple(const GemmArgs& args, int64_t m_blocks, int experts, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>((args.n + 7) / 8),
                  static_cast<unsigned>(experts));
  gemm_simple_kernel<kAct><<<grid, 256, 0, stream>>>(args);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

template void launch_gemm_simple<0>(const GemmArgs&, int64_t, int, cudaStream_t);
template void launch_gemm_simple<1>(const GemmArgs&, int64_t, int, cudaStream_t);

}  // namespace moqe::cuda::detail
