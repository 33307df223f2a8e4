// QuantizedLinear: y = x . W^T for a weight W [N, K] held in any of moqe's schemes or unquantized
// (fp32, fp16 or bf16 storage). The kernel is chosen once, when the layer is built, from
// active_cpu_isa(): the SIMD kernels (AVX2, AVX-512) dequantize in registers and apply each group's
// scale once; the reference path decodes one row at a time and takes fixed-order dot products
// (gemm/reference.hpp), so under it a quantized layer and an fp32 layer holding its dequantized
// weights agree bit for bit. SIMD results agree with the reference to fp32 rounding.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moqe/core/activations.hpp"
#include "moqe/core/cpu.hpp"
#include "moqe/core/view.hpp"
#include "moqe/io/dtype.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe {

namespace detail {
struct PackedQuant;
struct KernelTable;
}  // namespace detail

enum class WeightStorage : uint8_t { kF32, kF16, kBF16, kQuantized };

// Per-call data derived from the activations, computed once by QuantizedLinear::prepare and
// shared by every row range: in fast mode, the int8 activations with their block scales; for
// exact mode's AVX-512 kernels, the activations in the column order they read. Reused between
// calls without reallocation.
struct LinearScratch {
  int64_t m = 0, k = 0, groups = 0;
  std::vector<int8_t> q;      // [m, k], fast mode
  std::vector<float> d;       // [m, k / 32], fast mode
  std::vector<float> gsum;    // [m, groups], fast mode; AVX2 4-bit exact kernels: -z x group sums
  std::vector<float> xp;      // [m, k], AVX-512 exact kernels and AVX2 4-bit ones (decode batches)
  bool xp_scaled = false;     // AVX2 4-bit exact kernels: xp holds x scaled per code field
  std::vector<float> xorder;  // [m, k]: x in a matrix's stored column order (act-order weights)
};

// kExact keeps docs/design.md's numerics with fp32 activations: the dequantized weights
// times x, summed in fp32 in the kernel's order (SIMD kernels sum in another order than the
// reference, and AVX2's 4-bit kernels take the zero point off through each group's activation
// sum), so results agree with the reference kernel to fp32 rounding. kFast (opt-in) quantizes the
// activations per 32-block to int8 once per call and takes integer dot products: faster, with an
// extra activation rounding error (about 0.5% relative output error; bench/README.md). Fast mode
// covers 4- and 8-bit weights on AVX2 and AVX-512 VNNI; other layers run exact (numerics() says
// which).
enum class Numerics : uint8_t { kExact, kFast };

class QuantizedLinear {
 public:
  QuantizedLinear() = default;
  static QuantizedLinear from_quantized(QuantizedMatrix q, Numerics numerics = Numerics::kExact);
  static QuantizedLinear from_f32(std::vector<float> w, int64_t n, int64_t k);
  // fp16 or bf16 bit patterns, kept at 2 bytes per weight and decoded per row.
  static QuantizedLinear from_half(std::vector<uint16_t> bits, DType dtype, int64_t n, int64_t k);
  // Rows of `a` then rows of `b` in one matrix (gate and up fused). Both must share storage, K and,
  // when quantized, the scheme; check can_concat first.
  static bool can_concat(const QuantizedLinear& a, const QuantizedLinear& b);
  static QuantizedLinear concat_rows(const QuantizedLinear& a, const QuantizedLinear& b);
  // A copy that owns the weight memory its kernel reads (copies share it otherwise); benchmarks
  // rotate among clones to read cold weights.
  QuantizedLinear clone() const;

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  WeightStorage storage() const { return storage_; }
  bool is_quantized() const { return storage_ == WeightStorage::kQuantized; }
  // The quantization scheme (quantized storage only).
  const QuantScheme& scheme() const { return scheme_; }
  // Bytes of weight storage held and read by a forward pass: the file layout's bytes, or for the
  // SIMD kernels the repacked codes plus fp32 scales and zero-point offsets (the file layout is
  // not kept then, so memory is not doubled).
  int64_t weight_bytes() const;
  // "int4 sym g128 f16", "f32", "bf16".
  std::string describe() const;
  // The instruction set of the kernels chosen when the layer was built, for 1-4 activation rows at
  // a time (decode). Dense weights and the prefill GEMM (12 or more rows) run AVX2 kernels on
  // AVX-512 machines too.
  CpuIsa isa() const { return isa_; }
  // The numerics forward() uses (kFast only where fast mode applies).
  Numerics numerics() const { return numerics_; }

  // Row n of W in fp32 (dequantized or converted) into out[0..K).
  void decode_row(int64_t n, float* out) const;
  // W in fp32 [N, K] (dequantized or converted).
  std::vector<float> to_f32() const;

  // y [M, N] = x [M, K] . W^T (y may be a strided view). Parallel over N; no allocation once each
  // thread has decoded a row of this size.
  void forward(MatrixView<const float> x, MatrixView<float> y, int num_threads = 0) const;
  // fp16 / bf16 activations: x is widened to fp32 once per call and y rounded once, so the result
  // is the fp32 call's on the widened x, rounded (core/activations.hpp).
  template <HalfActivation T>
  void forward(MatrixView<const T> x, MatrixView<T> y, int num_threads = 0) const;
  // The same in two steps, for callers that schedule row ranges themselves (grouped experts):
  // prepare() once per input, then forward_rows() for any ranges [n0, n1) (single-threaded; ranges
  // may run concurrently on different threads).
  void prepare(MatrixView<const float> x, LinearScratch& scratch) const;
  void forward_rows(MatrixView<const float> x, const LinearScratch& scratch, MatrixView<float> y,
                    int64_t n0, int64_t n1) const;

 private:
  int64_t n_ = 0, k_ = 0;
  WeightStorage storage_ = WeightStorage::kF32;
  // Shared so that copies of a layer (task sub-networks, fused views) do not copy weights.
  std::shared_ptr<const std::vector<float>> f32_;
  std::shared_ptr<const std::vector<uint16_t>> half_;
  std::shared_ptr<const QuantizedMatrix> q_;            // the file layout (reference kernels)
  std::shared_ptr<const detail::PackedQuant> packed_;   // the SIMD layout, when isa_ uses one
  std::shared_ptr<const detail::KernelTable> kernels_;  // the SIMD kernels, when isa_ uses them
  // The matrix's input order (QuantizedMatrix::input_order), when it has one.
  std::shared_ptr<const std::vector<int32_t>> order_;
  QuantScheme scheme_{};  // quantized storage, as given
  int64_t group_ = 0;     // its resolved group size
  CpuIsa isa_ = CpuIsa::kReference;
  Numerics numerics_ = Numerics::kExact;
  void choose_kernel(Numerics requested = Numerics::kExact);
};

extern template void QuantizedLinear::forward<Half>(MatrixView<const Half>, MatrixView<Half>,
                                                    int) const;
extern template void QuantizedLinear::forward<BFloat16>(MatrixView<const BFloat16>,
                                                        MatrixView<BFloat16>, int) const;

}  // namespace moqe
