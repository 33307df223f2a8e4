// The MoE layer on the GPU against moqe::MoELayer on the CPU, on quantized synthetic checkpoints
// of several families, with random tokens (never zeros), inactive tokens, T = 0 and 1, and
// poisoned outputs. Without a device each test reports "SKIPPED: no CUDA device".
//
// Tolerance. The device layer rounds activations to fp16 twice (when gathered, and after the
// activation function), unit roundoff u = 2^-11 each; the weights, logits, accumulation and
// combine are fp32 (their error is below 1e-6 relative). With random data the two roundings add
// independent errors of relative size at most u each to the expert outputs, so a token's output
// differs from the CPU's by at most about 2u (its relative L2 norm); the check allows 4u = 2^-9
// for the shared expert's path and the routing weights' products. bf16 (u = 2^-8) gets 2^-6.
// Routing is compared exactly: logits differ only by fp32 summation order (~1e-6 relative), and a
// near-tie that close is rare on random data (a failure there would name the token).
#include <cuda_runtime.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/require_device.hpp"
#include "moe/family_fixtures.hpp"
#include "moqe/cuda/moe.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

struct Case {
  std::string name;
  SyntheticMoeSpec spec;
  std::string include;  // quantize these tensors
  cuda::ActType act = cuda::ActType::kF16;
  bool default_groups = false;  // g128 where it divides K, else per channel (odd K: simple path)
  bool switch_passthrough = true;
};

std::vector<Case> cases() {
  auto base = [](const std::string& family) {
    SyntheticMoeSpec s;
    s.family = family;
    s.hidden = 256;
    s.intermediate = 128;
    s.experts = 8;
    s.top_k = family == "switch" ? 1 : 2;
    s.dtype = DType::kBF16;
    s.seed = 31;
    return s;
  };
  std::vector<Case> out;
  out.push_back({"mixtral", base("mixtral"), ""});
  out.push_back({"mixtral bf16", base("mixtral"), "", cuda::ActType::kBF16});
  auto odd = base("olmoe");
  odd.intermediate = 100;  // down has K = 100: per channel, the simple kernel
  out.push_back({"olmoe odd intermediate", odd, "", cuda::ActType::kF16, true});
  auto v2 = base("deepseek_v2");
  v2.topk_method = "group_limited_greedy";
  v2.n_group = 4;
  v2.topk_group = 2;
  v2.top_k = 3;
  v2.routed_scaling_factor = 16.0f;
  v2.shared_intermediate = 256;
  out.push_back({"deepseek_v2 group-limited shared", v2, "experts?\\."});
  auto q2 = base("qwen2_moe");
  q2.shared_intermediate = 256;
  q2.top_k = 4;
  q2.norm_topk_prob = true;
  out.push_back({"qwen2_moe shared", q2, "experts?\\."});
  auto v3 = base("deepseek_v3");
  v3.n_group = 4;
  v3.topk_group = 2;
  v3.top_k = 3;
  v3.routed_scaling_factor = 2.5f;
  v3.shared_intermediate = 128;
  out.push_back({"deepseek_v3 shared", v3, "experts?\\."});
  out.push_back({"olmoe", base("olmoe"), ""});
  auto sw = base("switch");
  sw.expert_capacity = 3;
  out.push_back({"switch capacity", sw, ""});
  out.push_back(
      {"switch capacity, dropped tokens output 0", sw, "", cuda::ActType::kF16, false, false});
  return out;
}

double rel_l2(const float* a, const float* b, int64_t n) {
  double e = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    e += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    r += double(b[i]) * b[i];
  }
  return r == 0 ? std::sqrt(e) : std::sqrt(e / r);
}

}  // namespace

