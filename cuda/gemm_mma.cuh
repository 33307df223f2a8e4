// The tensor-core GEMM kernel (mma.sync m16n8k16, sm_80+) with dequantization in registers.
// Included only by the instantiation units gemm_mma_f16.cu and gemm_mma_bf16.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "check.cuh"
#include "gemm_launch.cuh"
#include "moqe/cuda/mma_layout.hpp"

namespace moqe::cuda::detail {

// The per-lane codes of one k32 chunk: 16 codes of kBits bits (3 bits: two planes).
struct Chunk3 {
  uint32_t lo;  // low two bits, 2-bit layout
  uint32_t hi;  // bit 2: first codes at bits 0..7, second codes at bits 8..15
};
template <int kBits>
struct MmaChunk;
template <>
struct MmaChunk<8> {
  using Type = uint4;
};
template <>
struct MmaChunk<4> {
  using Type = uint2;
};
template <>
struct MmaChunk<3> {
  using Type = Chunk3;
};
template <>
struct MmaChunk<2> {
  using Type = uint32_t;
};

// Chunk i (= (tile * chunks + c) * 32 + lane) of an expert's codes at `base`.
template <int kBits>
__device__ __forceinline__ typename MmaChunk<kBits>::Type load_chunk(const uint8_t* base, int64_t i,
                                                                     int64_t hi_offset) {
  if constexpr (kBits == 3) {
    Chunk3 c;
    c.lo = __ldg(reinterpret_cast<const uint32_t*>(base) + i);
    c.hi = __ldg(reinterpret_cast<const unsigned short*>(base + hi_offset) + i);
    return c;
  } else {
    return __ldg(reinterpret_cast<const typename MmaChunk<kBits>::Type*>(base) + i);
  }
}

// The 8 code pairs of a chunk, each masked to bits [0, kBits) and [16, 16 + kBits).
template <int kBits>
__device__ __forceinline__ void chunk_pairs(const typename MmaChunk<kBits>::Type& wc,
                                            uint32_t (&v)[8]) {
  constexpr int kWordBits = mma::word_bits(kBits);
  constexpr int kPerWord = mma::pairs_per_word(kWordBits);
  constexpr uint32_t kMask = mma::pair_mask(kWordBits);
  uint32_t w[mma::chunk_bytes(kWordBits) / 4];
  if constexpr (kBits == 3) {
    w[0] = wc.lo;
  } else {
    static_assert(sizeof(wc) == sizeof(w));
    const uint32_t* src = reinterpret_cast<const uint32_t*>(&wc);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(w) / 4); ++i) w[i] = src[i];
  }
#pragma unroll
  for (int p = 0; p < 8; ++p) v[p] = (w[p / kPerWord] >> (kWordBits * (p % kPerWord))) & kMask;
  if constexpr (kBits == 3) {
    // Spread the high bits so that pair p's two sit at bits p and 16 + p, then move them to 2, 18.
    const uint32_t h = (wc.hi & 0xffu) | ((wc.hi & 0xff00u) << 8);
#pragma unroll
    for (int p = 0; p < 8; ++p) v[p] |= ((h >> p) & 0x00010001u) << 2;
  }
}

// Two codes (at bits [0, kBits) and [16, 16 + kBits) of v, already masked) minus the zero point
// (`zero`: mma::zero_operand), as the exact integers q - z in a half2 / bf16x2 register, first
// code in the low half. The bit trick and its constants: moqe/cuda/mma_layout.hpp.
template <int kBits, int kAct>
__device__ __forceinline__ uint32_t code_pair(uint32_t v, uint32_t zero) {
  if constexpr (kAct == 0) {
    const uint32_t biased = v | (mma::kF16Magic * 0x10001u);
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&biased),
                              *reinterpret_cast<const __half2*>(&zero));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else if constexpr (!mma::bf16_via_f32(kBits)) {
    const uint32_t biased = v | (mma::kBF16Magic * 0x10001u);
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                     *reinterpret_cast<const __nv_bfloat162*>(&zero));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const float z = __uint_as_float(zero);
    const float lo = __uint_as_float(mma::kF32Magic | (v & 0xffffu)) - z;
    const float hi = __uint_as_float(mma::kF32Magic | (v >> 16)) - z;
    const __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
}

