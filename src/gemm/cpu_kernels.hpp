// Private: the weight layout of the SIMD CPU kernels and their entry points. The file format
// stays as docs/formats.md describes it; QuantizedLinear repacks once, when it is built.
#pragma once

#include <cstdint>
#include <vector>

#include "moqe/core/dtypes.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::detail {

// Quantized weights repacked for the kernels. Each row is a run of blocks of 32 codes, 4 * bits
// bytes each. Within a block the codes are split into 8 lanes of 4 codes: lane i holds the codes
// of columns 8j + i (j = 0..3) in bits [bits * j, bits * (j + 1)) of a 4 * bits-bit field, and
// the lanes' fields follow each other (LSB first). Widened to eight 32-bit lanes, code j of every
// lane is one shift and one mask away, and the eight codes line up with x[8j .. 8j + 7], so no
// shuffle is needed after the load (3-bit blocks need one byte shuffle and a variable shift).
//
// Fast mode's 4-bit layout (`paired`, rows of an even number of blocks): blocks 2b and 2b + 1 of
// a row share 32 bytes, byte t holding the code at position t of block 2b in its low nibble and
// that of block 2b + 1 in its high nibble, where position t = 4i + j is column 8j + i, the order
// of the quantized activations (QuantizedX). One load, one shift and two masks give both blocks'
// code bytes lined up with the activation bytes.
//
// Exact mode reads the paired 4-bit layout too (AVX2, groups of whole pairs of blocks: the field
// kernels). Lane i of a pair's 32 bytes, as a 32-bit word, holds eight 4-bit fields: field f is the
// code of column 8 (f / 2) + 32 (f % 2) + i of the 64 columns. A field masked in place is the
// integer code x 2^e, exactly representable in fp32, so one AND and one convert give eight
// weights (e = 4f for fields 0..3; fields 4..6 are masked in the word shifted down by 16 bits,
// e = 4 (f - 4); the top field is shifted down, e = 0). The activations are handed over in field
// order and scaled by 2^-e (field_order_rows_avx2), so every product is exactly code x x, and the
// zero point comes off once per group as z x (the group's activation sum).
//
// Exact mode's signed layout (`signed_levels`, sym modes of 2, 3, 4 and 8 bits, whose zero point
// is 2^(bits - 1)): every code is stored as code XOR 2^(bits - 1), the two's complement of its
// level code - zero in `bits` bits, so the kernels get the level by sign extension (one shift pair)
// instead of a mask and a subtraction.
struct PackedQuant {
  int bits = 0;
  bool paired = false;
  bool signed_levels = false;
  int64_t n = 0, k = 0;
  int64_t group = 0, groups = 0;  // group size and groups per row
  int64_t block_bytes = 0, row_bytes = 0;
  std::vector<uint8_t> data;  // n * row_bytes, plus 16 bytes of slack for 16-byte loads
  // Scales at their stored width (fp16, or fp32 for f32 schemes) and zero points (asym only;
  // sym modes use zero_const): the same bytes as the file layout, so nothing extra is read.
  bool f16_scales = true;
  std::vector<uint16_t> scale16;  // [n, groups]
  std::vector<float> scale32;     // [n, groups]
  int zero_const = 0;
  std::vector<uint8_t> zero;  // [n, groups], asym
  float scale_at(int64_t i) const {
    return f16_scales ? half_bits_to_float(scale16[i]) : scale32[i];
  }
  int zero_at(int64_t i) const { return zero.empty() ? zero_const : zero[i]; }
  // What the kernels read: codes, scales and zero points.
  int64_t kernel_bytes() const {
    return n * row_bytes +
           static_cast<int64_t>(scale16.size() * 2 + scale32.size() * 4 + zero.size());
  }
};

