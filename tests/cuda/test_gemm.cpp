// The CUDA mixed-precision GEMM (cuda/gemm.hpp) against the CPU scalar oracle, on random data, for
// every bits x mode x group size x activation type, odd shapes, the grouped variant with empty
// experts, M = 0, and poisoned outputs. Without a device each test reports "SKIPPED: no CUDA
// device" (ctest counts it as skipped).
//
// Tolerance, derived rather than tuned. The kernels dequantize to the exact integers q - z, take
// exact products with the fp16/bf16 activations and sum in fp32: per group over k, scaled once per
// group (one fma), over groups, then over the warps of a block (mma) or the lanes of a warp
// (simple). The reference sums in double over the same fp16/bf16-rounded activations and the
// scalar reference's dequantized weights (fp32 values (q - z) * s: exact for fp16 scales, one
// rounding for fp32 ones). Every fp32 step adds at most 2^-23 (two units of 2^-24, covering
// truncation) of a running sum that is bounded by S = sum_k |x_k| |w_k|, so with L steps in the
// longest chain |y_gpu - y_ref| <= L * 2^-23 * S, plus the rounding of y to its storage type
// (relative 2^-11 for fp16, 2^-8 for bf16; 2^-25 absolute at fp16's subnormals).
//   simple path: L = ceil(G/32) (lane fma chain) + K/G (groups) + 5 (butterfly) + 2 (weights,
//   scale). mma path: mma.sync's fp32 accumulation is not IEEE: products are exact, then the
//   products and
//     the accumulator are aligned to the largest exponent and truncated (Fasi et al. 2021,
//     "Numerical behavior of NVIDIA tensor cores"), so one m16n8k16 step may lose up to 17 units
//     of 2^-23 of S: L = 17 * G/16 (steps within a group) + K/G + 8 (warps) + 4.
// The mma path's decoding and layout are also checked exactly (one-hot activations), and the CPU
// fp32 oracle (QuantizedLinear, kExact, K/8 + 5 steps of its own) must agree within the sum.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/require_device.hpp"
#include "moqe/cuda/gemm.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/gemm/linear.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

enum class Act { kF16, kBF16 };
enum class Out { kF16, kBF16, kF32 };

const char* name(Act a) { return a == Act::kF16 ? "f16" : "bf16"; }
const char* name(Out o) { return o == Out::kF16 ? "f16" : (o == Out::kBF16 ? "bf16" : "f32"); }

uint16_t to_bits(Act a, float v) {
  return a == Act::kF16 ? float_to_half_bits(v) : float_to_bf16_bits(v);
}
float from_bits(Act a, uint16_t b) {
  return a == Act::kF16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
}
// Unit roundoff of y's storage type.
double out_roundoff(Out o) {
  return o == Out::kF16 ? std::ldexp(1.0, -11) : (o == Out::kBF16 ? std::ldexp(1.0, -8) : 0.0);
}

// Random weights, never zero, with a per-row magnitude so that scales differ between rows.
std::vector<float> random_weights(int64_t n, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> mag(0.25f, 4.0f);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (int64_t r = 0; r < n; ++r) {
    const float m = mag(rng);
    for (int64_t c = 0; c < k; ++c) {
      float v = g(rng);
      if (v == 0.0f) v = 0.5f;
      w[static_cast<size_t>(r * k + c)] = m * v;
    }
  }
  return w;
}

// Activations as their fp16/bf16 bits and the rounded values, [m, ld] with columns [k, ld)
// filled with a huge value that must never be read.
struct Activations {
  std::vector<uint16_t> bits;
  std::vector<float> values;  // [m, k], the rounded values
};
Activations random_activations(Act a, int64_t m, int64_t k, int64_t ld, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  Activations x;
  x.bits.assign(static_cast<size_t>(m * ld), to_bits(a, 60000.0f));
  x.values.resize(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      float v = g(rng);
      if (v == 0.0f) v = -0.75f;
      const uint16_t b = to_bits(a, v);
      x.bits[static_cast<size_t>(r * ld + c)] = b;
      x.values[static_cast<size_t>(r * k + c)] = from_bits(a, b);
    }
  }
  return x;
}

// A device copy of host data.
template <class T>
cuda::DeviceBuffer upload(const std::vector<T>& v) {
  cuda::DeviceBuffer b(v.size() * sizeof(T));
  b.upload(v.data(), v.size() * sizeof(T));
  return b;
}