TEST_CASE("cuda moe: the device layer matches the CPU layer on quantized checkpoints",
          "[cuda][moe]") {
  MOQE_REQUIRE_DEVICE();
  for (const Case& c : cases()) {
    for (int bits : {4, 8}) {
      DYNAMIC_SECTION(c.name << " int" << bits) {
        test::TempDir dir;
        write_synthetic_moe(dir.path(), c.spec);
        ConvertOptions q;
        q.bits = bits;
        q.mode = bits == 4 ? QuantMode::kAsym : QuantMode::kSym;
        q.group_policy = c.default_groups ? GroupPolicy::kDefault : GroupPolicy::kFixed;
        q.group_size = bits == 4 ? 64 : 128;
        if (!c.include.empty()) q.include_regex = c.include;
        quantize_checkpoint(Checkpoint(dir.path()), dir / "q.safetensors", q);
        const Checkpoint ckpt(dir / "q.safetensors");
        const Family family = *parse_family(c.spec.family);
        const MoeConfig config = read_moe_config(dir / "config.json", family);
        const std::string prefix = synthetic_moe_prefix(c.spec);
        LoadOptions lo;
        lo.switch_passthrough = c.switch_passthrough;
        const MoELayer cpu = load_moe_layer(ckpt, prefix, config, lo);
        cuda::DeviceLoadOptions dlo;
        dlo.act_type = c.act;
        dlo.switch_passthrough = c.switch_passthrough;
        const cuda::MoELayer gpu = cuda::MoELayer::load(ckpt, prefix, config, dlo);
        const int64_t h = c.spec.hidden;
        auto ws = gpu.make_workspace(40);
        auto cws = cpu.make_workspace(40);
        for (int64_t t : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{40}}) {
          INFO("tokens " << t);
          std::mt19937 rng(static_cast<uint32_t>(t + 3));
          std::normal_distribution<float> g(0.0f, 1.0f);
          std::vector<float> x(static_cast<size_t>(t * h));
          for (auto& v : x) v = g(rng);
          std::vector<uint8_t> active(static_cast<size_t>(t), 1);
          for (int64_t i = 3; i < t; i += 7) active[static_cast<size_t>(i)] = 0;
          MoeRunOptions co;
          co.active = active;
          std::vector<float> y_cpu(x.size());
          cpu.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y_cpu.data(), t, h),
                  cws, co);

          cuda::DeviceBuffer dx(std::max<size_t>(x.size(), 1) * 4),
              dy(std::max<size_t>(x.size(), 1) * 4), da(std::max<size_t>(active.size(), 1));
          if (t > 0) {
            dx.upload(std::span<const float>(x));
            da.upload(std::span<const uint8_t>(active));
            std::vector<float> poison(x.size(), std::nanf(""));
            dy.upload(std::span<const float>(poison));  // unwritten outputs would stay NaN
          }
          cuda::MoELayer::RunOptions go;
          go.active = da.as<uint8_t>();
          gpu.run(dx.as<float>(), dy.as<float>(), t, ws, go);
          Routing routing;
          cuda::download(ws.routing, routing);
          std::vector<float> y_gpu(x.size());
          if (t > 0) dy.download(std::span<float>(y_gpu));
          REQUIRE(routing.ids == cws.routing.ids);
          REQUIRE(routing.kept == cws.routing.kept);
          REQUIRE(routing.passthrough == cws.routing.passthrough);
          for (int64_t i = 0; i < t; ++i) {
            INFO("token " << i);
            const float* a = y_gpu.data() + i * h;
            const float* b = y_cpu.data() + i * h;
            if (!active[static_cast<size_t>(i)]) {
              for (int64_t k = 0; k < h; ++k) REQUIRE(a[k] == 0.0f);
              continue;
            }
            CHECK(rel_l2(a, b, h) < std::ldexp(1.0, c.act == cuda::ActType::kF16 ? -9 : -6));
          }
        }
      }
    }
  }
}

