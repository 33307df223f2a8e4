#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/quant/numerics.hpp"
#include "moqe/quant/packing.hpp"

namespace moqe::detail {

bool can_pack(const QuantizedMatrix& q) { return q.cols() % 32 == 0 && q.group_size() % 32 == 0; }

PackedQuant pack(const QuantizedMatrix& q) {
  MOQE_CHECK(can_pack(q), "pack: K = {} with group size {} is not a whole number of 32-blocks",
             q.cols(), q.group_size());
  PackedQuant p;
  p.bits = q.bits();
  p.n = q.rows();
  p.k = q.cols();
  p.group = q.group_size();
  p.groups = q.groups_per_row();
  p.block_bytes = 4 * p.bits;
  p.row_bytes = (p.k / 32) * p.block_bytes;
  p.data.assign(static_cast<size_t>(p.n * p.row_bytes + 16), 0);
  const auto ng = static_cast<size_t>(p.n * p.groups);
  p.f16_scales = q.scheme().scale_type == ScaleType::kF16;
  if (p.f16_scales) {
    p.scale16.resize(ng);
  } else {
    p.scale32.resize(ng);
  }
  p.zero_const = q.scheme().code_offset();
  if (q.scheme().has_zeros()) p.zero.resize(ng);
  const int b = p.bits;
  parallel_for(p.n, 0, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(static_cast<size_t>(p.k));
    for (int64_t r = r0; r < r1; ++r) {
      unpack_row(q.packed_row(r), p.k, b, codes.data());
      uint8_t* out = p.data.data() + r * p.row_bytes;
      for (int64_t blk = 0; blk < p.k / 32; ++blk) {
        const uint8_t* c = codes.data() + blk * 32;
        uint64_t acc = 0;  // little-endian bit writer: fields of 4 * b bits, lane after lane
        int nbits = 0;
        for (int lane = 0; lane < 8; ++lane) {
          uint64_t field = 0;
          for (int j = 0; j < 4; ++j) field |= static_cast<uint64_t>(c[8 * j + lane]) << (b * j);
          acc |= field << nbits;
          nbits += 4 * b;
          for (; nbits >= 8; nbits -= 8, acc >>= 8) *out++ = static_cast<uint8_t>(acc);
        }
      }
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t i = r * p.groups + g;
        if (p.f16_scales) {
          p.scale16[i] = float_to_half_bits(q.scale(r, g));  // exact: the value came from fp16
        } else {
          p.scale32[i] = q.scale(r, g);
        }
        if (!p.zero.empty()) p.zero[i] = static_cast<uint8_t>(q.zero(r, g));
      }
    }
  });
  return p;
}

bool can_pair(const PackedQuant& p) {
  return p.bits == 4 && (p.k / 32) % 2 == 0 && !p.paired && !p.signed_levels;
}

bool can_sign(const PackedQuant& p) {
  return (p.bits == 2 || p.bits == 3 || p.bits == 4 || p.bits == 8) && p.zero.empty() &&
         p.zero_const == 1 << (p.bits - 1) && !p.paired && !p.signed_levels;
}

void sign_levels(PackedQuant& p) {
  MOQE_CHECK(can_sign(p), "sign_levels: {}-bit rows with zero point {}{}", p.bits, p.zero_const,
             p.paired || p.signed_levels ? " (not a fresh layout)" : "");
  p.signed_levels = true;
  // XOR with 2^(bits - 1) in every field: bit bits - 1 of each field of a block's bit stream
  // (fields of `bits` bits from bit 0; for 2, 4 and 8 bits the pattern repeats every byte).
  uint8_t mask[32] = {};  // block_bytes = 4 * bits <= 32
  for (int64_t f = 0; f < 32; ++f) {
    const int64_t bit = f * p.bits + p.bits - 1;
    mask[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
  }
  const int64_t blocks = p.n * (p.k / 32);  // rows are whole blocks, back to back
  parallel_for(blocks, 0, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* blk = p.data.data() + b * p.block_bytes;
      for (int64_t i = 0; i < p.block_bytes; ++i) blk[i] ^= mask[i];
    }
  });
}

bool same_layout(const PackedQuant& a, const PackedQuant& b) {
  return a.bits == b.bits && a.k == b.k && a.group == b.group && a.f16_scales == b.f16_scales &&
         a.zero.empty() == b.zero.empty() && a.zero_const == b.zero_const && a.paired == b.paired &&
         a.signed_levels == b.signed_levels;
}

void pair_blocks(PackedQuant& p) {
  MOQE_CHECK(can_pair(p), "pair_blocks: {}-bit rows of {} blocks{}", p.bits, p.k / 32,
             p.paired || p.signed_levels ? " (not a fresh layout)" : "");
  p.paired = true;
  const int64_t pairs = p.n * (p.k / 64);  // rows are whole pairs, back to back
  parallel_for(pairs, 0, 4096, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      uint8_t* blk = p.data.data() + q * 32;
      uint8_t in[32];
      std::memcpy(in, blk, 32);
      // Nibble t of a 16-byte block is the code at position t (lane t / 4, code t % 4).
      for (int t = 0; t < 32; ++t) {
        const int lo = (in[t / 2] >> (4 * (t % 2))) & 0xf;
        const int hi = (in[16 + t / 2] >> (4 * (t % 2))) & 0xf;
        blk[t] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  });
}

