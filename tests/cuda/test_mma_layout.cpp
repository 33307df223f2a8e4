// The mma path's weight layout and bit-trick constants (moqe/cuda/mma_layout.hpp), checked on the
// host, without a device: the packed weights are decoded the way the kernel's lanes decode them,
// placed by the PTX fragment layouts of mma.sync m16n8k16, and must reproduce the scalar
// reference's dequantized matrix bit for bit, every element exactly once.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "moqe/core/dtypes.hpp"
#include "moqe/cuda/mma_layout.hpp"

using namespace moqe;

namespace {

// code_pair of cuda/gemm_mma.cuh on the host: the two codes of v minus the zero point, through
// the same magic numbers and the fp16 / bf16 / fp32 arithmetic (exact here, as on the device).
void code_pair(int bits, bool bf16, uint32_t v, uint32_t zero, float out[2]) {
  if (!bf16) {
    const uint32_t b = v | (cuda::mma::kF16Magic * 0x10001u);
    for (int h = 0; h < 2; ++h) {
      out[h] = half_bits_to_float(static_cast<uint16_t>(b >> (16 * h))) -
               half_bits_to_float(static_cast<uint16_t>(zero >> (16 * h)));
    }
  } else if (!cuda::mma::bf16_via_f32(bits)) {
    const uint32_t b = v | (cuda::mma::kBF16Magic * 0x10001u);
    for (int h = 0; h < 2; ++h) {
      out[h] = bf16_bits_to_float(static_cast<uint16_t>(b >> (16 * h))) -
               bf16_bits_to_float(static_cast<uint16_t>(zero >> (16 * h)));
    }
  } else {
    out[0] = bits_float(cuda::mma::kF32Magic | (v & 0xffffu)) - bits_float(zero);
    out[1] = bits_float(cuda::mma::kF32Magic | (v >> 16)) - bits_float(zero);
  }
}

// W [N, K] rebuilt from the packed layout: lane (g, t) of step s holds A registers r = 0..3 with
// elements (row g + 8 (r & 1), k slot 2t + h + 8 (r >> 1)); its B registers j = 0, 1 are words
// 2s + j of its 16-byte activation load x[32c + 8t, +8), i.e. k slot 2t + h + 8j holds column
// 32c + 8t + 4s + 2j + h. hits counts how often each element was produced. With a row map the
// result is the packed matrix, [row_map.size(), K] (every row, padding included).
std::vector<float> rebuild(const QuantizedMatrix& q, bool bf16, std::vector<int>& hits,
                           std::span<const int64_t> row_map = {}) {
  namespace mma = cuda::mma;
  const int bits = q.bits();
  const int64_t k = q.cols(), groups = q.groups_per_row(), group = q.group_size();
  const int64_t n = row_map.empty() ? q.rows() : static_cast<int64_t>(row_map.size());
  const mma::PackedWeights packed = mma::pack(q, row_map);
  const int64_t tiles = (n + 15) / 16, chunks = k / 32;
  std::vector<float> w(static_cast<size_t>(n * k), -12345.0f);
  hits.assign(w.size(), 0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t gi = c * 32 / group;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const int64_t slot = (tile * chunks + c) * 32 + lane;
        const int wb = mma::word_bits(bits);  // 3-bit: the low plane's width
        const int64_t word_bytes = mma::chunk_bytes(wb);
        const uint8_t* src = packed.qweight.data() + slot * word_bytes;
        uint32_t words[4] = {0, 0, 0, 0}, hi = 0;
        for (int64_t b = 0; b < word_bytes; ++b) words[b / 4] |= uint32_t{src[b]} << (8 * (b % 4));
        if (bits == 3) {
          const uint8_t* h = packed.qweight.data() + mma::hi_plane_offset(tiles, chunks) + slot * 2;
          hi = uint32_t{h[0]} | (uint32_t{h[1]} << 8);
        }
        for (int s = 0; s < 2; ++s) {
          for (int r = 0; r < 4; ++r) {
            const int p = 4 * s + r;
            uint32_t v =
                (words[p / mma::pairs_per_word(wb)] >> (wb * (p % mma::pairs_per_word(wb)))) &
                mma::pair_mask(wb);
            if (bits == 3) v |= (((hi >> p) & 1u) << 2) | (((hi >> (8 + p)) & 1u) << 18);
            const int row16 = g + 8 * (r & 1);
            const size_t si = static_cast<size_t>((tile * groups + gi) * 16 + row16);
            const int z = packed.zeros.empty() ? q.scheme().code_offset() : packed.zeros[si];
            float d[2];
            code_pair(bits, bf16, v, mma::zero_operand(bits, bf16, z), d);
            for (int h = 0; h < 2; ++h) {
              const int slot = 2 * t + h + 8 * (r >> 1);
              const int j = slot >= 8 ? 1 : 0;  // the B register holding this k slot
              const int64_t col = 32 * c + 8 * t + 4 * s + 2 * j + h;
              const int64_t row = tile * 16 + row16;
              if (row >= n) continue;
              const size_t i = static_cast<size_t>(row * k + col);
              w[i] = d[h] * packed.scales[si];
              ++hits[i];
            }
          }
        }
      }
    }
  }
  return w;
}

}  // namespace

