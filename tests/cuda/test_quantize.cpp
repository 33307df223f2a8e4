// Quantization on the GPU against moqe::quantize (the CPU reference), bit for bit, on random
// data for every bit width, mode, group size and scale type. Without a device each test reports
// "SKIPPED: no CUDA device".
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "cuda/require_device.hpp"
#include "moqe/cuda/quantize.hpp"
#include "moqe/cuda/runtime.hpp"

using namespace moqe;

namespace {

void require_same(const QuantizedMatrix& a, const QuantizedMatrix& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  REQUIRE(std::vector<uint8_t>(a.qweight().begin(), a.qweight().end()) ==
          std::vector<uint8_t>(b.qweight().begin(), b.qweight().end()));
  REQUIRE(std::vector<float>(a.scales().begin(), a.scales().end()) ==
          std::vector<float>(b.scales().begin(), b.scales().end()));
  REQUIRE(std::vector<uint8_t>(a.zeros().begin(), a.zeros().end()) ==
          std::vector<uint8_t>(b.zeros().begin(), b.zeros().end()));
}

}  // namespace

TEST_CASE("cuda: quantize equals the CPU reference bit for bit", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(9);
  std::normal_distribution<float> g(0.0f, 0.05f);
  for (int64_t k : {32, 96, 100, 256, 4096}) {
    for (int bits : kSupportedBits) {
      for (QuantMode mode : kSupportedModes) {
        for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, kPerChannel}) {
          if (group != kPerChannel && k % group != 0) continue;
          for (ScaleType st : {ScaleType::kF16, ScaleType::kF32}) {
            const int64_t n = 37;
            std::vector<float> w(static_cast<size_t>(n * k));
            for (auto& x : w) x = g(rng);
            w[5] = 0.9f;  // an outlier
            for (int64_t c = 0; c < std::min<int64_t>(k, 32); ++c)
              w[static_cast<size_t>(k + c)] = 0;
            QuantScheme s{bits, mode, group};
            s.scale_type = st;
            INFO("k " << k << " bits " << bits << " group " << group);
            const MatrixView<const float> v(w.data(), n, k);
            require_same(cuda::quantize(v, s), quantize(v, s));
          }
        }
      }
    }
  }
}

TEST_CASE("cuda: quantize reads strided views and reports the reference's errors", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::vector<float> w(static_cast<size_t>(8 * 80));
  std::mt19937 rng(2);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& x : w) x = g(rng);
  const MatrixView<const float> strided(w.data(), 8, 64, 80);
  const QuantScheme s{4, QuantMode::kAsym, 32};
  require_same(cuda::quantize(strided, s, "w"), quantize(strided, s));
  std::vector<float> big(64, 1e9f);  // |w| / 7 overflows fp16
  CHECK_THROWS_WITH(cuda::quantize(MatrixView<const float>(big.data(), 1, 64),
                                   QuantScheme{4, QuantMode::kSym, 32}, "big"),
                    Catch::Contains("tensor 'big': the scale of row 0, group 0"));
  w[100] = std::nanf("");
  CHECK_THROWS_WITH(cuda::quantize(MatrixView<const float>(w.data(), 8, 80), s, "nan"),
                    Catch::Contains("nan"));
}
