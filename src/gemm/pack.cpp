#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_kernels.hpp"
#include "moqe/core/threading.hpp"
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
  p.scale.resize(static_cast<size_t>(p.n * p.groups));
  p.offset.resize(p.scale.size());
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
        p.scale[r * p.groups + g] = q.scale(r, g);
        p.offset[r * p.groups + g] = q.scale(r, g) * static_cast<float>(q.zero(r, g));
      }
    }
  });
  return p;
}

void quantize_activations(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group,
                          QuantizedX& out) {
  out.m = m;
  out.k = k;
  out.groups = k / group;
  out.q.resize(static_cast<size_t>(m * k));
  out.d.resize(static_cast<size_t>(m * (k / 32)));
  out.gsum.assign(static_cast<size_t>(m * out.groups), 0.0f);
  const int64_t blocks = k / 32, per_group = group / 32;
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
      out.gsum[r * out.groups + b / per_group] += d * static_cast<float>(sum);
    }
  }
}

}  // namespace moqe::detail
