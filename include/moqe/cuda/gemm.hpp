// Mixed-precision GEMM on the GPU: y [M, N] = x [M, K] . W^T with fp16 or bf16 activations and
// W quantized (int8/4/3/2, sym, sym_full or asym, per channel or in groups), plus a grouped
// variant that runs every expert of an MoE layer in one launch. No CUDA header is needed here.
//
// Numerics. The codes are dequantized in registers to the exact integers (q - z), which fp16 and
// bf16 hold exactly for every supported width (|q - z| <= 255); the tensor cores multiply them by
// the activations (exact products) and accumulate in fp32 per group, and each group's partial sum
// is scaled once in fp32: y = sum_g s_g * sum_{k in g} x_k (q_k - z_g). No weight is ever
// rounded, so against the CPU reference (QuantizedLinear, Numerics::kExact) evaluated on the same
// fp16/bf16-rounded activations the result differs only by fp32 summation (order, and the tensor
// cores' accumulation, which aligns to the largest term and truncates: one m16n8k16 step loses at
// most 17 units of 2^-23 of sum_k |x_k| |w_k|) and by the final rounding of y to its storage type.
// The activations' own rounding to fp16/bf16 is the caller's: x arrives in that type.
// tests/cuda/test_gemm.cpp derives the bound step by step.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "moqe/core/dtypes.hpp"
#include "moqe/core/view.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/moe/activation.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::cuda {

namespace detail {
struct GemmAccess;
}  // namespace detail

// Which kernel a weight object is laid out for.
//   kMma:    tensor cores (mma.sync m16n8k16, sm_80+), weights re-laid out at load into the
//            per-lane fragment order (moqe/cuda/mma_layout.hpp); every width, K a multiple of 32.
//   kSimple: one warp per output element over the file layout; every scheme and K. The fallback
//            for K not a multiple of 32 (per-channel rows of odd length) and a second device
//            oracle in the tests.
//   kAuto:   kMma where it applies, else kSimple.
enum class GemmPath : uint8_t { kAuto, kMma, kSimple };

// Empty when `path` can run `scheme` on rows of k weights, else the reason.
std::string check_gemm_path(GemmPath path, const QuantScheme& scheme, int64_t k);

// What the GEMM does to each fp32 output in registers before rounding it to y's type, in order:
//   1. activation: y = act(y) when `activate` (for a GLU matrix, act of the gate value; the
//      identity when not `activate`);
//   2. a GLU matrix (DeviceQuantizedMatrix::stack_glu) multiplies by the up value: act(g) * u;
//   3. row scale: y[r, :] *= row_scale[row_index ? row_index[r] : r] when row_scale is set
//      (device arrays; r counts x's rows, across all experts for gemm_grouped): an MoE layer's
//      routing weights, applied to its expert rows before combining.
// Each step is one fp32 operation on the values an unfused sequence of kernels would compute.
// (An MoE layer that scaled by its routing weights while combining could contract that product
// into the combine's sum; scaling here rounds it separately: at most an ulp per slot.)
struct GemmEpilogue {
  bool activate = false;
  Activation activation = Activation::kSilu;
  const float* row_scale = nullptr;
  const int32_t* row_index = nullptr;
};

// One or more quantized weight matrices of the same shape and scheme, resident on the device in
// the layout of the kernel chosen when it was built (the choice is kept, not redone per call).
// A single matrix is a stack of one; a stack of E is an MoE layer's experts for gemm_grouped.
class DeviceQuantizedMatrix {
 public:
  DeviceQuantizedMatrix() = default;
  // Uploads q (synchronously). Throws moqe::Error when `path` cannot run q's scheme.
  explicit DeviceQuantizedMatrix(const QuantizedMatrix& q, GemmPath path = GemmPath::kAuto);
  // Uploads experts [E] (E >= 1) that share shape and scheme; the message names the first
  // expert that differs.
  static DeviceQuantizedMatrix stack(std::span<const QuantizedMatrix> experts,
                                     GemmPath path = GemmPath::kAuto);
  // The gate and up projections of E experts (gate[e] and up[e]: [I, K], one shape and scheme
  // for all) as one GLU matrix: a GEMM over it computes act(x . gate^T) * (x . up^T), [M, I], in
  // one pass (GemmEpilogue), with gate and up of an output in the same thread's registers (the
  // pair layout of moqe/cuda/mma_layout.hpp). rows() is I.
  static DeviceQuantizedMatrix stack_glu(std::span<const QuantizedMatrix> gate,
                                         std::span<const QuantizedMatrix> up,
                                         GemmPath path = GemmPath::kAuto);

