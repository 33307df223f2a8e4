// Concurrency: one const MoELayer run from 8 threads at once (different inputs and token counts)
// equals serial runs bit for bit; layers load from one shared Checkpoint on several threads; the
// temporary-file registry holds up under concurrent writes; two processes load the same
// checkpoint, and write the same output, at once. Tagged [concurrency]: .ci/run runs these
// under ThreadSanitizer (with one thread per run, since libgomp is not instrumented).
#include <fmt/core.h>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "reliability/process_util.hpp"
#include "test_util.hpp"

using namespace moqe;
namespace fs = std::filesystem;

namespace {

constexpr int kThreads = 8;

std::vector<float> inputs(int64_t t, int64_t h, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(t * h));
  for (float& v : x) v = g(rng);
  return x;
}

struct Output {
  std::vector<float> y;
  std::vector<int32_t> ids;
  bool operator==(const Output& o) const {
    return ids == o.ids && y.size() == o.y.size() &&
           std::memcmp(y.data(), o.y.data(), y.size() * sizeof(float)) == 0;
  }
};

Output run(const MoELayer& layer, const std::vector<float>& x, MoELayer::Workspace& ws) {
  const int64_t h = layer.hidden(), t = static_cast<int64_t>(x.size()) / h;
  Output o;
  o.y.assign(x.size(), 0.0f);
  layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(o.y.data(), t, h), ws,
            {1, {}, {}, 0, {}});
  o.ids = ws.routing.ids;
  o.ids.resize(static_cast<size_t>(t * ws.routing.slots));
  return o;
}

// A small checkpoint of `family` in `dir`, quantized to 4 bits when `quantized`.
fs::path make_checkpoint(const test::TempDir& dir, const std::string& family, bool quantized) {
  SyntheticMoeSpec s;
  s.family = family;
  s.hidden = 64;
  s.intermediate = 64;
  s.experts = 8;
  s.top_k = family == "switch" ? 1 : 2;
  s.n_group = 4;
  s.topk_group = 2;
  s.expert_capacity = 3;
  s.shared_intermediate = family == "qwen2_moe" || family == "deepseek_v3" ? 64 : 0;
  s.shards = 2;
  const fs::path src = dir / (family + "-src");
  write_synthetic_moe(src, s);
  if (!quantized) return src;
  const fs::path q = dir / family;
  fs::create_directories(q);
  ConvertOptions o;
  o.bits = 4;
  o.group_policy = GroupPolicy::kFixed;
  o.group_size = 32;
  o.num_threads = 1;
  quantize_checkpoint(Checkpoint(src), q / "model.safetensors", o);
  fs::copy_file(src / "config.json", q / "config.json");
  return q;
}

}  // namespace

TEST_CASE("one MoELayer run from 8 threads at once equals serial runs",
          "[reliability][concurrency]") {
  test::TempDir dir;
  for (const auto& [family, quantized] : std::vector<std::pair<std::string, bool>>{
           {"qwen2_moe", true}, {"deepseek_v3", false}, {"switch", true}}) {
    INFO(family << (quantized ? " int4" : " bf16"));
    const fs::path ckpt_dir = make_checkpoint(dir, family, quantized);
    const Checkpoint ckpt(ckpt_dir);
    const MoELayer layer = load_moe_layer(
        ckpt, synthetic_moe_prefix({.family = family}),
        read_moe_config(ckpt_dir / "config.json", *parse_family(family)), {true, 1, true});
    // Different token counts (1 to 36) and values per thread; serial results first.
    std::vector<std::vector<float>> xs;
    std::vector<Output> serial;
    for (int i = 0; i < kThreads; ++i) {
      xs.push_back(inputs(1 + 5 * i, layer.hidden(), 100 + i));
      MoELayer::Workspace ws = layer.make_workspace(40);
      serial.push_back(run(layer, xs.back(), ws));
    }
    std::vector<std::vector<Output>> parallel(kThreads);
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; ++i) {
      threads.emplace_back([&, i] {
        MoELayer::Workspace ws = layer.make_workspace(40);
        ready.fetch_add(1);
        while (ready.load() < kThreads) std::this_thread::yield();  // start together
        for (int rep = 0; rep < 3; ++rep) parallel[i].push_back(run(layer, xs[i], ws));
      });
    }
    for (std::thread& t : threads) t.join();
    for (int i = 0; i < kThreads; ++i) {
      for (const Output& o : parallel[i]) CHECK(o == serial[i]);
    }
  }
}

