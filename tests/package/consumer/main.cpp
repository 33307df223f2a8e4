// A user's program: quantize a small matrix through the installed package and check it.
#include <moqe/moqe.hpp>

#if defined(__CUDA_RUNTIME_H__) || defined(__CUDA_RUNTIME_API_H__) || defined(CUDA_VERSION)
#error "moqe/moqe.hpp must not include CUDA headers"
#endif

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> w(4 * 64);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i % 15) - 7.0f;
  const moqe::QuantizedMatrix q = moqe::quantize(moqe::MatrixView<const float>(w.data(), 4, 64),
                                                 {4, moqe::QuantMode::kSym, 32});
  const std::vector<float> back = moqe::dequantize(q);
  for (size_t i = 0; i < w.size(); ++i) {
    if (back[i] != w[i]) {  // integers in [-7, 7]: the scale is 1 and every value is a level
      std::printf("mismatch at %zu: %g != %g\n", i, back[i], w[i]);
      return 1;
    }
  }
  std::printf("moqe %s consumer ok\n", moqe::kVersion);
  return 0;
}