// The kernels need whole blocks: K a multiple of 32 (every group size but per-channel rows of
// other lengths).
bool can_pack(const QuantizedMatrix& q);
PackedQuant pack(const QuantizedMatrix& q);
// Row n dequantized exactly as the reference does: (code - zero) * scale.
void decode_row(const PackedQuant& p, int64_t n, float* out);
// Rows of a, then rows of b (same bits, K, group size and layout).
PackedQuant concat_rows(const PackedQuant& a, const PackedQuant& b);
// Fast mode's paired 4-bit layout (see PackedQuant), in place; can_pair says when it applies (a
// fresh layout from pack(), rows of an even number of blocks).
bool can_pair(const PackedQuant& p);
void pair_blocks(PackedQuant& p);
// Exact mode's 4-bit field kernels read the paired layout: rows that can_pair whose groups are
// whole pairs of blocks (per-channel rows included).
inline bool can_field(const PackedQuant& p) { return can_pair(p) && p.group % 64 == 0; }
// Exact mode's signed layout (see PackedQuant), in place; can_sign says when it applies (a fresh
// layout, sym 2/3/4/8-bit codes).
bool can_sign(const PackedQuant& p);
void sign_levels(PackedQuant& p);
// True when a and b have the same layout (rows of a and b can be concatenated).
bool same_layout(const PackedQuant& a, const PackedQuant& b);

// y[m * ldy + n] = sum_k W[n, k] x[m * ldx + k] for n in [n0, n1) and m < mcount (1..4). The
// AVX-512 kernels take x in pair order (pair_order_rows; KernelTable::pair_order_x).
using QuantKernel = void (*)(const PackedQuant& w, const float* x, int64_t ldx, int mcount,
                             float* y, int64_t ldy, int64_t n0, int64_t n1);
// The same for any number of activation rows m, tiled for many rows (exact mode). The kernels of
// a signed_levels layout are chosen with `signed_levels`.
using QuantGemmKernel = void (*)(const PackedQuant& w, const float* x, int64_t ldx, int64_t m,
                                 float* y, int64_t ldy, int64_t n0, int64_t n1);
// Activation rows from which forward_rows uses the tiled GEMMs (QuantGemmKernel,
// DenseGemmKernel).
inline constexpr int64_t kGemmMinRows = 12;
enum class DenseKind : uint8_t { kF32, kF16, kBF16 };
// Dense rows of K elements (fp32, or fp16/bf16 bit patterns) at w.
using DenseKernel = void (*)(const void* w, int64_t k, const float* x, int64_t ldx, int mcount,
                             float* y, int64_t ldy, int64_t n0, int64_t n1);
// The same for any number of activation rows, tiled for many; K a multiple of 8.
using DenseGemmKernel = void (*)(const void* w, int64_t k, const float* x, int64_t ldx, int64_t m,
                                 float* y, int64_t ldy, int64_t n0, int64_t n1);

// Fast mode: activations quantized per 32-block to int8 once per call (QuantizedX), then integer
// dot products per block, scaled by the block's activation scale and the group's weight scale.
// Codes are permuted within each block the way PackedQuant lays them out, so the kernel reads
// weight bytes and activation bytes in the same order.
// LinearScratch (gemm/linear.hpp) holds them: q [m, k] with each 32-block permuted (byte 4i + j =
// x[8j + i]), d [m, k / 32] block scales, gsum [m, groups] = sum over the group's blocks of
// d * sum(q).
using QuantizedX = LinearScratch;
// True for the bit widths fast mode supports (4 and 8).
inline bool fast_mode_supported(int bits) { return bits == 4 || bits == 8; }
void quantize_activations(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                          QuantizedX& out);
// Sizes out for m rows of k activations in groups of `group` (gsum zeroed); quantize_activations
// fills it.
void size_quantized_x(QuantizedX& out, int64_t m, int64_t k, int64_t group);
// The fast kernels' pointers to activation rows m0 .. m0 + M - 1 of x.
template <int M>
struct FastRows {
  const int8_t* q[M];
  const float* d[M];
  const float* gsum[M];
  FastRows(const QuantizedX& x, int64_t m0) {
    for (int m = 0; m < M; ++m) {
      q[m] = x.q.data() + (m0 + m) * x.k;
      d[m] = x.d.data() + (m0 + m) * (x.k / 32);
      gsum[m] = x.gsum.data() + (m0 + m) * x.groups;
    }
  }
};
// gsum[b / per_group] += d[b] * sums[b - b0] for blocks b0 .. b1 - 1 of one row, in this order:
// shared by the scalar and SIMD quantize_activations (compiled in pack.cpp, with no FMA
// contraction), so both give the same sums.
void add_group_sums(const float* d, const int32_t* sums, int64_t b0, int64_t b1, int64_t per_group,
                    float* gsum);