// y (device, [rows, ldy] of `out`) read back as floats; NaN poisoning survives the conversion.
std::vector<float> download_out(const cuda::DeviceBuffer& y, Out out, int64_t count) {
  std::vector<float> r(static_cast<size_t>(count));
  if (out == Out::kF32) {
    y.download(r.data(), r.size() * 4);
    return r;
  }
  std::vector<uint16_t> b(r.size());
  y.download(b.data(), b.size() * 2);
  for (size_t i = 0; i < r.size(); ++i) {
    r[i] = out == Out::kF16 ? half_bits_to_float(b[i]) : bf16_bits_to_float(b[i]);
  }
  return r;
}

// A device output of [rows, ldy] elements poisoned with NaN.
cuda::DeviceBuffer poisoned_out(Out out, int64_t count) {
  if (out == Out::kF32) {
    return upload(
        std::vector<float>(static_cast<size_t>(count), std::numeric_limits<float>::quiet_NaN()));
  }
  return upload(
      std::vector<uint16_t>(static_cast<size_t>(count), out == Out::kF16 ? 0x7e00 : 0x7fc0));
}

// Calls cuda::gemm or cuda::gemm_grouped with the typed views for (act, out).
void run_gemm(Act act, Out out, const cuda::DeviceBuffer& x, int64_t m, int64_t k, int64_t ldx,
              const cuda::DeviceQuantizedMatrix& w, const int64_t* offsets, cuda::DeviceBuffer& y,
              int64_t n, int64_t ldy, int64_t expert = 0, int64_t hint = -1,
              const cuda::GemmEpilogue& epilogue = {}, const int32_t* expert_list = nullptr) {
  auto with_out = [&](auto in_tag) {
    using TIn = decltype(in_tag);
    const MatrixView<const TIn> xv(m == 0 ? nullptr : x.as<const TIn>(), m, k, ldx);
    auto call = [&](auto out_tag) {
      using TOut = decltype(out_tag);
      const MatrixView<TOut> yv(m == 0 ? nullptr : y.as<TOut>(), m, n, ldy);
      if (offsets != nullptr) {
        cuda::gemm_grouped(xv, w, offsets, yv, epilogue, nullptr, hint, expert_list);
      } else {
        cuda::gemm(xv, w, yv, epilogue, nullptr, expert);
      }
    };
    if (out == Out::kF16) call(Half{});
    if (out == Out::kBF16) call(BFloat16{});
    if (out == Out::kF32) call(float{});
  };
  if (act == Act::kF16) with_out(Half{});
  if (act == Act::kBF16) with_out(BFloat16{});
}

// The reference for rows [r0, r0 + m) of x against expert q: y in double and sum |x| |w|.
struct Reference {
  std::vector<double> y, abs;
};
Reference reference(const std::vector<float>& x, int64_t r0, int64_t m, const QuantizedMatrix& q) {
  const int64_t n = q.rows(), k = q.cols();
  const std::vector<float> w = dequantize(q);
  Reference ref;
  ref.y.resize(static_cast<size_t>(m * n));
  ref.abs.resize(ref.y.size());
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x.data() + (r0 + i) * k;
    for (int64_t j = 0; j < n; ++j) {
      const float* wr = w.data() + j * k;
      double s = 0, a = 0;
      for (int64_t c = 0; c < k; ++c) {
        s += static_cast<double>(xr[c]) * wr[c];
        a += std::fabs(static_cast<double>(xr[c]) * wr[c]);
      }
      ref.y[static_cast<size_t>(i * n + j)] = s;
      ref.abs[static_cast<size_t>(i * n + j)] = a;
    }
  }
  return ref;
}

// Steps in the longest fp32 summation chain of a kernel (see the top of the file).
double gpu_levels(int64_t k, int64_t group, cuda::GemmPath path) {
  if (path == cuda::GemmPath::kSimple)
    return static_cast<double>((group + 31) / 32 + k / group + 7);
  return static_cast<double>(17 * (group / 16) + k / group + 12);
}

// Absolute rounding floor of y's storage type (fp16 subnormals).
double out_floor(Out o) { return o == Out::kF16 ? std::ldexp(1.0, -25) : 0.0; }