// c += a . b for one m16n8k16 tile; fp32 accumulators.
template <int kAct>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kAct == 0) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Computes y^T = W . x^T, so that the weights are the mma's A operand (16 output rows per tile)
// and up to 8 tokens its N: decode batches waste at most 7 of 8 token columns, not 15 of 16.
//
// Grid: x = token blocks of 8 * kMT rows (a block steps through its expert's token blocks
// gridDim.x apart, so any grid.x is correct), y = 16-row tiles of W, z = experts. Block: `warps`
// warps that split the tile's K range into contiguous chunk ranges (each warp streams its own
// contiguous weights), then sum their fp32 tiles through shared memory in a fixed order
// (deterministic).
//
// Per chunk (32 columns) a lane loads its 2 * kBits bytes of codes (layout: mma_layout.hpp; 3-bit
// codes from two planes) and
// one 16-byte vector of activations per token tile, decodes the 8 code pairs to exact integers
// (code_pair) and issues 2 * kMT mma into per-group fp32 partials; when the warp crosses a group
// boundary the partials are scaled by the group's two row scales (rows g and g + 8) into the
// accumulators (fp32 fma) and cleared.
template <int kBits, int kAct, int kMT>
__global__ void __launch_bounds__(256) gemm_mma_kernel(const GemmArgs p) {
  using Chunk = typename MmaChunk<kBits>::Type;
  // Chunks loaded before any is used: enough bytes in flight per lane, bounded registers.
  constexpr int kUnroll = kMT == 4 ? 2 : (kMT == 2 ? 4 : 8);
  extern __shared__ float red[];  // [warps][kMT * 4][32]

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
  if (static_cast<int64_t>(blockIdx.x) * 8 * kMT >= rows) return;  // empty expert: no weights read

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t tile = blockIdx.y;
  const int chunks = p.k >> 5;
  const int c_begin = static_cast<int>(static_cast<int64_t>(chunks) * warp / warps);
  const int c_end = static_cast<int>(static_cast<int64_t>(chunks) * (warp + 1) / warps);
  const int chunks_per_group = p.group_size >> 5;

  const uint8_t* wq = p.qweight + e * p.qweight_stride;
  const int64_t wi = tile * chunks * 32 + lane;                   // chunk c of this lane: wi + 32 c
  const int64_t sc = e * p.scales_stride + tile * p.groups * 16;  // the tile's first scale
  const uint8_t* zp =
      p.zeros != nullptr ? p.zeros + e * p.zeros_stride + tile * p.groups * 16 : nullptr;

  for (int64_t mb = blockIdx.x; mb * 8 * kMT < rows; mb += gridDim.x) {
    const int64_t m0 = mb * 8 * kMT;
    const uint4* xp[kMT];
    bool live[kMT];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const int64_t token = m0 + mt * 8 + g;
      live[mt] = token < rows;
      xp[mt] = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.x) +
                                              (row0 + (live[mt] ? token : 0)) * p.ldx + 8 * t);
    }

    float acc[kMT][4], part[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][r] = part[mt][r] = 0.0f;
    }
    int group = c_begin / chunks_per_group;
    int next_boundary = (group + 1) * chunks_per_group;
    // The current group's row scales and zero operands, and the next group's scales and zeros,
    // fetched one group ahead so that their latency hides behind a group of work.
    float s_lo = 0.0f, s_hi = 0.0f, ns_lo = 0.0f, ns_hi = 0.0f;
    uint32_t z_lo = 0, z_hi = 0;
    int nz_lo = p.zero_const, nz_hi = p.zero_const;
    auto fetch_next = [&](int gi) {
      if (gi >= p.groups) return;
      ns_lo = load_scale(p.scales, sc + gi * 16 + g, p.scales_f16);
      ns_hi = load_scale(p.scales, sc + gi * 16 + g + 8, p.scales_f16);
      if (zp != nullptr) {
        nz_lo = __ldg(zp + gi * 16 + g);
        nz_hi = __ldg(zp + gi * 16 + g + 8);
      }
    };
    auto advance = [&]() {  // the fetched group becomes current; fetch the one after it
      s_lo = ns_lo;
      s_hi = ns_hi;
      z_lo = mma::zero_operand(kBits, kAct == 1, nz_lo);
      z_hi = mma::zero_operand(kBits, kAct == 1, nz_hi);
      fetch_next(group + 1);
    };
    auto flush = [&]() {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        acc[mt][0] = fmaf(s_lo, part[mt][0], acc[mt][0]);
        acc[mt][1] = fmaf(s_lo, part[mt][1], acc[mt][1]);
        acc[mt][2] = fmaf(s_hi, part[mt][2], acc[mt][2]);
        acc[mt][3] = fmaf(s_hi, part[mt][3], acc[mt][3]);
#pragma unroll
        for (int r = 0; r < 4; ++r) part[mt][r] = 0.0f;
      }
    };
    auto compute = [&](int c, const Chunk& wc, const uint4(&xc)[kMT]) {
      if (c == next_boundary) {
        flush();
        ++group;
        next_boundary += chunks_per_group;
        advance();
      }
      uint32_t v[8];
      chunk_pairs<kBits>(wc, v);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
          a[r] = code_pair<kBits, kAct>(v[4 * s + r], (r & 1) ? z_hi : z_lo);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<kAct>(part[mt], a, s == 0 ? xc[mt].x : xc[mt].z, s == 0 ? xc[mt].y : xc[mt].w);
        }
      }
    };

    if (c_begin < c_end) {
      fetch_next(group);
      advance();
    }
    int c = c_begin;
    for (; c + kUnroll <= c_end; c += kUnroll) {
      Chunk wc[kUnroll];
      uint4 xc[kUnroll][kMT];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        wc[u] = load_chunk<kBits>(wq, wi + static_cast<int64_t>(c + u) * 32, p.hi_offset);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          xc[u][mt] = live[mt] ? __ldg(xp[mt] + 4 * (c + u)) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) compute(c + u, wc[u], xc[u]);
    }
    for (; c < c_end; ++c) {
      const Chunk wc = load_chunk<kBits>(wq, wi + static_cast<int64_t>(c) * 32, p.hi_offset);
      uint4 xc[kMT];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        xc[mt] = live[mt] ? __ldg(xp[mt] + 4 * c) : make_uint4(0, 0, 0, 0);
      }
      compute(c, wc, xc);
    }
    flush();

    // acc[mt][r] of lane (g, t) is tile row g + 8 (r >> 1), token mt * 8 + 2 t + (r & 1). A GLU
    // matrix pairs r < 2 (gate, row g) with r + 2 (up, row g + 8) into output column
    // glu_output_col(tile, g); otherwise every r is an output of its own.
    auto store = [&](int mt, int r, int ln, float v, float up) {
      const int64_t col =
          p.glu ? mma::glu_output_col(tile, ln >> 2) : tile * 16 + (ln >> 2) + ((r >> 1) ? 8 : 0);
      const int64_t token = m0 + mt * 8 + 2 * (ln & 3) + (r & 1);
      if (col < p.n && token < rows) {
        store_out(p.y, (row0 + token) * p.ldy + col, p.out_type, epilogue(p, v, up, row0 + token));
      }
    };
    const int outs = p.glu ? 2 : 4;  // accumulators per (token tile, lane) that are outputs
    if (warps == 1) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (r < outs) store(mt, r, lane, acc[mt][r], acc[mt][(r + 2) & 3]);
        }
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) red[(warp * kMT * 4 + mt * 4 + r) * 32 + lane] = acc[mt][r];
      }
      __syncthreads();
      constexpr int kWarpStride = kMT * 4 * 32;
      for (int v = static_cast<int>(threadIdx.x); v < kMT * outs * 32; v += blockDim.x) {
        const int ln = v & 31, q = v >> 5, mt = q / outs, r = q % outs;
        const int i = (mt * 4 + r) * 32 + ln, iu = (mt * 4 + ((r + 2) & 3)) * 32 + ln;
        float sum = red[i], up = 0.0f;
        for (int w = 1; w < warps; ++w) sum += red[w * kWarpStride + i];
        if (p.glu) {  // the up value, summed over the warps in the same order
          up = red[iu];
          for (int w = 1; w < warps; ++w) up += red[w * kWarpStride + iu];
        }
        store(mt, r, ln, sum, up);
      }
      __syncthreads();  // red is reused by the next token block
    }
  }
}

template <int kBits, int kAct, int kMT>
void launch_gemm_mma(const GemmArgs& args, int64_t m_blocks, int experts, cudaStream_t stream) {
  const int warps = args.warps;
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(args.tiles),
                  static_cast<unsigned>(experts));
  const size_t smem = warps > 1 ? static_cast<size_t>(warps) * kMT * 4 * 32 * sizeof(float) : 0;
  gemm_mma_kernel<kBits, kAct, kMT><<<grid, 32 * warps, smem, stream>>>(args);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moqe::cuda::detail

#define MOQE_INSTANTIATE_GEMM_MMA(bits, act, mt)                    \
  template void moqe::cuda::detail::launch_gemm_mma<bits, act, mt>( \
      const moqe::cuda::detail::GemmArgs&, int64_t, int, cudaStream_t);