// Kernels that read the activations prepare() left in the scratch: fast mode's quantized rows,
// and exact mode's field-ordered rows (FieldKernel).
using FastKernel = void (*)(const PackedQuant& w, const QuantizedX& x, int64_t m0, int mcount,
                            float* y, int64_t ldy, int64_t n0, int64_t n1);
using FieldKernel = FastKernel;

// The activations of exact mode's 4-bit field kernels (see PackedQuant): out.xp [m, k], each 64
// columns in field order (out[64 p + 8 f + i] = x[64 p + 8 (f / 2) + 32 (f % 2) + i]), scaled by
// 2^-e (see PackedQuant) when every value survives that exactly (out.xp_scaled: no nonzero
// |x| < 2^-114, nothing infinite or NaN); out.gsum [m, groups] the group sums of x times
// -zero_factor (the zero point for sym weights, whose zero point is a constant; 1 for asym, whose
// kernels multiply by each group's zero point). Otherwise
// (xp_scaled false) the values are left unscaled and the kernels take the exact levels code - z
// per field instead (one shift and one subtraction more per 8 weights): results are then the
// scalar reference's products in another order, infinities and NaN included.
// size_field_x sizes out (outside the ISA-flagged files, which must not instantiate std::vector
// growth); field_order_rows_avx2 fills it.
void size_field_x(LinearScratch& out, int64_t m, int64_t k, int64_t group);

// The kernels a layer calls, one per count of activation rows (1..4): chosen once when the layer
// is built, so a call indexes a table instead of switching on bits, mode and storage.
struct KernelTable {
  QuantKernel quant[4] = {};
  QuantGemmKernel quant_gemm = nullptr;
  DenseGemmKernel dense_gemm = nullptr;
  FastKernel fast[4] = {};
  FieldKernel fields[4] = {};  // exact 4-bit kernels over the paired layout (LinearScratch::xp)
  DenseKernel dense[4] = {};
  bool pair_order_x = false;  // quant[] reads x in pair order (LinearScratch::xp)
};

// The AVX-512 kernels read pairs of blocks: rows of an even number of blocks whose groups are one
// block or whole pairs (per-channel rows included). Their exact kernels take the activations in
// pair order: for each 64 columns, out[16 j + 8 h + i] = x[32 h + 8 j + i] (h < 2, j < 4, i < 8),
// so field j of a pair of blocks lines up with 16 consecutive values. k is a multiple of 64.
void pair_order_rows(const float* x, int64_t ldx, int64_t m, int64_t k, std::vector<float>& out);
inline bool avx512_fits(const PackedQuant& p) {
  return p.k % 64 == 0 && (p.group == 32 || p.group % 64 == 0);
}

#if defined(MOQE_HAVE_AVX2_KERNELS)
QuantKernel quant_kernel_avx2(int bits, int mcount, bool signed_levels);
// `paired`: exact 4-bit rows in the paired layout (can_field).
QuantGemmKernel quant_gemm_kernel_avx2(int bits, bool signed_levels, bool paired);
FieldKernel field_kernel_avx2(int mcount);
void field_order_rows_avx2(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                           int zero_factor, LinearScratch& out);
DenseKernel dense_kernel_avx2(DenseKind kind, int mcount);
DenseGemmKernel dense_gemm_kernel_avx2(DenseKind kind);
// `paired`: the kernel for the paired 4-bit layout.
FastKernel fast_kernel_avx2(int bits, int mcount, bool paired);
// quantize_activations in AVX2, bit for bit the same.
void quantize_activations_avx2(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                               QuantizedX& out);
#endif
#if defined(MOQE_HAVE_AVX512_KERNELS)
// Rows that avx512_fits. Fast mode: 8-bit codes and the paired 4-bit layout (nullptr otherwise).
QuantKernel quant_kernel_avx512(int bits, int mcount, bool signed_levels);
FastKernel fast_kernel_avx512vnni(int bits, int mcount, bool paired);
#endif

}  // namespace moqe::detail