// Checks rows [r0, r0 + m) of y (row stride ldy, n columns; columns [n, ldy) must still be
// poisoned) against the reference of x rows [r0, r0 + m) times q, and against the CPU fp32
// oracle. Returns the number of failures (reported through INFO/CHECK on the first few).
int check_rows(const std::vector<float>& y, int64_t ldy, Out out, const std::vector<float>& x,
               int64_t r0, int64_t m, const QuantizedMatrix& q, cuda::GemmPath path) {
  if (m == 0) return 0;
  const int64_t n = q.rows(), k = q.cols();
  const Reference ref = reference(x, r0, m, q);
  std::vector<float> cpu(static_cast<size_t>(m * n));
  {
    const test::ScopedCpuIsa scalar(CpuIsa::kReference);
    const QuantizedLinear lin = QuantizedLinear::from_quantized(q, Numerics::kExact);
    lin.forward(MatrixView<const float>(x.data() + r0 * k, m, k),
                MatrixView<float>(cpu.data(), m, n), 1);
  }
  const double u32 = std::ldexp(1.0, -23);
  const double l_gpu = gpu_levels(k, q.group_size(), path);
  const double l_cpu = static_cast<double>(k / 8 + 5);
  const double uo = out_roundoff(out);
  int failures = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < ldy; ++j) {
      const double got = y[static_cast<size_t>((r0 + i) * ldy + j)];
      if (j >= n) {
        if (!std::isnan(got) && failures++ < 3)
          FAIL_CHECK("row " << i << " padding column " << j << " was written: " << got);
        continue;
      }
      const size_t ij = static_cast<size_t>(i * n + j);
      const double e32 = l_gpu * u32 * ref.abs[ij];
      const double tol = e32 + uo * (std::fabs(ref.y[ij]) + e32) + out_floor(out);
      const double tol_cpu = tol + l_cpu * u32 * ref.abs[ij];
      const bool ok = std::fabs(got - ref.y[ij]) <= tol && std::fabs(got - cpu[ij]) <= tol_cpu;
      if (!ok && failures++ < 3) {
        FAIL_CHECK("y[" << i << ", " << j << "] = " << got << ", reference " << ref.y[ij]
                        << " (tolerance " << tol << "), CPU oracle " << cpu[ij] << " (tolerance "
                        << tol_cpu << ")");
      }
    }
  }
  return failures;
}

// The activations in double, the reference for the fp32 device formulas.
double activate_ref(Activation a, double v) {
  switch (a) {
    case Activation::kSilu:
      return v / (1.0 + std::exp(-v));
    case Activation::kGeluTanh:
      return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
    case Activation::kGelu:
      return 0.5 * v * (1.0 + std::erf(v * 0.7071067811865476));
    case Activation::kRelu:
      return v > 0.0 ? v : 0.0;
  }
  return v;
}

// Checks rows [r0, r0 + m) of a fused-epilogue output (n columns, padding poisoned) against
// act(x . gate^T) * (x . up^T) * scale[i] (up null: act(x . gate^T) * scale[i]; `activate` false:
// the identity for act) in double. The bound propagates each GEMM's error bound e (as in
// check_rows) through the epilogue: the activations' slope is at most 1.13 (GELU; SiLU 1.10,
// ReLU 1), their fp32 formulas lose at most 2^-20 |g| (1 + erf / 1 + tanh cancel for negative g;
// a few units of 2^-24 elsewhere), and the products and the scale add units of 2^-24 each.
int check_epilogue_rows(const std::vector<float>& y, int64_t ldy, Out out,
                        const std::vector<float>& x, int64_t r0, int64_t m,
                        const QuantizedMatrix& gate, const QuantizedMatrix* up, bool activate,
                        Activation act, const std::vector<float>& scale, cuda::GemmPath path) {
  if (m == 0) return 0;
  const int64_t n = gate.rows(), k = gate.cols();
  const Reference rg = reference(x, r0, m, gate);
  const Reference ru = up != nullptr ? reference(x, r0, m, *up) : Reference{};
  const double u32 = std::ldexp(1.0, -23), l_act = 1.13;
  const double l_gpu = gpu_levels(k, gate.group_size(), path);
  const double uo = out_roundoff(out);
  int failures = 0;
  for (int64_t i = 0; i < m; ++i) {
    const double s = scale.empty() ? 1.0 : scale[static_cast<size_t>(r0 + i)];
    for (int64_t j = 0; j < ldy; ++j) {
      const double got = y[static_cast<size_t>((r0 + i) * ldy + j)];
      if (j >= n) {
        if (!std::isnan(got) && failures++ < 3)
          FAIL_CHECK("row " << i << " padding column " << j << " was written: " << got);
        continue;
      }
      const size_t ij = static_cast<size_t>(i * n + j);
      const double g = rg.y[ij], eg = l_gpu * u32 * rg.abs[ij];
      const double a = activate ? activate_ref(act, g) : g;
      const double ea =
          (activate ? l_act : 1.0) * eg + (activate ? std::ldexp(std::fabs(g) + eg, -20) : 0.0);
      const double u = up != nullptr ? ru.y[ij] : 1.0;
      const double eu = up != nullptr ? l_gpu * u32 * ru.abs[ij] : 0.0;
      const double big_a = std::fabs(a) + ea, big_u = std::fabs(u) + eu;
      const double want = a * u * s;
      const double e32 =
          (ea * big_u + big_a * eu + 3 * std::ldexp(big_a * big_u, -24)) * std::fabs(s);
      const double tol = e32 + uo * (std::fabs(want) + e32) + out_floor(out);
      // Written as "not within" so that an unwritten (NaN-poisoned) output fails.
      if (!(std::fabs(got - want) <= tol) && failures++ < 3) {
        FAIL_CHECK("y[" << i << ", " << j << "] = " << got << ", want " << want << " (gate " << g
                        << ", up " << u << ", scale " << s << ", tolerance " << tol << ")");
      }
    }
  }
  return failures;
}