  int64_t num_experts() const { return experts_; }
  int64_t rows() const { return n_; }  // N, out_features (I for a GLU matrix)
  int64_t cols() const { return k_; }  // K, in_features
  const QuantScheme& scheme() const { return scheme_; }
  int64_t group_size() const { return group_; }
  // The resolved path: kMma or kSimple.
  GemmPath path() const { return path_; }
  // True for a GLU matrix (stack_glu).
  bool glu() const { return glu_; }
  // Device bytes held (codes, scales, zero points) for all experts.
  int64_t device_bytes() const {
    return static_cast<int64_t>(qweight_.size() + scales_.size() + zeros_.size());
  }

 private:
  friend struct detail::GemmAccess;  // the launchers in cuda/ read the buffers
  // Uploads experts ([N, K] each, or [2I, K] = [gate; up] rows for glu).
  static DeviceQuantizedMatrix build(std::span<const QuantizedMatrix> experts, GemmPath path,
                                     bool glu);
  int64_t experts_ = 0, n_ = 0, k_ = 0, group_ = 0;
  int64_t tiles_ = 0;  // 16-row tiles of the mma layout
  QuantScheme scheme_{};
  GemmPath path_ = GemmPath::kSimple;
  bool glu_ = false;
  // Codes, scales (fp16 when they all are fp16 values, as the kF16 scale type stores them; else
  // fp32) and zero points of all experts; expert e's start at e * stride (bytes for codes and
  // zeros, elements for scales).
  DeviceBuffer qweight_, scales_, zeros_;
  bool scales_f16_ = false;
  int64_t qweight_stride_ = 0, scales_stride_ = 0, zeros_stride_ = 0;
};

// y [M, N] = epilogue(x [M, K] . W_e^T) for expert `expert` of w (0 for a single matrix). x and
// y are device memory; y may be strided; x's rows must start on 16-byte boundaries for the kMma
// path (row stride a multiple of 8 elements, data 16-byte aligned). M = 0 is a no-op.
// Asynchronous on `stream`; no allocation. TIn: Half or BFloat16; TOut: Half, BFloat16 or float.
template <class TIn, class TOut>
void gemm(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, MatrixView<TOut> y,
          const GemmEpilogue& epilogue, Stream stream = nullptr, int64_t expert = 0);
template <class TIn, class TOut>
void gemm(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, MatrixView<TOut> y,
          Stream stream = nullptr, int64_t expert = 0) {
  gemm(x, w, y, GemmEpilogue{}, stream, expert);
}

// The grouped GEMM of an MoE layer in one launch: rows [offsets[e], offsets[e+1]) of x and y
// belong to expert e, whose weights are w's expert e; y rows = x rows (= offsets[E], which the
// host passes as x.rows()). `offsets` is a device array of E + 1 non-decreasing int64 values
// starting at 0. An expert with no rows reads no weights; nothing is padded. `max_rows_hint`, an
// estimate of the largest expert's rows (< 0: x.rows()), only sets how many blocks run per expert:
// results never depend on it. `expert_list` (optional, device int32 [min(E, x.rows())]): the
// experts that have rows, each once, any order, the rest of the entries -1 (build_dispatch makes
// it): the launch then covers those entries instead of all E experts (at one token of an 8-expert
// top-2 layer, 2 of 8; of a 256-expert top-8 layer, 8 of 256). Results are the same.
template <class TIn, class TOut>
void gemm_grouped(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, const int64_t* offsets,
                  MatrixView<TOut> y, const GemmEpilogue& epilogue, Stream stream = nullptr,
                  int64_t max_rows_hint = -1, const int32_t* expert_list = nullptr);
template <class TIn, class TOut>
void gemm_grouped(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, const int64_t* offsets,
                  MatrixView<TOut> y, Stream stream = nullptr, int64_t max_rows_hint = -1) {
  gemm_grouped(x, w, offsets, y, GemmEpilogue{}, stream, max_rows_hint);
}

#define MOQE_CUDA_GEMM_EXTERN(TIn, TOut)                                                        \
  extern template void gemm<TIn, TOut>(MatrixView<const TIn>, const DeviceQuantizedMatrix&,     \
                                       MatrixView<TOut>, const GemmEpilogue&, Stream, int64_t); \
  extern template void gemm_grouped<TIn, TOut>(                                                 \
      MatrixView<const TIn>, const DeviceQuantizedMatrix&, const int64_t*, MatrixView<TOut>,    \
      const GemmEpilogue&, Stream, int64_t, const int32_t*);
MOQE_CUDA_GEMM_EXTERN(Half, Half)
MOQE_CUDA_GEMM_EXTERN(Half, BFloat16)
MOQE_CUDA_GEMM_EXTERN(Half, float)
MOQE_CUDA_GEMM_EXTERN(BFloat16, Half)
MOQE_CUDA_GEMM_EXTERN(BFloat16, BFloat16)
MOQE_CUDA_GEMM_EXTERN(BFloat16, float)
#undef MOQE_CUDA_GEMM_EXTERN

}  // namespace moqe::cuda