void decode_row(const PackedQuant& p, int64_t n, float* out) {
  const int b = p.bits, field = 4 * b;
  const uint8_t* row = p.data.data() + n * p.row_bytes;
  if (p.paired) {
    for (int64_t blk = 0; blk < p.k / 32; ++blk) {
      const uint8_t* pair = row + (blk / 2) * 32;
      const int64_t g = (32 * blk) / p.group;
      const float s = p.scale_at(n * p.groups + g);
      const int z = p.zero_at(n * p.groups + g);
      for (int t = 0; t < 32; ++t) {
        const uint32_t code = (pair[t] >> (4 * (blk % 2))) & 0xfu;
        out[32 * blk + 8 * (t % 4) + t / 4] = dequantize_code(code, z, s);
      }
    }
    return;
  }
  for (int64_t blk = 0; blk < p.k / 32; ++blk) {
    const uint8_t* in = row + blk * p.block_bytes;
    const int64_t g = (32 * blk) / p.group;
    const float s = p.scale_at(n * p.groups + g);
    const int z = p.zero_at(n * p.groups + g);
    for (int lane = 0; lane < 8; ++lane) {
      for (int j = 0; j < 4; ++j) {
        // The block is a little-endian bit stream, like a file row (signed levels: XOR-ed).
        const uint32_t code = unpack_code(in, (lane * field + j * b) / b, b) ^
                              (p.signed_levels ? static_cast<uint32_t>(p.zero_const) : 0u);
        out[32 * blk + 8 * j + lane] = dequantize_code(code, z, s);
      }
    }
  }
}

PackedQuant concat_rows(const PackedQuant& a, const PackedQuant& b) {
  MOQE_CHECK(same_layout(a, b),
             "concat_rows: packed weights differ in bits, K, group size, scheme or layout");
  PackedQuant c = a;
  c.n = a.n + b.n;
  c.data.resize(static_cast<size_t>(a.n * a.row_bytes));
  c.data.insert(c.data.end(), b.data.begin(), b.data.end());  // b keeps its 16 bytes of slack
  auto append = [](auto& dst, const auto& src) { dst.insert(dst.end(), src.begin(), src.end()); };
  append(c.scale16, b.scale16);
  append(c.scale32, b.scale32);
  append(c.zero, b.zero);
  return c;
}

void pair_order_rows(const float* x, int64_t ldx, int64_t m, int64_t k, std::vector<float>& out) {
  if (out.size() < static_cast<size_t>(m * k)) out.resize(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * ldx;
    float* dst = out.data() + r * k;
    for (int64_t c = 0; c < k; c += 64) {
      for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < 4; ++j) {
          std::memcpy(dst + c + 16 * j + 8 * h, src + c + 32 * h + 8 * j, 8 * sizeof(float));
        }
      }
    }
  }
}

void size_quantized_x(QuantizedX& out, int64_t m, int64_t k, int64_t group) {
  out.m = m;
  out.k = k;
  out.groups = k / group;
  out.q.resize(static_cast<size_t>(m * k));
  out.d.resize(static_cast<size_t>(m * (k / 32)));
  out.gsum.assign(static_cast<size_t>(m * out.groups), 0.0f);
}

void size_field_x(LinearScratch& out, int64_t m, int64_t k, int64_t group) {
  out.m = m;
  out.k = k;
  out.groups = k / group;
  if (out.xp.size() < static_cast<size_t>(m * k)) out.xp.resize(static_cast<size_t>(m * k));
  out.gsum.assign(static_cast<size_t>(m * out.groups), 0.0f);
}

void add_group_sums(const float* d, const int32_t* sums, int64_t b0, int64_t b1, int64_t per_group,
                    float* gsum) {
  for (int64_t b = b0; b < b1; ++b) {
    gsum[b / per_group] += d[b] * static_cast<float>(sums[b - b0]);
  }
}

void quantize_activations(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                          QuantizedX& out) {
  size_quantized_x(out, m, k, group);
  const int64_t blocks = k / 32, per_group = group / 32;
  thread_local std::vector<int32_t> sums;
  if (sums.size() < static_cast<size_t>(blocks)) sums.resize(static_cast<size_t>(blocks));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = xr + 32 * b;
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
      int8_t* q = out.q.data() + r * k + 32 * b;
      int sum = 0;
      for (int i = 0; i < 8; ++i) {
        for (int j = 0; j < 4; ++j) {
          const int v = static_cast<int>(std::lrintf(xb[8 * j + i] * inv));
          q[4 * i + j] = static_cast<int8_t>(v);
          sum += v;
        }
      }
      out.d[r * blocks + b] = d;
      sums[static_cast<size_t>(b)] = sum;
    }
    add_group_sums(out.d.data() + r * blocks, sums.data(), 0, blocks, per_group,
                   out.gsum.data() + r * out.groups);
  }
}

}  // namespace moqe::detail