struct Case {
  int bits;
  QuantMode mode;
  int64_t group;  // kPerChannel for one group per row
  ScaleType scale_type = ScaleType::kF16;
};

QuantizedMatrix make_matrix(const Case& c, int64_t n, int64_t k, std::mt19937& rng) {
  const std::vector<float> w = random_weights(n, k, rng);
  return quantize(MatrixView<const float>(w.data(), n, k),
                  QuantScheme{c.bits, c.mode, c.group, c.scale_type});
}

// One gemm call on m random rows (row strides padded: x by 8, y by 3) checked against the oracle.
void check_gemm(const QuantizedMatrix& q, const cuda::DeviceQuantizedMatrix& dw, Act act, Out out,
                int64_t m, std::mt19937& rng) {
  const int64_t n = q.rows(), k = q.cols();
  const int64_t ldx = k + 8, ldy = n + 3;
  INFO("M = " << m << ", N = " << n << ", K = " << k << ", " << q.scheme().to_string() << ", x "
              << name(act) << ", y " << name(out) << ", path "
              << (dw.path() == cuda::GemmPath::kMma ? "mma" : "simple"));
  const Activations x = random_activations(act, m, k, ldx, rng);
  const cuda::DeviceBuffer xd = upload(x.bits);
  cuda::DeviceBuffer yd = poisoned_out(out, m * ldy);
  run_gemm(act, out, xd, m, k, ldx, dw, nullptr, yd, n, ldy);
  const std::vector<float> y = download_out(yd, out, m * ldy);
  CHECK(check_rows(y, ldy, out, x.values, 0, m, q, dw.path()) == 0);
}

}  // namespace

