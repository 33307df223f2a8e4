// 03: a mixed-precision linear layer. QuantizedLinear computes y = x . W^T with W held at 4 bits
// (groups of 128) and fp32 activations, dequantizing in registers: it stores about 8x fewer
// bytes than an fp32 layer holding the dequantized weights, and agrees with it to fp32 rounding
// (bit for bit under the reference kernels, whose summation order is the same for both).
#include <moqe/moqe.hpp>

#include <chrono>
#include <cstdio>
#include <random>

int main() {
  const int64_t n = 4096, k = 1024;
  const std::vector<float> w = moqe::synthetic_weights(n, k, 1);
  const moqe::QuantizedMatrix q = moqe::quantize(moqe::MatrixView<const float>(w.data(), n, k),
                                                 {4, moqe::QuantMode::kSym, 128});
  const auto lq = moqe::QuantizedLinear::from_quantized(q);
  const auto lf = moqe::QuantizedLinear::from_f32(moqe::dequantize(q), n, k);
  moqe::set_cpu_isa_cap(moqe::CpuIsa::kReference);
  const auto rq = moqe::QuantizedLinear::from_quantized(q);
  const auto rf = moqe::QuantizedLinear::from_f32(moqe::dequantize(q), n, k);
  std::printf("kernels: %s (reference for the bit-for-bit check)\n",
              std::string(moqe::to_string(lq.isa())).c_str());
  std::printf("W [%lld, %lld]: %s %lld bytes, f32 %lld bytes\n", static_cast<long long>(n),
              static_cast<long long>(k), lq.describe().c_str(),
              static_cast<long long>(lq.weight_bytes()), static_cast<long long>(lf.weight_bytes()));
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t m : {1, 16}) {
    std::vector<float> x(static_cast<size_t>(m * k)), yq(static_cast<size_t>(m * n)), yf(yq.size());
    for (auto& v : x) v = g(rng);
    const moqe::MatrixView<const float> xv(x.data(), m, k);
    const auto t0 = std::chrono::steady_clock::now();
    lq.forward(xv, moqe::MatrixView<float>(yq.data(), m, n));
    const auto t1 = std::chrono::steady_clock::now();
    lf.forward(xv, moqe::MatrixView<float>(yf.data(), m, n));
    const auto t2 = std::chrono::steady_clock::now();
    const double rel = moqe::compare(moqe::MatrixView<const float>(yf.data(), m, n),
                                     moqe::MatrixView<const float>(yq.data(), m, n))
                           .rel_frobenius;
    std::vector<float> zq(yq.size()), zf(yq.size());
    rq.forward(xv, moqe::MatrixView<float>(zq.data(), m, n));
    rf.forward(xv, moqe::MatrixView<float>(zf.data(), m, n));
    std::printf(
        "M = %2lld: int4 %.3f ms, f32 %.3f ms, relative difference %.2g, reference "
        "kernels identical: %s\n",
        static_cast<long long>(m), std::chrono::duration<double, std::milli>(t1 - t0).count(),
        std::chrono::duration<double, std::milli>(t2 - t1).count(), rel, zq == zf ? "yes" : "NO");
    if (zq != zf || rel > 1e-5) return 1;  // fp32 rounding over K = 1024 terms
  }
  return 0;
}
