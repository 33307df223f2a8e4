// The quick-start demo: writes a synthetic Mixtral-shaped MoE checkpoint (BF16, Gaussian weights
// with a few outlier input channels), quantizes its experts at 8/4/3/2 bits per-channel, in
// blocks of 128 and with adaptive group sizes, prints size against error, then runs the MoE
// layer with each and prints output error and time per token.
#include <unistd.h>
#include <moqe/moqe.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>

namespace {

struct Args {
  bool small = false;
  bool keep = false;
  std::filesystem::path dir;
  int64_t hidden = 1024, intermediate = 3584, experts = 8;
};

int usage() {
  std::fprintf(
      stderr,
      "usage: moqe_demo [--small] [--dir DIR] [--keep] [--hidden H] [--intermediate I] "
      "[--experts E]\n"
      "  default shape: Mixtral's layout at 1/4 width (H 1024, I 3584, 8 experts);\n"
      "  --hidden 4096 --intermediate 14336 gives the true Mixtral layer (5.6 GB fp32).\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (s == "--small") {
      a.small = true;
      a.hidden = 256;
      a.intermediate = 512;
      a.experts = 4;
    } else if (s == "--keep") {
      a.keep = true;
    } else if (s == "--dir" && i + 1 < argc) {
      a.dir = next();
    } else if (s == "--hidden" && i + 1 < argc) {
      a.hidden = std::atoll(next());
    } else if (s == "--intermediate" && i + 1 < argc) {
      a.intermediate = std::atoll(next());
    } else if (s == "--experts" && i + 1 < argc) {
      a.experts = std::atoll(next());
    } else {
      return usage();
    }
  }
  const bool own_dir = a.dir.empty();
  if (own_dir) {
    a.dir = std::filesystem::temp_directory_path() / fmt::format("moqe-demo-{}", getpid());
  }
  try {
    std::filesystem::create_directories(a.dir);
    moqe::SyntheticMoeSpec spec;
    spec.hidden = a.hidden;
    spec.intermediate = a.intermediate;
    spec.experts = a.experts;
    spec.dtype = moqe::DType::kBF16;
    std::printf("moqe %s demo: a Mixtral-shaped MoE layer, H %lld, I %lld, %lld experts, BF16\n",
                moqe::kVersion, static_cast<long long>(a.hidden),
                static_cast<long long>(a.intermediate), static_cast<long long>(a.experts));
    const auto t0 = std::chrono::steady_clock::now();
    moqe::write_synthetic_moe(a.dir / "model", spec);
    const moqe::Checkpoint model(a.dir / "model");
    std::printf("wrote %s (%zu tensors) in %.1f s\n\n", (a.dir / "model").c_str(), model.size(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

    std::printf("%-5s %-9s %8s %12s %10s %10s %10s %9s %7s\n", "bits", "groups", "bits/w",
                "expert bytes", "vs BF16", "rel.err", "max.err", "SQNR dB", "time s");
    bool ok = true;
    double prev_err = 0;
    for (int bits : {8, 4, 3, 2}) {
      for (moqe::GroupPolicy policy : {moqe::GroupPolicy::kPerChannel, moqe::GroupPolicy::kFixed,
                                       moqe::GroupPolicy::kAdaptive}) {
        moqe::ConvertOptions o;
        o.bits = bits;
        o.group_policy = policy;
        o.group_size = 128;
        const auto out = a.dir / fmt::format("q{}_{}.safetensors", bits, static_cast<int>(policy));
        const moqe::ConvertReport r = moqe::quantize_checkpoint(model, out, o);
        double err2 = 0, max_err = 0, sqnr = 0;
        std::string groups = policy == moqe::GroupPolicy::kPerChannel ? "channel"
                             : policy == moqe::GroupPolicy::kFixed    ? "g128"
                                                                      : "adaptive";
        int64_t n = 0, min_g = INT64_MAX, max_g = 0;
        for (const moqe::TensorReport& t : r.tensors) {
          if (!t.quantized) continue;
          err2 += t.error.rel_frobenius * t.error.rel_frobenius;
          max_err = std::max(max_err, t.error.max_abs);
          sqnr += t.error.sqnr_db;
          min_g = std::min(min_g, t.group_size);
          max_g = std::max(max_g, t.group_size);
          ++n;
        }
        const double rms_err = std::sqrt(err2 / static_cast<double>(n));
        if (policy == moqe::GroupPolicy::kAdaptive) {
          groups =
              min_g == max_g ? fmt::format("ad:{}", min_g) : fmt::format("ad:{}-{}", min_g, max_g);
        }
        std::printf(
            "%-5d %-9s %8.3f %12lld %9.2fx %10.5f %10.5f %9.2f %7.2f\n", bits, groups.c_str(),
            static_cast<double>(r.quantized_bytes_out) * 8.0 /
                (static_cast<double>(r.quantized_bytes_in) / 2.0),
            static_cast<long long>(r.quantized_bytes_out),
            static_cast<double>(r.quantized_bytes_in) / static_cast<double>(r.quantized_bytes_out),
            rms_err, max_err, sqnr / static_cast<double>(n), r.seconds);
        // Self-check: every expert matrix was quantized, and fewer bits cost accuracy.
        ok = ok && n == 3 * a.experts;
        if (policy == moqe::GroupPolicy::kFixed) {
          ok = ok && rms_err > prev_err;
          prev_err = rms_err;
        }
      }
    }
    std::printf(
        "\nrel.err: RMS over expert matrices of ||W - deq(q(W))|| / ||W||; adaptive is "
        "moqe's rule (largest G within 1.1x of the finest group's error).\n");

    // The MoE layer itself: BF16 weights against 8/4/3/2-bit experts (groups of 128), on the
    // same tokens, one token per call as in decoding.
    const int64_t tokens = a.small ? 8 : 32, h = a.hidden;
    std::vector<float> x(static_cast<size_t>(tokens * h));
    std::mt19937 rng(7);
    std::normal_distribution<float> gauss(0.0f, 1.0f);
    for (auto& v : x) v = gauss(rng);
    const std::string prefix = moqe::synthetic_moe_prefix(spec);
    const moqe::MoeConfig config =
        moqe::read_moe_config(a.dir / "model" / "config.json", moqe::Family::kMixtral);
    struct Run {
      std::vector<float> y;
      double ms_per_token = 0;
      int64_t bytes = 0;
    };
    auto run_layer = [&](const moqe::Checkpoint& ckpt,
                         moqe::Numerics numerics = moqe::Numerics::kExact) {
      moqe::LoadOptions lo;
      lo.numerics = numerics;
      const moqe::MoELayer layer = moqe::load_moe_layer(ckpt, prefix, config, lo);
      auto ws = layer.make_workspace(1);
      Run r;
      r.y.resize(x.size());
      r.bytes = layer.stats().weight_bytes;
      const auto t1 = std::chrono::steady_clock::now();
      for (int64_t t = 0; t < tokens; ++t) {
        layer.run(moqe::MatrixView<const float>(x.data() + t * h, 1, h),
                  moqe::MatrixView<float>(r.y.data() + t * h, 1, h), ws);
      }
      r.ms_per_token =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count() /
          static_cast<double>(tokens);
      return r;
    };
    const Run base = run_layer(model);
    std::printf("\nMoE layer, %lld tokens one at a time (CPU kernels up to %s, %d threads):\n",
                static_cast<long long>(tokens),
                std::string(moqe::to_string(moqe::active_cpu_isa())).c_str(),
                moqe::default_num_threads());
    std::printf("%-14s %14s %12s %12s %10s\n", "experts", "weight bytes", "out rel.err",
                "out SQNR dB", "ms/token");
    std::printf("%-14s %14lld %12s %12s %10.2f\n", "bf16", static_cast<long long>(base.bytes), "-",
                "-", base.ms_per_token);
    double prev_out = 0, int4_out = 0;
    auto report = [&](const std::string& label, const Run& q) {
      const moqe::ErrorStats e =
          moqe::compare(moqe::MatrixView<const float>(base.y.data(), tokens, h),
                        moqe::MatrixView<const float>(q.y.data(), tokens, h));
      std::printf("%-14s %14lld %12.5f %12.2f %10.2f\n", label.c_str(),
                  static_cast<long long>(q.bytes), e.rel_frobenius, e.sqnr_db, q.ms_per_token);
      return e.rel_frobenius;
    };
    auto quantized = [&](int bits) {
      return moqe::Checkpoint(a.dir / fmt::format("q{}_{}.safetensors", bits,
                                                  static_cast<int>(moqe::GroupPolicy::kFixed)));
    };
    for (int bits : {8, 4, 3, 2}) {
      const double err = report(fmt::format("int{} g128", bits), run_layer(quantized(bits)));
      ok = ok && err > prev_out;  // fewer bits, larger output error
      prev_out = err;
      if (bits == 4) int4_out = err;
    }
    // Fast mode: the same int4 experts with activations quantized to int8 per 32-block.
    const double fast_out =
        report("int4 g128 fast", run_layer(quantized(4), moqe::Numerics::kFast));
    ok = ok && fast_out < 1.1 * int4_out;  // int8 activations add little to int4 weights' error
    std::printf(
        "out rel.err: ||y - y_bf16|| / ||y_bf16|| of the layer output (the router is not "
        "quantized, so every token reaches the same experts). \"fast\": int8 activations "
        "(Numerics::kFast, `moqe moe-forward --numerics fast`).\n");
    if (own_dir && !a.keep) std::filesystem::remove_all(a.dir);
    if (!ok) {
      std::fprintf(stderr, "demo self-check failed\n");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moqe_demo: error: %s\n", e.what());
    if (own_dir && !a.keep) std::filesystem::remove_all(a.dir);
    return 1;
  }
}