TEST_CASE("cuda gemm: mma path decodes every code and zero point exactly", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  // Codes (n + k) mod 2^b, zero points n mod 2^b (asym) and power-of-two scales: with one-hot
  // activations y[k, n] = (q - z) * s exactly.
  for (int bits : kSupportedBits) {
    for (QuantMode mode : {QuantMode::kAsym, QuantMode::kSymFull}) {
      const int levels = 1 << bits;
      const int64_t n = std::max(levels, 16) + 5, k = std::max<int64_t>(levels, 64);
      const QuantScheme scheme{bits, mode, 32};
      const int64_t groups = k / 32;
      std::vector<uint8_t> codes(static_cast<size_t>(k)), packed;
      std::vector<uint8_t> qweight;
      std::vector<float> scales;
      std::vector<uint8_t> zeros;
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < k; ++c)
          codes[static_cast<size_t>(c)] = static_cast<uint8_t>((r + c) % levels);
        packed.assign(static_cast<size_t>(packed_row_bytes(k, bits)), 0);
        pack_row(codes.data(), k, bits, packed.data());
        qweight.insert(qweight.end(), packed.begin(), packed.end());
        for (int64_t g = 0; g < groups; ++g) {
          scales.push_back(std::ldexp(1.0f, static_cast<int>((r + g) % 5) - 2));
          if (mode == QuantMode::kAsym) zeros.push_back(static_cast<uint8_t>((r + 3 * g) % levels));
        }
      }
      const QuantizedMatrix q =
          QuantizedMatrix::from_parts(n, k, scheme, qweight, scales, zeros, "exhaustive");
      const cuda::DeviceQuantizedMatrix dw(q, cuda::GemmPath::kMma);
      for (Act act : {Act::kF16, Act::kBF16}) {
        std::vector<uint16_t> x(static_cast<size_t>(k * k), to_bits(act, 0.0f));
        for (int64_t i = 0; i < k; ++i) x[static_cast<size_t>(i * k + i)] = to_bits(act, 1.0f);
        const cuda::DeviceBuffer xd = upload(x);
        cuda::DeviceBuffer yd = poisoned_out(Out::kF32, k * n);
        run_gemm(act, Out::kF32, xd, k, k, k, dw, nullptr, yd, n, n);
        const std::vector<float> y = download_out(yd, Out::kF32, k * n);
        int bad = 0;
        for (int64_t i = 0; i < k && bad < 3; ++i) {
          for (int64_t j = 0; j < n && bad < 3; ++j) {
            if (y[static_cast<size_t>(i * n + j)] != q.at(j, i)) {
              ++bad;
              FAIL_CHECK(bits << "-bit " << to_string(mode) << ", x " << name(act) << ": y[" << i
                              << ", " << j << "] = " << y[static_cast<size_t>(i * n + j)]
                              << ", want " << q.at(j, i));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("cuda gemm: every bits, mode and group size against the CPU oracle", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  INFO(cuda::device_name(0));
  std::mt19937 rng(11);
  int i = 0;
  for (int bits : kSupportedBits) {
    for (QuantMode mode : kSupportedModes) {
      for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, kPerChannel}) {
        const Case c{bits, mode, group, i % 5 == 4 ? ScaleType::kF32 : ScaleType::kF16};
        const QuantizedMatrix q = make_matrix(c, 72, 256, rng);  // N: 4.5 tiles of 16
        for (cuda::GemmPath path : {cuda::GemmPath::kAuto, cuda::GemmPath::kSimple}) {
          const cuda::DeviceQuantizedMatrix dw(q, path);
          for (Act act : {Act::kF16, Act::kBF16}) {
            for (int64_t m : {1, 3, 17, 64}) {
              const Out out = static_cast<Out>(i++ % 3);
              check_gemm(q, dw, act, out, m, rng);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("cuda gemm: long and uneven K ranges, group boundaries inside warp ranges", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(12);
  // K = 4096: 128 chunks over 8 warps; K = 1408: 44 chunks, warp ranges of 5 and 6 chunks that
  // cut groups of 4; K = 96 and 160: one warp; K = 100: the simple path only (kAuto).
  const Case cases[] = {{4, QuantMode::kSym, 128},        {8, QuantMode::kSym, kPerChannel},
                        {4, QuantMode::kAsym, 128},       {2, QuantMode::kAsym, 64},
                        {8, QuantMode::kSymFull, 32},     {3, QuantMode::kSym, 128},
                        {4, QuantMode::kSym, kPerChannel}};
  int i = 0;
  for (int64_t k : {4096, 1408, 96, 160, 100}) {
    for (const Case& c : cases) {
      const int64_t g = c.group == kPerChannel ? k : c.group;
      if (k % g != 0) continue;
      const QuantizedMatrix q = make_matrix(c, 40, k, rng);
      const cuda::DeviceQuantizedMatrix dw(q);
      for (int64_t m : {1, 17, 100}) {
        const Act act = i % 2 == 0 ? Act::kF16 : Act::kBF16;
        check_gemm(q, dw, act, static_cast<Out>(i++ % 3), m, rng);
      }
    }
  }
}

TEST_CASE("cuda gemm: M = 0 is a no-op, and expert selects a matrix of a stack", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(13);
  const Case c{4, QuantMode::kSym, 32};
  const QuantizedMatrix q = make_matrix(c, 24, 64, rng);
  const cuda::DeviceQuantizedMatrix dw(q);
  cuda::DeviceBuffer none;
  CHECK_NOTHROW(run_gemm(Act::kF16, Out::kF16, none, 0, 64, 64, dw, nullptr, none, 24, 24));

  std::vector<QuantizedMatrix> experts;
  for (int e = 0; e < 3; ++e) experts.push_back(make_matrix(c, 24, 64, rng));
  const auto stack = cuda::DeviceQuantizedMatrix::stack(experts);
  CHECK(stack.num_experts() == 3);
  const Activations x = random_activations(Act::kF16, 5, 64, 64, rng);
  const cuda::DeviceBuffer xd = upload(x.bits);
  for (int64_t e = 0; e < 3; ++e) {
    cuda::DeviceBuffer yd = poisoned_out(Out::kF32, 5 * 24);
    run_gemm(Act::kF16, Out::kF32, xd, 5, 64, 64, stack, nullptr, yd, 24, 24, e);
    CHECK(check_rows(download_out(yd, Out::kF32, 5 * 24), 24, Out::kF32, x.values, 0, 5,
                     experts[static_cast<size_t>(e)], stack.path()) == 0);
  }
}

TEST_CASE("cuda gemm_grouped: experts of any size, empty ones included, in one launch", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(14);
  const std::vector<std::vector<int64_t>> sizes = {
      {3, 0, 17, 1, 0}, {0, 0, 0, 2, 0}, {1, 1, 1, 1, 1}, {64, 0, 9, 40, 33}, {0, 0, 0, 0, 100}};
  const Case cases[] = {{4, QuantMode::kSym, 128},
                        {8, QuantMode::kSym, kPerChannel},
                        {4, QuantMode::kAsym, 32},
                        {3, QuantMode::kSymFull, 64},
                        {2, QuantMode::kAsym, 128}};
  int i = 0;
  for (const Case& c : cases) {
    std::vector<QuantizedMatrix> experts;
    for (int e = 0; e < 5; ++e) experts.push_back(make_matrix(c, 56, 256, rng));
    for (cuda::GemmPath path : {cuda::GemmPath::kAuto, cuda::GemmPath::kSimple}) {
      const auto dw = cuda::DeviceQuantizedMatrix::stack(experts, path);
      for (const auto& rows : sizes) {
        std::vector<int64_t> offsets = {0};
        for (int64_t r : rows) offsets.push_back(offsets.back() + r);
        const int64_t m = offsets.back(), n = 56, k = 256, ldy = n + 1;
        const cuda::DeviceBuffer od = upload(offsets);
        for (int64_t hint : {int64_t{-1}, int64_t{1}, int64_t{1000}}) {
          const Act act = i % 2 == 0 ? Act::kF16 : Act::kBF16;
          const Out out = static_cast<Out>(i++ % 3);
          INFO(c.bits << "-bit " << to_string(c.mode) << ", rows per expert " << rows[0] << ","
                      << rows[1] << "," << rows[2] << "," << rows[3] << "," << rows[4] << ", hint "
                      << hint << ", x " << name(act) << ", y " << name(out));
          const Activations x = random_activations(act, m, k, k, rng);
          const cuda::DeviceBuffer xd = upload(x.bits);
          cuda::DeviceBuffer yd = poisoned_out(out, m * ldy);
          run_gemm(act, out, xd, m, k, k, dw, od.as<const int64_t>(), yd, n, ldy, 0, hint);
          const std::vector<float> y = download_out(yd, out, m * ldy);
          for (size_t e = 0; e < rows.size(); ++e) {
            CHECK(check_rows(y, ldy, out, x.values, offsets[e], rows[e], experts[e], dw.path()) ==
                  0);
          }
          // With a list of the experts that have rows (in reverse order, -1 after them), the
          // grid covers those only: the same results, bit for bit.
          if (m > 0) {
            std::vector<int32_t> list;
            for (int e = static_cast<int>(rows.size()) - 1; e >= 0; --e) {
              if (rows[static_cast<size_t>(e)] > 0) list.push_back(e);
            }
            list.resize(static_cast<size_t>(std::min<int64_t>(5, m)), -1);
            const cuda::DeviceBuffer ld = upload(list);
            cuda::DeviceBuffer yl = poisoned_out(out, m * ldy);
            run_gemm(act, out, xd, m, k, k, dw, od.as<const int64_t>(), yl, n, ldy, 0, hint, {},
                     ld.as<const int32_t>());
            const std::vector<float> y_list = download_out(yl, out, m * ldy);
            for (size_t j = 0; j < y.size(); ++j) {
              if (std::isnan(y[j])) {
                REQUIRE(std::isnan(y_list[j]));  // the stride's padding, never written
              } else {
                REQUIRE(y_list[j] == y[j]);
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("cuda gemm: shape and layout errors name the values", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(15);
  const QuantizedMatrix q100 = make_matrix({3, QuantMode::kSym, kPerChannel}, 16, 100, rng);
  CHECK_THROWS_WITH(cuda::DeviceQuantizedMatrix(q100, cuda::GemmPath::kMma),
                    Catch::Contains("not 100"));
  CHECK(cuda::DeviceQuantizedMatrix(q100).path() == cuda::GemmPath::kSimple);
  const QuantizedMatrix q4 = make_matrix({4, QuantMode::kSym, 32}, 16, 64, rng);
  const cuda::DeviceQuantizedMatrix dw(q4);
  CHECK(dw.path() == cuda::GemmPath::kMma);
  cuda::DeviceBuffer xd(2 * 64 * 2), yd(2 * 16 * 4);
  CHECK_THROWS_WITH(run_gemm(Act::kF16, Out::kF32, xd, 2, 32, 32, dw, nullptr, yd, 16, 16),
                    Catch::Contains("K = 64"));
  CHECK_THROWS_WITH(run_gemm(Act::kF16, Out::kF32, xd, 2, 64, 64, dw, nullptr, yd, 8, 8),
                    Catch::Contains("should be [2, 16]"));
  CHECK_THROWS_WITH(run_gemm(Act::kF16, Out::kF32, xd, 1, 64, 68, dw, nullptr, yd, 16, 16),
                    Catch::Contains("row stride (68)"));
  CHECK_THROWS_WITH(run_gemm(Act::kF16, Out::kF32, xd, 2, 64, 64, dw, nullptr, yd, 16, 16, 1),
                    Catch::Contains("expert 1 is out of range"));
  std::vector<QuantizedMatrix> mixed;
  mixed.push_back(q4);
  mixed.push_back(make_matrix({4, QuantMode::kSym, 64}, 16, 64, rng));
  CHECK_THROWS_WITH(cuda::DeviceQuantizedMatrix::stack(mixed), Catch::Contains("expert 1"));
}

TEST_CASE("cuda gemm: path checks need no device", "[cuda]") {
  CHECK(cuda::check_gemm_path(cuda::GemmPath::kMma, QuantScheme{4, QuantMode::kSym, 128}, 4096)
            .empty());
  CHECK(cuda::check_gemm_path(cuda::GemmPath::kMma, QuantScheme{3, QuantMode::kSym, 128}, 4096)
            .empty());
  CHECK_THAT(cuda::check_gemm_path(cuda::GemmPath::kMma,
                                   QuantScheme{8, QuantMode::kSym, kPerChannel}, 100),
             Catch::Contains("not 100"));
  CHECK(cuda::check_gemm_path(cuda::GemmPath::kSimple, QuantScheme{3, QuantMode::kAsym, 32}, 96)
            .empty());
}

TEST_CASE("cuda gemm: fused epilogues (GLU pairs, activations, row scales) against the oracle",
          "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(16);
  std::uniform_real_distribution<float> unit(0.05f, 1.0f);
  const Case cases[] = {{4, QuantMode::kSym, 128},
                        {8, QuantMode::kSym, kPerChannel},
                        {4, QuantMode::kAsym, 32, ScaleType::kF32},
                        {3, QuantMode::kSymFull, 64},
                        {2, QuantMode::kAsym, 32}};
  const Activation acts[] = {Activation::kSilu, Activation::kGeluTanh, Activation::kGelu,
                             Activation::kRelu};
  // Rows per expert: {5, 0, 19} runs token tiles of 16 (the hint is 16), {3, 0, 4} of 8.
  const std::vector<std::vector<int64_t>> layouts = {{5, 0, 19}, {3, 0, 4}};
  int i = 0;
  // I = 43: the last GLU tile holds 3 columns; I = 64: whole tiles. K = 96: a single warp;
  // K = 100: the simple path only.
  for (const Case& c : cases) {
    for (int64_t inter : {int64_t{43}, int64_t{64}}) {
      for (int64_t k : {int64_t{256}, int64_t{96}, int64_t{100}}) {
        const int64_t group = c.group == kPerChannel ? k : c.group;
        if (k % group != 0) continue;
        std::vector<QuantizedMatrix> gate, up;
        for (int e = 0; e < 3; ++e) {
          gate.push_back(make_matrix(c, inter, k, rng));
          up.push_back(make_matrix(c, inter, k, rng));
        }
        for (cuda::GemmPath path : {cuda::GemmPath::kAuto, cuda::GemmPath::kSimple}) {
          const auto glu = cuda::DeviceQuantizedMatrix::stack_glu(gate, up, path);
          const auto plain = cuda::DeviceQuantizedMatrix::stack(gate, path);
          REQUIRE(glu.glu());
          REQUIRE(glu.rows() == inter);
          REQUIRE(glu.path() == plain.path());
          if (path == cuda::GemmPath::kAuto) {
            CHECK(glu.path() == (k % 32 == 0 ? cuda::GemmPath::kMma : cuda::GemmPath::kSimple));
          }
          for (const auto& rows : layouts) {
            std::vector<int64_t> offsets = {0};
            for (int64_t r : rows) offsets.push_back(offsets.back() + r);
            const int64_t m = offsets.back(), ldy = inter + 2;
            // Row scales by slot; through a reversed row index, or directly.
            std::vector<float> scale_by_slot(static_cast<size_t>(m));
            for (auto& v : scale_by_slot) v = unit(rng);
            std::vector<int32_t> index(static_cast<size_t>(m));
            std::vector<float> scale(static_cast<size_t>(m));  // per row, after the index
            for (int64_t r = 0; r < m; ++r) {
              index[static_cast<size_t>(r)] = static_cast<int32_t>(m - 1 - r);
              scale[static_cast<size_t>(r)] = scale_by_slot[static_cast<size_t>(m - 1 - r)];
            }
            const cuda::DeviceBuffer od = upload(offsets), sd = upload(scale_by_slot),
                                     id = upload(index);
            for (bool scaled : {false, true}) {
              // Activation and input type vary independently: 8 consecutive cases cover all.
              const Activation act = acts[i % 4];
              const Act in = (i / 4) % 2 == 0 ? Act::kF16 : Act::kBF16;
              const Out out = static_cast<Out>(i++ % 3);
              INFO(c.bits << "-bit " << to_string(c.mode) << ", I = " << inter << ", K = " << k
                          << ", path " << (glu.path() == cuda::GemmPath::kMma ? "mma" : "simple")
                          << ", rows " << rows[0] << "," << rows[1] << "," << rows[2] << ", "
                          << to_string(act) << (scaled ? ", row scales" : "") << ", x " << name(in)
                          << ", y " << name(out));
              cuda::GemmEpilogue epi;
              epi.activate = true;
              epi.activation = act;
              if (scaled) {
                epi.row_scale = sd.as<const float>();
                epi.row_index = id.as<const int32_t>();
              }
              const std::vector<float> no_scale;
              const std::vector<float>& want_scale = scaled ? scale : no_scale;
              const Activations x = random_activations(in, m, k, k, rng);
              const cuda::DeviceBuffer xd = upload(x.bits);
              {  // GLU, grouped
                cuda::DeviceBuffer yd = poisoned_out(out, m * ldy);
                run_gemm(in, out, xd, m, k, k, glu, od.as<const int64_t>(), yd, inter, ldy, 0, -1,
                         epi);
                const std::vector<float> y = download_out(yd, out, m * ldy);
                for (size_t e = 0; e < rows.size(); ++e) {
                  CHECK(check_epilogue_rows(y, ldy, out, x.values, offsets[e], rows[e], gate[e],
                                            &up[e], true, act, want_scale, glu.path()) == 0);
                }
              }
              {  // GLU, one expert (expert 2) over all rows; the identity activation
                cuda::GemmEpilogue id_epi = epi;
                id_epi.activate = false;
                cuda::DeviceBuffer yd = poisoned_out(out, m * ldy);
                run_gemm(in, out, xd, m, k, k, glu, nullptr, yd, inter, ldy, 2, -1, id_epi);
                CHECK(check_epilogue_rows(download_out(yd, out, m * ldy), ldy, out, x.values, 0, m,
                                          gate[2], &up[2], false, act, want_scale,
                                          glu.path()) == 0);
              }
              {  // a plain matrix with an activation and row scales (an MLP's first projection)
                cuda::DeviceBuffer yd = poisoned_out(out, m * ldy);
                run_gemm(in, out, xd, m, k, k, plain, od.as<const int64_t>(), yd, inter, ldy, 0, -1,
                         epi);
                const std::vector<float> y = download_out(yd, out, m * ldy);
                for (size_t e = 0; e < rows.size(); ++e) {
                  CHECK(check_epilogue_rows(y, ldy, out, x.values, offsets[e], rows[e], gate[e],
                                            nullptr, true, act, want_scale, plain.path()) == 0);
                }
              }
              if (scaled) {  // the down projection's: no activation, row scales without an index
                cuda::GemmEpilogue down;
                down.row_scale = sd.as<const float>();
                cuda::DeviceBuffer yd = poisoned_out(Out::kF32, m * ldy);
                run_gemm(in, Out::kF32, xd, m, k, k, plain, od.as<const int64_t>(), yd, inter, ldy,
                         0, -1, down);
                const std::vector<float> y = download_out(yd, Out::kF32, m * ldy);
                for (size_t e = 0; e < rows.size(); ++e) {
                  CHECK(check_epilogue_rows(y, ldy, Out::kF32, x.values, offsets[e], rows[e],
                                            gate[e], nullptr, false, act, scale_by_slot,
                                            plain.path()) == 0);
                }
              }
            }
          }
        }
      }
    }
  }
  // A GLU matrix needs gate and up of one shape and code layout; a per-channel scheme and groups
  // of K are the same layout.
  const std::vector<QuantizedMatrix> g1 = {make_matrix({4, QuantMode::kSym, 32}, 16, 64, rng)};
  const std::vector<QuantizedMatrix> u1 = {make_matrix({4, QuantMode::kSym, 64}, 16, 64, rng)};
  CHECK_THROWS_WITH(cuda::DeviceQuantizedMatrix::stack_glu(g1, u1),
                    Catch::Contains("expert 0's gate"));
  CHECK_THROWS_WITH(cuda::DeviceQuantizedMatrix::stack_glu(g1, {}),
                    Catch::Contains("1 gate and 0 up"));
  const std::vector<QuantizedMatrix> gc = {
      make_matrix({4, QuantMode::kSym, kPerChannel}, 16, 64, rng)};
  const std::vector<QuantizedMatrix> uk = {make_matrix({4, QuantMode::kSym, 64}, 16, 64, rng)};
  CHECK(cuda::DeviceQuantizedMatrix::stack_glu(gc, uk).rows() == 16);
}