TEST_CASE("cuda moe: dispatch groups kept slots by expert in token order", "[cuda][moe]") {
  MOQE_REQUIRE_DEVICE();
  // A task router gives a known routing: dispatch must equal the CPU's DispatchPlan.
  RouterConfig rc;
  rc.kind = RouterKind::kTask;
  rc.num_experts = 5;
  rc.top_k = 2;
  rc.tasks = {{{3, 1}, {0.5f, 0.5f}}, {{0, 3}, {0.25f, 0.75f}}};
  const Router router(rc, {}, 16);
  const cuda::DeviceRouter dr(router);
  const int64_t t = 9;
  std::vector<int32_t> task_ids(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) task_ids[static_cast<size_t>(i)] = static_cast<int32_t>(i % 2);
  std::vector<uint8_t> active(static_cast<size_t>(t), 1);
  active[4] = 0;
  cuda::DeviceBuffer dt(task_ids.size() * 4), da(active.size()), dx(16 * 4 * t);
  dt.upload(std::span<const int32_t>(task_ids));
  da.upload(std::span<const uint8_t>(active));
  auto routing = dr.make_routing(t);
  cuda::DeviceRouteOptions o;
  o.task_ids = dt.as<int32_t>();
  o.active = da.as<uint8_t>();
  dr.route(dx.as<float>(), t, 16, routing, o);
  auto d = cuda::make_dispatch(t * 2, 5);
  cuda::build_dispatch(routing, d);
  std::vector<int64_t> offsets;
  std::vector<int32_t> row_slot;
  cuda::download_dispatch(d, offsets, row_slot);

  Routing host;
  std::vector<float> x(static_cast<size_t>(16 * t));
  router.route(MatrixView<const float>(x.data(), t, 16), host,
               {0, active, {}, 0, std::span<const int32_t>(task_ids)});
  DispatchPlan plan;
  plan.build(host);
  REQUIRE(std::vector<int64_t>(plan.offsets().begin(), plan.offsets().end()) == offsets);
  REQUIRE(static_cast<int64_t>(row_slot.size()) == plan.rows());
  for (int64_t r = 0; r < plan.rows(); ++r) {
    CHECK(row_slot[static_cast<size_t>(r)] == plan.row_slot()[static_cast<size_t>(r)]);
  }
  // The slot -> row map the combine reads: -1 for slots that are not kept.
  std::vector<int32_t> slot_row(static_cast<size_t>(t * 2));
  d.slot_row.download(slot_row.data(), slot_row.size() * sizeof(int32_t));
  for (size_t i = 0; i < slot_row.size(); ++i) {
    CHECK(slot_row[i] == plan.slot_row()[i]);
  }
  // The experts with rows (0, 1 and 3 here; 2 and 4 have none), then -1: the grouped GEMMs'
  // grid. min(E, slots) = 5 entries.
  std::vector<int32_t> active_list(5), want;
  int32_t count = 0;
  d.active.download(std::span<int32_t>(active_list));
  d.active_count.download(&count, sizeof count);
  for (int64_t e = 0; e < 5; ++e) {
    if (offsets[static_cast<size_t>(e + 1)] > offsets[static_cast<size_t>(e)]) {
      want.push_back(static_cast<int32_t>(e));
    }
  }
  CHECK(count == static_cast<int32_t>(want.size()));
  want.resize(5, -1);
  CHECK(active_list == want);
}

TEST_CASE("cuda moe: unquantized experts are refused with the tensor's name", "[cuda][moe]") {
  MOQE_REQUIRE_DEVICE();
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.hidden = 64;
  s.intermediate = 64;
  s.experts = 4;
  write_synthetic_moe(dir.path(), s);
  const Checkpoint ckpt(dir.path());
  const MoeConfig config = read_moe_config(dir / "config.json", Family::kMixtral);
  CHECK_THROWS_WITH(
      cuda::MoELayer::load(ckpt, synthetic_moe_prefix(s), config),
      Catch::Contains("experts.0.w3.weight' is BF16") && Catch::Contains("moqe quantize"));
}

