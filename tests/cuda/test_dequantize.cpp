// The CUDA dequantization kernel against the CPU reference, on random data. Without a device each
// test reports "SKIPPED: no CUDA device" (ctest counts it as skipped).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "cuda/require_device.hpp"
#include "moqe/cuda/dequantize.hpp"
#include "moqe/cuda/runtime.hpp"

using namespace moqe;

TEST_CASE("cuda: dequantize matches the CPU reference bit for bit", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  INFO(cuda::device_name(0));
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t k : {32, 96, 100, 4096}) {
    for (int bits : kSupportedBits) {
      for (QuantMode mode : kSupportedModes) {
        const int64_t n = 37;
        std::vector<float> w(static_cast<size_t>(n * k));
        for (auto& x : w) x = g(rng);
        const QuantScheme s{bits, mode, k % 32 == 0 ? 32 : kPerChannel};
        const QuantizedMatrix q = quantize(MatrixView<const float>(w.data(), n, k), s);
        std::vector<float> out(w.size(), std::nanf(""));  // poisoned: unwritten elements show
        cuda::dequantize(q, out);
        REQUIRE(out == dequantize(q));
      }
    }
  }
}

TEST_CASE("cuda: device buffers check their sizes", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  cuda::DeviceBuffer b(16);
  std::vector<float> host(8);
  CHECK_THROWS_WITH(b.upload(host.data(), 32), Catch::Contains("32 bytes"));
  CHECK_NOTHROW(b.upload(host.data(), 16));
}
