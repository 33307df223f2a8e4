// 01: quantize one expert matrix with every bit width and mode, dequantize it, and measure the
// error. Shows QuantScheme, quantize / dequantize, ErrorStats and the adaptive group size.
#include <moqe/moqe.hpp>

#include <cmath>
#include <cstdio>

int main() {
  const int64_t n = 512, k = 1024;  // [out, in], as in PyTorch
  const std::vector<float> w = moqe::synthetic_weights(n, k, /*seed=*/1);
  const moqe::MatrixView<const float> view(w.data(), n, k);

  std::printf("%-22s %10s %10s %10s\n", "scheme", "bits/w", "rel.err", "SQNR dB");
  double previous = 0;
  for (int bits : {8, 4, 3, 2}) {
    for (moqe::QuantMode mode : moqe::kSupportedModes) {
      const moqe::QuantScheme scheme{bits, mode, 128};
      const moqe::QuantizedMatrix q = moqe::quantize(view, scheme);
      const moqe::ErrorStats e = moqe::quantization_error(view, q);
      std::printf("%-22s %10.3f %10.5f %10.2f\n", scheme.to_string().c_str(), q.bits_per_weight(),
                  e.rel_frobenius, e.sqnr_db);
      // Self-check: the dequantized matrix matches the error statistics.
      const std::vector<float> d = moqe::dequantize(q);
      const moqe::ErrorStats again =
          moqe::compare(view, moqe::MatrixView<const float>(d.data(), n, k));
      if (again.rel_frobenius != e.rel_frobenius) return 1;
      if (mode == moqe::QuantMode::kSym) {
        if (e.rel_frobenius <= previous) {  // fewer bits must cost accuracy
          std::printf("error did not grow as bits fell\n");
          return 1;
        }
        previous = e.rel_frobenius;
      }
    }
  }
  const moqe::AdaptiveResult a = moqe::quantize_adaptive(view, {4, moqe::QuantMode::kSym, 0});
  std::printf("\nadaptive group size at 4 bits (tau = 0.10):\n");
  for (const auto& c : a.candidates) {
    std::printf("  G = %5lld  rel.err %.5f  bits/w %.3f%s\n", static_cast<long long>(c.group_size),
                c.rel_error, c.bits_per_weight,
                c.group_size == a.chosen_group_size ? "  <- chosen" : "");
  }
  return a.matrix.group_size() == a.chosen_group_size ? 0 : 1;
}