namespace {

// The fixture cases quantized at 4 bits (per channel), routed and shared experts, with the
// family's config.
struct QuantizedFixture {
  test::FixtureCase c;
  MoeConfig config;
  std::filesystem::path weights;
};

QuantizedFixture quantize_fixture(const test::FixtureCase& c, const test::TempDir& dir) {
  QuantizedFixture q{c, read_moe_config(c.dir / "config.json"), dir / (c.name + ".safetensors")};
  ConvertOptions o;
  o.bits = 4;
  o.group_policy = GroupPolicy::kPerChannel;
  o.include_regex =
      std::string(default_include_regex()) +
      R"(|\.(shared_experts?|shared_mlp)\.(gate_proj|up_proj|down_proj|input_linear|output_linear)\.weight$)";
  o.expert_stack = [&](std::string_view name, std::span<const int64_t> shape) {
    return expert_stack(q.config, name, shape);
  };
  quantize_checkpoint(Checkpoint(c.dir / "model.safetensors"), q.weights, o);
  return q;
}

// What the device layer does not compute yet, per fixture case (docs/families.md).
bool device_refuses(const std::string& name) {
  for (const char* p : {"gpt_oss", "llama4_text", "granitemoe", "jetmoe", "cohere2_moe", "phimoe",
                        "ernie4_5_moe", "deepseek_v2-mlp_bias"}) {
    if (name.starts_with(p)) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("cuda moe: families the device does not compute yet are refused by name",
          "[cuda][moe][families]") {
  // No device needed: the refusal comes before anything is uploaded.
  test::TempDir dir;
  for (const test::FixtureCase& c : test::fixture_cases()) {
    if (!device_refuses(c.name)) continue;
    CAPTURE(c.name);
    const QuantizedFixture q = quantize_fixture(c, dir);
    CHECK_THROWS_WITH(cuda::MoELayer::load(Checkpoint(q.weights), c.prefix, q.config),
                      Catch::Contains("not implemented on the device yet"));
  }
}

TEST_CASE("cuda moe: the transformers families on the device match the CPU layer",
          "[cuda][moe][families]") {
  MOQE_REQUIRE_DEVICE();
  test::TempDir dir;
  for (const test::FixtureCase& c : test::fixture_cases()) {
    if (device_refuses(c.name)) continue;
    CAPTURE(c.name);
    const QuantizedFixture q = quantize_fixture(c, dir);
    const Checkpoint ckpt(q.weights);
    const test::Expected e = test::expected(c);
    const MoELayer host = load_moe_layer(ckpt, c.prefix, q.config);
    std::vector<float> want(e.x.size());
    auto hws = host.make_workspace(e.t);
    host.run(MatrixView<const float>(e.x.data(), e.t, e.h),
             MatrixView<float>(want.data(), e.t, e.h), hws);
    const cuda::MoELayer dev = cuda::MoELayer::load(ckpt, c.prefix, q.config);
    auto ws = dev.make_workspace(e.t);
    const size_t bytes = e.x.size() * sizeof(float);
    cuda::DeviceBuffer dx(bytes), dy(bytes);
    dx.upload(std::span<const float>(e.x));
    dev.run(dx.as<float>(), dy.as<float>(), e.t, ws);
    std::vector<float> got(e.x.size());
    dy.download(std::span<float>(got));
    Routing r;
    cuda::download(ws.routing, r);
    CHECK(r.ids == hws.routing.ids);
    CHECK(test::rel_err(got, want) < 1.0 / 512);  // two fp16 roundings (see the top of the file)
  }
}

TEST_CASE("cuda moe: one decode step captured in a CUDA graph replays as the direct run",
          "[cuda][moe][graph]") {
  MOQE_REQUIRE_DEVICE();
  // run() is a fixed sequence of launches on one stream, with no host round trip: it can be
  // captured once and replayed for every decode step (new x in the same buffer).
  for (const char* family : {"mixtral", "deepseek_v3"}) {
    DYNAMIC_SECTION(family) {
      test::TempDir dir;
      SyntheticMoeSpec s;
      s.family = family;
      s.hidden = 256;
      s.intermediate = 128;
      s.experts = 8;
      s.top_k = 2;
      s.n_group = 4;
      s.topk_group = 2;
      s.shared_intermediate = std::string(family) == "deepseek_v3" ? 128 : 0;
      s.dtype = DType::kBF16;
      write_synthetic_moe(dir.path(), s);
      ConvertOptions q;
      q.bits = 4;
      q.group_policy = GroupPolicy::kFixed;
      q.group_size = 64;
      q.include_regex = "experts?\\.";
      quantize_checkpoint(Checkpoint(dir.path()), dir / "q.safetensors", q);
      const Checkpoint ckpt(dir / "q.safetensors");
      const MoeConfig config = read_moe_config(dir / "config.json", *parse_family(family));
      const cuda::MoELayer gpu = cuda::MoELayer::load(ckpt, synthetic_moe_prefix(s), config);
      const int64_t h = s.hidden;
      for (const int64_t t : {int64_t{1}, int64_t{4}}) {
        INFO("tokens " << t);
        auto ws = gpu.make_workspace(t);
        cudaStream_t stream = nullptr;
        REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
        cuda::DeviceBuffer dx(static_cast<size_t>(t * h) * 4), dy(static_cast<size_t>(t * h) * 4);
        cudaGraph_t graph = nullptr;
        cudaGraphExec_t exec = nullptr;
        REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
        gpu.run(dx.as<float>(), dy.as<float>(), t, ws, {}, stream);
        REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
        REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
        for (uint32_t step = 0; step < 3; ++step) {
          INFO("step " << step);
          std::mt19937 rng(step + 11);
          std::normal_distribution<float> g(0.0f, 1.0f);
          std::vector<float> x(static_cast<size_t>(t * h)), poison(x.size(), std::nanf(""));
          for (auto& v : x) v = g(rng);
          dx.upload(std::span<const float>(x));
          dy.upload(std::span<const float>(poison));
          REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
          REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
          std::vector<float> replayed(x.size()), direct(x.size());
          dy.download(std::span<float>(replayed));
          dy.upload(std::span<const float>(poison));
          gpu.run(dx.as<float>(), dy.as<float>(), t, ws, {}, stream);
          REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
          dy.download(std::span<float>(direct));
          for (size_t i = 0; i < direct.size(); ++i) REQUIRE(std::isfinite(direct[i]));
          CHECK(replayed == direct);  // the same launches on the same data: bit for bit
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        cudaStreamDestroy(stream);
      }
    }
  }
}
