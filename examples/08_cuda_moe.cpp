// 08: an MoE layer on the GPU. Writes a Mixtral-shaped checkpoint, quantizes its experts to int4
// (group 128), loads the layer on the CPU and on the GPU (moqe::cuda::MoELayer: weights uploaded
// once, workspace planned once), runs the same tokens on both and compares outputs and routing,
// then times decode steps on the GPU. Exits 77 (ctest: skipped) when there is no CUDA device, 1
// with MOQE_REQUIRE_GPU=1.
//
//   ./08_cuda_moe [--small]
#include <unistd.h>
#include <moqe/cuda/moe.hpp>
#include <moqe/moqe.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "--small";
  if (moqe::cuda::device_count() == 0) {
    const char* required = std::getenv("MOQE_REQUIRE_GPU");
    const bool fail = required != nullptr && std::string(required) == "1";
    std::printf("no CUDA device (%s): %s\n", moqe::cuda::device_error().c_str(),
                fail ? "MOQE_REQUIRE_GPU=1, so this is a failure" : "nothing to run (skipped)");
    return fail ? 1 : 77;
  }
  std::printf("device: %s\n", moqe::cuda::device_name(0).c_str());
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("moqe-ex08-{}", getpid());
  moqe::SyntheticMoeSpec spec;  // mixtral, 8 experts, top-2
  spec.hidden = small ? 256 : 4096;
  spec.intermediate = small ? 512 : 14336;
  moqe::write_synthetic_moe(dir / "model", spec);
  moqe::ConvertOptions q;
  q.bits = 4;
  q.group_policy = moqe::GroupPolicy::kFixed;
  q.group_size = 128;
  moqe::quantize_checkpoint(moqe::Checkpoint(dir / "model"), dir / "int4.safetensors", q);
  const moqe::Checkpoint ckpt(dir / "int4.safetensors");
  const moqe::MoeConfig config =
      moqe::read_moe_config(dir / "model" / "config.json", moqe::Family::kMixtral);
  const std::string prefix = moqe::synthetic_moe_prefix(spec);
  const moqe::MoELayer cpu = moqe::load_moe_layer(ckpt, prefix, config);
  const moqe::cuda::MoELayer gpu = moqe::cuda::MoELayer::load(ckpt, prefix, config);
  std::printf("layer: %.1f MB on the device\n", static_cast<double>(gpu.device_bytes()) / 1e6);

  const int64_t tokens = 16, h = spec.hidden;
  std::vector<float> x(static_cast<size_t>(tokens * h)), y_cpu(x.size()), y_gpu(x.size());
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x) v = g(rng);
  auto cws = cpu.make_workspace(tokens);
  cpu.run(moqe::MatrixView<const float>(x.data(), tokens, h),
          moqe::MatrixView<float>(y_cpu.data(), tokens, h), cws);
  auto ws = gpu.make_workspace(tokens);
  moqe::cuda::DeviceBuffer dx(x.size() * sizeof(float)), dy(x.size() * sizeof(float));
  dx.upload(std::span<const float>(x));
  gpu.run(dx.as<float>(), dy.as<float>(), tokens, ws);
  dy.download(std::span<float>(y_gpu));
  moqe::Routing routing;
  moqe::cuda::download(ws.routing, routing);
  const moqe::ErrorStats e = moqe::compare(moqe::MatrixView<const float>(y_cpu.data(), tokens, h),
                                           moqe::MatrixView<const float>(y_gpu.data(), tokens, h));
  const bool same_routing = routing.ids == cws.routing.ids;
  std::printf("GPU vs CPU: routing %s, output relative error %.2e (fp16 activations)\n",
              same_routing ? "identical" : "DIFFERS", e.rel_frobenius);

  // Decode: one token per step.
  const int steps = small ? 20 : 200;
  auto ws1 = gpu.make_workspace(1);
  gpu.run(dx.as<float>(), dy.as<float>(), 1, ws1);  // warm-up
  std::vector<float> one(static_cast<size_t>(h));
  dy.download(one.data(), one.size() * sizeof(float));  // synchronizes
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) gpu.run(dx.as<float>(), dy.as<float>(), 1, ws1);
  dy.download(one.data(), one.size() * sizeof(float));
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      steps;
  std::printf("decode: %.1f us per token (host-timed, %d steps)\n", us, steps);
  std::filesystem::remove_all(dir);
  const bool ok = same_routing && e.rel_frobenius < std::ldexp(1.0, -9);
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