TEST_CASE("cuda mma layout: packed weights decode to the reference, without a device", "[cuda]") {
  std::mt19937 rng(21);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (int bits : kSupportedBits) {
    for (QuantMode mode : kSupportedModes) {
      for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, kPerChannel}) {
        const int64_t n = 37, k = 256;
        std::vector<float> w(static_cast<size_t>(n * k));
        for (auto& v : w) v = gauss(rng);
        const QuantizedMatrix q =
            quantize(MatrixView<const float>(w.data(), n, k), QuantScheme{bits, mode, group});
        const std::vector<float> want = dequantize(q);
        for (bool bf16 : {false, true}) {
          INFO(q.scheme().to_string() << (bf16 ? ", bf16" : ", fp16"));
          std::vector<int> hits;
          const std::vector<float> got = rebuild(q, bf16, hits);
          size_t bad = 0, miss = 0;
          for (size_t i = 0; i < got.size(); ++i) {
            bad += got[i] != want[i];
            miss += hits[i] != 1;
          }
          CHECK(bad == 0);
          CHECK(miss == 0);
        }
      }
    }
  }
}

TEST_CASE("cuda mma layout: the GLU pair layout puts gate and up of a column in one lane",
          "[cuda]") {
  namespace mma = cuda::mma;
  // The epilogue's pairing: tile row g holds the gate and tile row g + 8 the up row of output
  // column glu_output_col(tile, g); columns past I are padding.
  for (int64_t inter : {int64_t{1}, int64_t{8}, int64_t{43}, int64_t{64}}) {
    const std::vector<int64_t> map = mma::glu_row_map(inter);
    REQUIRE(static_cast<int64_t>(map.size()) == 16 * ((inter + 7) / 8));
    std::vector<int> seen(static_cast<size_t>(2 * inter), 0);
    for (int64_t tile = 0; tile < static_cast<int64_t>(map.size()) / 16; ++tile) {
      for (int g = 0; g < 8; ++g) {
        const int64_t col = mma::glu_output_col(tile, g);
        const int64_t gate = map[static_cast<size_t>(16 * tile + g)];
        const int64_t up = map[static_cast<size_t>(16 * tile + g + 8)];
        if (col >= inter) {
          CHECK(gate == -1);
          CHECK(up == -1);
          continue;
        }
        CHECK(gate == col);
        CHECK(up == inter + col);
        ++seen[static_cast<size_t>(gate)];
        ++seen[static_cast<size_t>(up)];
      }
    }
    CHECK(std::count(seen.begin(), seen.end(), 1) == 2 * inter);  // every row exactly once
  }
  // The packed weights decode to those rows (zeros for padding), for every width and mode.
  std::mt19937 rng(22);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (int bits : kSupportedBits) {
    for (QuantMode mode : kSupportedModes) {
      const int64_t inter = 43, k = 128;  // 6 tiles, the last one with 3 columns
      std::vector<float> w(static_cast<size_t>(2 * inter * k));
      for (auto& v : w) v = gauss(rng);
      const QuantizedMatrix q =
          quantize(MatrixView<const float>(w.data(), 2 * inter, k), QuantScheme{bits, mode, 32});
      const std::vector<float> want = dequantize(q);
      const std::vector<int64_t> map = mma::glu_row_map(inter);
      for (bool bf16 : {false, true}) {
        INFO(q.scheme().to_string() << (bf16 ? ", bf16" : ", fp16"));
        std::vector<int> hits;
        const std::vector<float> got = rebuild(q, bf16, hits, map);
        size_t bad = 0, miss = 0;
        for (size_t r = 0; r < map.size(); ++r) {
          for (int64_t c = 0; c < k; ++c) {
            const size_t i = r * static_cast<size_t>(k) + static_cast<size_t>(c);
            const float expect = map[r] < 0 ? 0.0f : want[static_cast<size_t>(map[r] * k + c)];
            bad += got[i] != expect;
            miss += hits[i] != 1;
          }
        }
        CHECK(bad == 0);
        CHECK(miss == 0);
      }
    }
  }
  std::vector<float> w(16 * 64, 0.5f);
  const QuantizedMatrix q = quantize(MatrixView<const float>(w.data(), 16, 64),
                                     QuantScheme{4, QuantMode::kSym, kPerChannel});
  const std::vector<int64_t> bad_size(8, 0), bad_row(16, 16);
  CHECK_THROWS_WITH(mma::pack(q, bad_size), Catch::Contains("not a multiple of 16"));
  CHECK_THROWS_WITH(mma::pack(q, bad_row), Catch::Contains("row 16"));
}

TEST_CASE("cuda mma layout: the bit trick covers every code and zero point", "[cuda]") {
  for (int bits : kSupportedBits) {
    for (bool bf16 : {false, true}) {
      for (int z = 0; z < (1 << bits); ++z) {
        for (int q = 0; q < (1 << bits); ++q) {
          const uint32_t v =
              static_cast<uint32_t>(q) | (static_cast<uint32_t>((q * 7 + 3) % (1 << bits)) << 16);
          float d[2];
          code_pair(bits, bf16, v, cuda::mma::zero_operand(bits, bf16, z), d);
          REQUIRE(d[0] == static_cast<float>(q - z));
          REQUIRE(d[1] == static_cast<float>((q * 7 + 3) % (1 << bits) - z));
        }
      }
    }
  }
}

TEST_CASE("cuda mma layout: K not a multiple of 32 is refused by pack", "[cuda]") {
  std::vector<float> w(16 * 100, 0.5f);
  const QuantizedMatrix q100 = quantize(MatrixView<const float>(w.data(), 16, 100),
                                        QuantScheme{4, QuantMode::kSym, kPerChannel});
  CHECK_THROWS_WITH(cuda::mma::pack(q100), Catch::Contains("not 100"));
}