TEST_CASE("layers load from one shared Checkpoint on several threads at once",
          "[reliability][concurrency]") {
  test::TempDir dir;
  const fs::path ckpt_dir = make_checkpoint(dir, "mixtral", true);
  const Checkpoint ckpt(ckpt_dir);
  const MoeConfig config = read_moe_config(ckpt_dir / "config.json", Family::kMixtral);
  const std::string prefix = synthetic_moe_prefix({});
  const std::vector<float> x = inputs(12, 64, 7);
  MoELayer reference_layer = load_moe_layer(ckpt, prefix, config, {true, 1, true});
  MoELayer::Workspace ws = reference_layer.make_workspace(12);
  const Output reference = run(reference_layer, x, ws);
  std::vector<Output> outputs(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      const MoELayer layer = load_moe_layer(ckpt, prefix, config, {true, 1, true});
      MoELayer::Workspace w = layer.make_workspace(12);
      outputs[i] = run(layer, x, w);
    });
  }
  for (std::thread& t : threads) t.join();
  for (const Output& o : outputs) CHECK(o == reference);
}

TEST_CASE("temporary files stay consistent when removed while writes are in progress",
          "[reliability][concurrency]") {
  // What a signal handler does, from another thread and in a loop: every write either completes
  // (its target holds all its bytes) or fails with moqe::Error (its target keeps the previous
  // content); no temporary file survives.
  test::TempDir dir;
  const std::vector<std::byte> bytes(size_t{1} << 20, std::byte{42});
  std::atomic<bool> stop{false};
  std::atomic<int> completed{0}, failed{0};
  std::vector<std::thread> writers;
  for (int i = 0; i < 4; ++i) {
    writers.emplace_back([&, i] {
      const fs::path target = dir / fmt::format("t{}", i);
      for (int n = 0; n < 20; ++n) {
        try {
          write_file_atomically(target, bytes);
          completed.fetch_add(1);
        } catch (const Error&) {
          failed.fetch_add(1);
        }
      }
    });
  }
  std::thread remover([&] {
    while (!stop.load()) remove_temporary_files();
  });
  for (std::thread& t : writers) t.join();
  stop = true;
  remover.join();
  CHECK(completed + failed == 80);
  for (const std::string& name : dir.entries()) {
    INFO(name);
    CHECK(name.find(".tmp.") == std::string::npos);
    CHECK(fs::file_size(dir / name) == bytes.size());
  }
}

TEST_CASE("two processes load the same checkpoint and write the same output at once",
          "[reliability][concurrency][cli]") {
  test::TempDir dir;
  const fs::path q = make_checkpoint(dir, "olmoe", true);
  SafetensorsWriter xw;
  xw.add_values<float>("x", DType::kF32, {6, 64}, inputs(6, 64, 3));
  xw.write(dir / "x.safetensors");

  SECTION("moe-forward twice on the same weights") {
    auto args = [&](const std::string& out) {
      return std::vector<std::string>{"moe-forward",
                                      "--weights",
                                      q.string(),
                                      "--prefix",
                                      "model.layers.0.mlp",
                                      "--family",
                                      "olmoe",
                                      "--input",
                                      (dir / "x.safetensors").string(),
                                      "--output",
                                      (dir / out).string(),
                                      "--threads",
                                      "1"};
    };
    test::CliProcess a(args("a.safetensors"), dir / "a"), b(args("b.safetensors"), dir / "b");
    const test::Outcome oa = a.wait(), ob = b.wait();
    INFO(oa.err << ob.err);
    REQUIRE((oa.exited && oa.code == 0 && ob.exited && ob.code == 0));
    CHECK(test::read_text(dir / "a.safetensors") == test::read_text(dir / "b.safetensors"));
  }
  SECTION("quantize twice into the same output file") {
    // Each writes its own temporary file and renames it into place: the result is one complete
    // output (both are identical here), never a mix.
    const fs::path src = dir / "olmoe-src";
    auto args = [&] {
      return std::vector<std::string>{
          "quantize", "--input", src.string(), "--output",  (dir / "q.safetensors").string(),
          "--bits",   "3",       "--quiet",    "--threads", "1"};
    };
    test::CliProcess a(args(), dir / "a"), b(args(), dir / "b");
    const test::Outcome oa = a.wait(), ob = b.wait();
    INFO(oa.err << ob.err);
    REQUIRE((oa.exited && oa.code == 0 && ob.exited && ob.code == 0));
    const std::string both = test::read_text(dir / "q.safetensors");
    test::CliProcess c(args(), dir / "c");
    REQUIRE(c.wait().code == 0);
    CHECK(test::read_text(dir / "q.safetensors") == both);
    for (const std::string& name : dir.entries()) CHECK(name.find(".tmp.") == std::string::npos);
  }
}
