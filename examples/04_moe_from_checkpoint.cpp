// 04: an MoE layer from a checkpoint. Writes a small Qwen2-MoE style checkpoint (60 experts of
// which 4 are chosen, plus a gated shared expert), quantizes its experts to 8/4/3/2 bits with
// moqe's converter, loads each with load_moe_layer and compares the layer's output and time per
// token with the BF16 original.
#include <unistd.h>
#include <moqe/moqe.hpp>

#include <chrono>
#include <cstdio>
#include <random>

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "--small";
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("moqe-ex04-{}", getpid());
  moqe::SyntheticMoeSpec spec;
  spec.family = "qwen2_moe";
  spec.hidden = small ? 128 : 1024;
  spec.intermediate = small ? 64 : 512;
  spec.shared_intermediate = 4 * spec.intermediate;
  spec.experts = small ? 16 : 60;
  spec.top_k = 4;
  moqe::write_synthetic_moe(dir / "model", spec);
  const moqe::Checkpoint model(dir / "model");
  const moqe::MoeConfig config =
      moqe::read_moe_config(dir / "model" / "config.json", moqe::Family::kQwen2Moe);
  const std::string prefix = moqe::synthetic_moe_prefix(spec);

  const int64_t tokens = 16, h = spec.hidden;
  std::vector<float> x(static_cast<size_t>(tokens * h));
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x) v = g(rng);
  auto run = [&](const moqe::Checkpoint& ckpt, std::vector<float>& y) {
    const moqe::MoELayer layer = moqe::load_moe_layer(ckpt, prefix, config);
    auto ws = layer.make_workspace(1);
    y.resize(x.size());
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t t = 0; t < tokens; ++t) {  // one token per call, as in decoding
      layer.run(moqe::MatrixView<const float>(x.data() + t * h, 1, h),
                moqe::MatrixView<float>(y.data() + t * h, 1, h), ws);
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return std::make_pair(layer.stats().weight_bytes, ms / tokens);
  };
  std::vector<float> y_ref, y;
  const auto [ref_bytes, ref_ms] = run(model, y_ref);
  std::printf("%-8s %14s %12s %10s\n", "experts", "layer bytes", "out rel.err", "ms/token");
  std::printf("%-8s %14lld %12s %10.3f\n", "bf16", static_cast<long long>(ref_bytes), "-", ref_ms);
  double prev = 0;
  for (int bits : {8, 4, 3, 2}) {
    moqe::ConvertOptions o;
    o.bits = bits;
    o.mode = moqe::QuantMode::kAsym;
    o.group_policy = moqe::GroupPolicy::kFixed;
    o.group_size = 64;
    moqe::quantize_checkpoint(model, dir / "q.safetensors", o);
    const auto [bytes, ms] = run(moqe::Checkpoint(dir / "q.safetensors"), y);
    const moqe::ErrorStats e = moqe::compare(moqe::MatrixView<const float>(y_ref.data(), tokens, h),
                                             moqe::MatrixView<const float>(y.data(), tokens, h));
    std::printf("%-8s %14lld %12.5f %10.3f\n", fmt::format("int{}", bits).c_str(),
                static_cast<long long>(bytes), e.rel_frobenius, ms);
    if (e.rel_frobenius <= prev) return 1;  // self-check: fewer bits, larger error
    prev = e.rel_frobenius;
  }
  std::filesystem::remove_all(dir);
  return 0;
}
