// A user's program: quantize a small matrix through the installed package and check it.
#include <moqe/moqe.hpp>

#if defined(__CUDA_RUNTIME_H__) || defined(__CUDA_RUNTIME_API_H__) || defined(CUDA_VERSION)
#error "moqe/moqe.hpp must not include CUDA headers"
#endif

#include <cstdio>
#include <filesystem>
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

  // An MoE layer from a checkpoint and its config.json, run on bf16 and fp16 hidden states: the
  // fp32 run on the same input, rounded once.
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "moqe-consumer-moe";
  moqe::SyntheticMoeSpec spec;
  spec.hidden = 64;
  spec.intermediate = 32;
  spec.experts = 4;
  moqe::write_synthetic_moe(dir, spec);
  const moqe::MoELayer layer =
      moqe::load_moe_layer(moqe::Checkpoint(dir), moqe::synthetic_moe_prefix(spec),
                           moqe::read_moe_config(dir / "config.json"));
  const int64_t t = 3, h = layer.hidden();
  std::vector<moqe::BFloat16> xb;
  std::vector<moqe::Half> xh;
  std::vector<float> xf;
  for (int64_t i = 0; i < t * h; ++i) {
    xb.push_back(moqe::BFloat16(static_cast<float>(i % 13) * 0.125f - 0.75f));
    xf.push_back(static_cast<float>(xb.back()));
    xh.push_back(moqe::Half(xf.back()));  // exact in fp16 too
  }
  auto ws = layer.make_workspace(t);
  std::vector<float> yf(xf.size());
  layer.run(moqe::MatrixView<const float>(xf.data(), t, h),
            moqe::MatrixView<float>(yf.data(), t, h), ws);
  std::vector<moqe::BFloat16> yb(xf.size());
  layer.run(moqe::MatrixView<const moqe::BFloat16>(xb.data(), t, h),
            moqe::MatrixView<moqe::BFloat16>(yb.data(), t, h), ws);
  std::vector<moqe::Half> yh(xf.size());
  layer.run(moqe::MatrixView<const moqe::Half>(xh.data(), t, h),
            moqe::MatrixView<moqe::Half>(yh.data(), t, h), ws);
  for (size_t i = 0; i < yf.size(); ++i) {
    if (yb[i].bits != moqe::BFloat16(yf[i]).bits || yh[i].bits != moqe::Half(yf[i]).bits) {
      std::printf("16-bit run differs from the rounded fp32 run at %zu\n", i);
      return 1;
    }
  }
  std::filesystem::remove_all(dir);
  std::printf("moqe %s consumer ok\n", moqe::kVersion);
  return 0;
}
