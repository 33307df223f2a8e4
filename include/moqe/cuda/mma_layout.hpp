// The weight layout and code-conversion constants of the tensor-core GEMM path (cuda/gemm_mma.cuh),
// shared by the device kernels, the host-side re-layout and a host emulation in the tests.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moqe/core/config.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::cuda::mma {

// W [N, K] is cut into tiles of 16 rows (the M of mma.sync m16n8k16; the kernel computes
// y^T = W . x^T) and chunks of 32 columns (two k16 steps). Within a tile, chunk c of lane l
// (g = l / 4, t = l % 4) is 16 codes, chunk_bytes(bits) bytes at
// ((tile * chunks + c) * 32 + l) * chunk_bytes(bits): a warp reads a chunk as one coalesced line.
// The 16 codes form 8 pairs p = 4 s + r (k16 step s, A-fragment register r): rows
// pair_row(p, g), columns 32 c + pair_col(p, t) + {0, 1}. The mma sums over its 16 k slots in
// any order, so k slot 2t + j (j < 2) of step s carries column 8t + 4s + j and slot 2t + 8 + j
// column 8t + 4s + 2 + j: lane (g, t)'s activations of chunk c are then the 8 contiguous values
// x[32 c + 8 t, +8), one 16-byte load for both steps (B registers: step s uses words 2s, 2s + 1).
// Both steps stay in one group (groups are multiples of 32 columns). Pair p sits in 32-bit word
// p / (16 / bits) at bit b = bits * (p % (16 / bits)) (first column) and b + 16 (second), so one
// shift and one mask give both codes of a half2. Words are little-endian.
// 3-bit codes are stored in two planes: first the low two bits of every code in the 2-bit layout
// (one 32-bit word per lane and chunk), then the high bits (one 16-bit word per lane and chunk,
// at hi_plane_offset: bit p holds bit 2 of pair p's first code, bit 8 + p that of its second).
inline constexpr int kTileRows = 16;
inline constexpr int kChunkCols = 32;
MOQE_HOST_DEVICE constexpr int chunk_bytes(int bits) { return 2 * bits; }
// Byte offset of the 3-bit high plane within one expert's codes.
MOQE_HOST_DEVICE constexpr int64_t hi_plane_offset(int64_t tiles, int64_t chunks) {
  return tiles * chunks * 32 * 4;
}
// The width whose word layout holds the (low bits of the) codes.
MOQE_HOST_DEVICE constexpr int word_bits(int bits) { return bits == 3 ? 2 : bits; }
MOQE_HOST_DEVICE constexpr int pair_row(int p, int g) { return g + ((p & 1) ? 8 : 0); }
MOQE_HOST_DEVICE constexpr int pair_col(int p, int t) { return 8 * t + 4 * (p >> 2) + (p & 2); }
// For 2-, 4- and 8-bit codes (3-bit: of their low plane, word_bits(3) = 2).
MOQE_HOST_DEVICE constexpr int pairs_per_word(int bits) { return 16 / bits; }
MOQE_HOST_DEVICE constexpr uint32_t pair_mask(int bits) { return ((1u << bits) - 1u) * 0x10001u; }

// Code conversion without I2F (Kim et al. 2022, REFERENCE.md section 4): OR-ing a code q into the
// mantissa of a power of two 2^e whose ulp is 1 gives 2^e + q, and subtracting 2^e + z gives the
// exact integer q - z.
//   fp16 activations: 2^10 = 0x6400 (10 mantissa bits: q < 1024, every width);
//   bf16 activations, 2-, 3- and 4-bit codes: 2^7 = 0x4300 (7 mantissa bits: q < 128);
//   bf16 activations, 8-bit codes: fp32 2^23 = 0x4B000000, then one cvt to bf16x2 (exact: |q - z|
//   <= 255 fits bf16's 8 significant bits).
inline constexpr uint32_t kF16Magic = 0x6400u;
inline constexpr uint32_t kBF16Magic = 0x4300u;
inline constexpr uint32_t kF32Magic = 0x4B000000u;
// True when the bf16 path converts through fp32.
MOQE_HOST_DEVICE constexpr bool bf16_via_f32(int bits) { return bits > 4; }
// The operand a group's zero point z becomes: the half2 / bf16x2 pattern of 2^e + z in both
// halves, or for bf16_via_f32 the fp32 bits of 2^23 + z.
MOQE_HOST_DEVICE constexpr uint32_t zero_operand(int bits, bool bf16, int z) {
  const uint32_t uz = static_cast<uint32_t>(z);
  if (!bf16) return (kF16Magic + uz) * 0x10001u;
  if (!bf16_via_f32(bits)) return (kBF16Magic + uz) * 0x10001u;
  return kF32Magic + uz;
}

// W re-laid out for the mma path (one expert). Scales (the stored values; the device holds them
// as fp16 when the scheme stores fp16, else fp32) and zero points (u8, asym only) are stored per
// tile and group as 16 contiguous rows: [(tile * groups + group) * 16 + row]; rows past
// N have code 0, scale 0 and zero 0 (their outputs are never written).
struct PackedWeights {
  std::vector<uint8_t> qweight;  // tiles * (K / 32) * 32 * chunk_bytes(bits), planes for 3 bits
  std::vector<float> scales;     // tiles * groups * 16
  std::vector<uint8_t> zeros;    // tiles * groups * 16 (asym), else empty
};
// Requires K a multiple of 32 (throws moqe::Error otherwise). `row_map`, when not empty, lists
// for each packed row the row of q it holds (-1: a padding row of code 0, scale 0 and zero 0);
// empty: packed row r is q's row r.
PackedWeights pack(const QuantizedMatrix& q, std::span<const int64_t> row_map = {});

// The GLU pair layout (DeviceQuantizedMatrix::stack_glu). Gate and up, [I, K] each, stacked by
// rows as q = [gate; up] ([2I, K]), are packed so that tile t holds gate rows 8t .. 8t + 7 in its
// rows 0..7 and the up rows of the same indices in its rows 8..15. The mma accumulators of lane
// (g, t) hold rows g and g + 8 of a tile for the same tokens (c0, c1 and c2, c3), so each lane
// has the gate and the up value of output column 8 tile + g in registers and applies
// act(gate) * up without exchanging data. ceil(I / 8) tiles; the last one is padded.
inline constexpr int kGluColsPerTile = 8;
// Row of q = [gate; up] held by packed row `packed_row`, or -1 for padding.
MOQE_HOST_DEVICE constexpr int64_t glu_source_row(int64_t packed_row, int64_t inter) {
  const int64_t col = (packed_row / kTileRows) * kGluColsPerTile + packed_row % kGluColsPerTile;
  if (col >= inter) return -1;
  return packed_row % kTileRows < kGluColsPerTile ? col : inter + col;
}
// The output column whose gate (tile row g) and up (tile row g + 8) tile `tile` holds.
MOQE_HOST_DEVICE constexpr int64_t glu_output_col(int64_t tile, int g) {
  return tile * kGluColsPerTile + g;
}
// The row map of the GLU pair layout for `inter` output columns (ceil(inter / 8) tiles of 16).
std::vector<int64_t> glu_row_map(int64_t inter);

}  // namespace moqe::cuda::mma
