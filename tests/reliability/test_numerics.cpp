// Numerical hazards: NaN and Inf in activations propagate as IEEE 754 says and never crash a router
// (every RouterKind, ids in range or -1, the documented order); degenerate sizes (k > experts, zero
// experts, zero tokens, capacity 0) give clear errors or defined results; NaN or Inf in weights is
// an error naming tensor, row and column where moqe quantizes or reads quantized weights, and is
// carried through (documented) where unquantized weights are merely loaded.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "moqe/moe/moe_layer.hpp"
#include "reliability/process_util.hpp"
#include "test_util.hpp"

using namespace moqe;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kE = 4, kH = 8, kI = 8;

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no moqe::Error thrown>";
}

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = g(rng);
  return v;
}

struct Case {
  const char* name;
  RouterConfig rc;
};

std::vector<Case> every_router() {
  auto base = [](RouterKind k, int64_t top_k) {
    RouterConfig c;
    c.kind = k;
    c.num_experts = kE;
    c.top_k = top_k;
    return c;
  };
  std::vector<Case> cases;
  cases.push_back({"softmax_topk", base(RouterKind::kSoftmaxTopK, 2)});
  cases.back().rc.norm_topk_prob = true;
  cases.push_back({"mixtral", base(RouterKind::kMixtral, 2)});
  cases.push_back({"deepseek_v2 greedy", base(RouterKind::kDeepSeekV2, 2)});
  cases.push_back({"deepseek_v2 group_limited", base(RouterKind::kDeepSeekV2, 2)});
  cases.back().rc.topk_method = TopkMethod::kGroupLimitedGreedy;
  cases.back().rc.n_group = 2;
  cases.push_back({"deepseek_v3", base(RouterKind::kDeepSeekV3, 2)});
  cases.back().rc.n_group = 2;
  cases.back().rc.norm_topk_prob = true;
  cases.back().rc.correction_bias = {0.1f, -0.2f, 0.0f, 0.3f};
  cases.push_back({"switch, capacity 2", base(RouterKind::kSwitch, 1)});
  cases.back().rc.expert_capacity = 2;
  cases.push_back({"softmax_topk, capacity factor 1", base(RouterKind::kSoftmaxTopK, 2)});
  cases.back().rc.capacity_factor = 1.0;
  cases.push_back({"task", base(RouterKind::kTask, 2)});
  cases.back().rc.tasks = {{{3, 1}, {0.75f, 0.25f}}};
  cases.push_back({"expert_choice", base(RouterKind::kExpertChoice, 2)});
  return cases;
}

MoELayer make_layer(const RouterConfig& rc, uint32_t seed) {
  std::vector<std::shared_ptr<const ExpertMLP>> experts;
  for (int64_t e = 0; e < kE; ++e) {
    const uint32_t s = seed + 10 * static_cast<uint32_t>(e);
    experts.push_back(std::make_shared<const ExpertMLP>(ExpertMLP::glu(
        QuantizedLinear::from_f32(randn(kI * kH, s), kI, kH),
        QuantizedLinear::from_f32(randn(kI * kH, s + 1), kI, kH),
        QuantizedLinear::from_f32(randn(kH * kI, s + 2), kH, kI), Activation::kSilu)));
  }
  std::vector<float> gate;
  if (rc.kind != RouterKind::kTask) gate = randn(kE * kH, seed + 99);
  return MoELayer(Router(rc, std::move(gate), kH), std::move(experts));
}

struct Result {
  std::vector<float> y;
  Routing routing;
};

Result run(const MoELayer& layer, const std::vector<float>& x) {
  const int64_t t = static_cast<int64_t>(x.size()) / kH;
  Result r;
  r.y.assign(x.size(), -1.0f);
  MoELayer::Workspace ws = layer.make_workspace(t);
  layer.run(MatrixView<const float>(x.data(), t, kH), MatrixView<float>(r.y.data(), t, kH), ws,
            {1, {}, {}, 0, {}});
  r.routing = ws.routing;
  return r;
}

bool finite_row(const std::vector<float>& y, int64_t t) {
  for (int64_t c = 0; c < kH; ++c) {
    if (!std::isfinite(y[t * kH + c])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("NaN and Inf activations never crash a router and give defined routes",
          "[reliability][numerics]") {
  // Tokens: 0 ordinary, 1 one NaN, 2 one +Inf, 3 one -Inf, 4 all NaN, 5 values whose logits
  // overflow to +-inf, 6 ordinary.
  std::vector<float> x = randn(7 * kH, 1);
  x[1 * kH + 3] = kNaN;
  x[2 * kH + 0] = kInf;
  x[3 * kH + 5] = -kInf;
  for (int64_t c = 0; c < kH; ++c) x[4 * kH + c] = kNaN;
  for (int64_t c = 0; c < kH; ++c) x[5 * kH + c] = (c % 2 ? -3e38f : 3e38f);
  const std::vector<int64_t> clean = {0, 6};
  const std::vector<int64_t> poisoned = {1, 2, 3, 4, 5};

  for (const Case& cs : every_router()) {
    INFO(cs.name);
    const MoELayer layer = make_layer(cs.rc, 7);
    Result r;
    REQUIRE_NOTHROW(r = run(layer, x));
    const Routing& rt = r.routing;
    const bool token_choice = cs.rc.kind != RouterKind::kExpertChoice;
    for (int64_t t = 0; t < 7; ++t) {
      INFO("token " << t);
      std::vector<int32_t> seen;
      for (int64_t j = 0; j < rt.slots; ++j) {
        const int32_t id = rt.id(t, j);
        CHECK((id >= -1 && id < kE));
        if (token_choice) CHECK(id >= 0);  // every slot of an active token is routed
        if (id < 0) continue;
        CHECK(std::find(seen.begin(), seen.end(), id) == seen.end());  // each expert once
        seen.push_back(id);
      }
    }
    int64_t kept = 0;
    for (int64_t s = 0; s < rt.tokens * rt.slots; ++s) kept += rt.kept[s];
    int64_t load = 0;
    for (int64_t l : rt.expert_load) load += l;
    CHECK(load == kept);

    // Ordinary tokens keep ordinary outputs. Where routing is per token and unlimited, a poisoned
    // token cannot even change them: they equal the outputs of a batch without it.
    for (int64_t t : clean) CHECK(finite_row(r.y, t));
    const bool independent =
        token_choice && cs.rc.expert_capacity == 0 && cs.rc.capacity_factor == 0;
    if (independent) {
      std::vector<float> x_clean;
      for (int64_t t : clean)
        x_clean.insert(x_clean.end(), x.begin() + t * kH, x.begin() + (t + 1) * kH);
      const Result alone = run(layer, x_clean);
      for (size_t i = 0; i < clean.size(); ++i) {
        for (int64_t c = 0; c < kH; ++c) {
          CHECK(r.y[clean[i] * kH + c] == Approx(alone.y[i * kH + c]).epsilon(1e-6).margin(1e-7));
        }
      }
    }
    // IEEE propagation: a NaN activation reaches its token's output (the task router ignores
    // logits, so the NaN arrives through the experts).
    for (int64_t t : poisoned) {
      if (t == 5) continue;  // huge but finite: the output may or may not overflow
      bool any_routed = false;
      for (int64_t j = 0; j < rt.slots; ++j) any_routed |= rt.kept[t * rt.slots + j] != 0;
      if (any_routed || rt.passthrough[t]) CHECK_FALSE(finite_row(r.y, t));
    }
    // The same input gives the same result, NaN for NaN.
    const Result again = run(layer, x);
    CHECK(std::memcmp(again.y.data(), r.y.data(), r.y.size() * sizeof(float)) == 0);
    CHECK(again.routing.ids == rt.ids);
  }
}

TEST_CASE("top-k ranks NaN scores last: numbers win over NaN, ties go to the lower index",
          "[reliability][numerics]") {
  // Gate rows e0 = [0, 1], e1 = [1, 0], e2 = [-1, 0], e3 = [1, -1] and x = [inf, 0.5] give logits
  // [0 * inf + 0.5 = NaN, inf, -inf, inf].
  const std::vector<float> gate = {0, 1, 1, 0, -1, 0, 1, -1};
  const std::vector<float> x = {kInf, 0.5f};
  RouterConfig rc;
  rc.num_experts = 4;
  rc.top_k = 2;
  Routing out;
  SECTION("deepseek_v3: sigmoid keeps the NaN to expert 0, which ranks last") {
    // Scores [NaN, 1, 0, 1]: the tie between 1 and 3 goes to the lower index, NaN comes last.
    rc.kind = RouterKind::kDeepSeekV3;
    rc.n_group = 1;
    rc.topk_group = 1;
    rc.norm_topk_prob = false;
    Router(rc, gate, 2).route(MatrixView<const float>(x.data(), 1, 2), out);
    CHECK(out.ids == std::vector<int32_t>{1, 3});
    CHECK(out.weights == std::vector<float>{1.0f, 1.0f});
    rc.top_k = 4;
    Router(rc, gate, 2).route(MatrixView<const float>(x.data(), 1, 2), out);
    CHECK(out.ids == std::vector<int32_t>{1, 3, 2, 0});
  }
  SECTION("softmax: inf - inf makes every probability NaN; the lowest indices are chosen") {
    rc.kind = RouterKind::kMixtral;
    Router(rc, gate, 2).route(MatrixView<const float>(x.data(), 1, 2), out);
    CHECK(out.ids == std::vector<int32_t>{0, 1});
    CHECK(std::isnan(out.weights[0]));
    CHECK(std::isnan(out.weights[1]));
  }
  SECTION("expert choice: a NaN token is taken last") {
    rc.kind = RouterKind::kExpertChoice;
    rc.top_k = 1;
    rc.expert_capacity = 1;
    // Token 0 is all NaN, token 1 ordinary: every expert takes token 1.
    const std::vector<float> xs = {kNaN, kNaN, 0.25f, -0.5f};
    Router(rc, gate, 2).route(MatrixView<const float>(xs.data(), 2, 2), out);
    for (int64_t e = 0; e < 4; ++e) {
      CHECK(out.id(0, e) == -1);
      CHECK(out.id(1, e) == e);
    }
  }
}

TEST_CASE("degenerate sizes: clear errors or defined results", "[reliability][numerics]") {
  RouterConfig rc;
  rc.kind = RouterKind::kSoftmaxTopK;
  rc.num_experts = 4;
  SECTION("k > experts") {
    rc.top_k = 5;
    CHECK_THAT(error_of([&] { Router r(rc, std::vector<float>(4 * kH), kH); }),
               Contains("top_k 5 must be between 1 and num_experts 4"));
    test::TempDir dir;
    std::ofstream(dir / "config.json") << R"({"num_local_experts":4,"num_experts_per_tok":5})";
    CHECK_THAT(error_of([&] { read_moe_config(dir / "config.json", Family::kMixtral); }),
               Contains("config.json") &&
                   Contains("num_experts_per_tok 5 must be between 1 and the 4 experts"));
  }
  SECTION("zero experts") {
    rc.num_experts = 0;
    rc.top_k = 1;
    CHECK_THAT(error_of([&] { Router r(rc, {}, kH); }),
               Contains("num_experts must be positive, got 0"));
    test::TempDir dir;
    std::ofstream(dir / "config.json") << R"({"n_routed_experts":0})";
    CHECK_THAT(error_of([&] { read_moe_config(dir / "config.json", Family::kDeepSeekV3); }),
               Contains("number of experts must be positive, got 0"));
    rc.num_experts = 1;
    CHECK_THAT(error_of([&] { MoELayer l(Router(rc, std::vector<float>(kH), kH), {}); }),
               Contains("0 experts for a router over 1"));
  }
  SECTION("zero tokens, every router") {
    for (const Case& cs : every_router()) {
      INFO(cs.name);
      const MoELayer layer = make_layer(cs.rc, 3);
      Result r;
      REQUIRE_NOTHROW(r = run(layer, {}));
      CHECK(r.y.empty());
      CHECK(r.routing.ids.empty());
      CHECK(r.routing.expert_load == std::vector<int64_t>(kE, 0));
    }
  }
  SECTION("capacity 0 means unlimited; a tiny capacity factor keeps one slot per expert") {
    const std::vector<float> x = randn(6 * kH, 5);
    RouterConfig sw;
    sw.kind = RouterKind::kSwitch;
    sw.num_experts = kE;
    sw.top_k = 1;
    sw.expert_capacity = 0;
    const Result all = run(make_layer(sw, 4), x);
    for (uint8_t k : all.routing.kept) CHECK(k == 1);
    RouterConfig cf;
    cf.num_experts = kE;
    cf.top_k = 2;
    cf.capacity_factor = 1e-9;  // ceil(1e-9 * T * k / E) = 1
    const Result one = run(make_layer(cf, 4), x);
    for (int64_t l : one.routing.expert_load) CHECK(l <= 1);
    RouterConfig ec;
    ec.kind = RouterKind::kExpertChoice;
    ec.num_experts = kE;
    ec.top_k = 2;
    ec.expert_capacity = 0;  // ceil(T * k / E) = 3 tokens per expert
    const Result auto_cap = run(make_layer(ec, 4), x);
    for (int64_t l : auto_cap.routing.expert_load) CHECK(l == 3);
  }
}

TEST_CASE("non-finite weights: errors where moqe quantizes, carried through where it only loads",
          "[reliability][numerics]") {
  test::TempDir dir;
  const std::string name = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
  auto write_weight = [&](const fs::path& p, float bad) {
    std::vector<float> w = randn(8 * 64, 11);
    w[3 * 64 + 17] = bad;
    SafetensorsWriter wr;
    wr.add_values<float>(name, DType::kF32, {8, 64}, w);
    wr.write(p);
  };
  SECTION("quantize_checkpoint and the moqe tool name tensor, row and column") {
    for (float bad : {kNaN, kInf, -kInf}) {
      INFO(bad);
      write_weight(dir / "in.safetensors", bad);
      const Checkpoint in(dir / "in.safetensors");
      ConvertOptions o;
      o.group_size = 32;
      o.group_policy = GroupPolicy::kFixed;
      CHECK_THAT(error_of([&] { quantize_checkpoint(in, dir / "out.safetensors", o); }),
                 Contains(name) && Contains("row 3, column 17"));
      CHECK_FALSE(fs::exists(dir / "out.safetensors"));

      test::CliProcess p({"quantize", "--input", (dir / "in.safetensors").string(), "--output",
                          (dir / "cli.safetensors").string(), "--bits", "4", "--quiet"},
                         dir / "log");
      const test::Outcome out = p.wait();
      CHECK((out.exited && out.code == 1));
      CHECK_THAT(out.err, Contains("moqe: error:") && Contains(name) &&
                              Contains("non-finite weight") && Contains("row 3, column 17"));
      CHECK_FALSE(fs::exists(dir / "cli.safetensors"));
    }
  }
  SECTION("a quantized weight with a NaN scale is refused on load, naming row and group") {
    const QuantizedMatrix q =
        quantize(MatrixView<const float>(randn(4 * 64, 2).data(), 4, 64), {4, QuantMode::kSym, 32});
    SafetensorsWriter good;
    add_quantized(good, "w", q);
    good.write(dir / "good.safetensors");
    const SafetensorsFile f(dir / "good.safetensors");
    SafetensorsWriter bad;
    for (const TensorInfo& t : f.tensors()) {
      std::vector<std::byte> b(f.bytes(t).begin(), f.bytes(t).end());
      if (t.name == "w.scales") {
        const uint16_t half_nan = 0x7e00;
        std::memcpy(b.data() + 2 * (2 * 2 + 1), &half_nan, 2);  // row 2, group 1
      }
      bad.add(t.name, t.dtype, t.shape, std::move(b));
    }
    for (const auto& [k, v] : f.metadata()) bad.set_metadata(k, v);
    bad.write(dir / "bad.safetensors");
    const Checkpoint ckpt(dir / "bad.safetensors");
    CHECK_THAT(error_of([&] { load_quantized(ckpt, "w"); }),
               Contains("bad.safetensors") && Contains("tensor 'w'") &&
                   Contains("row 2, group 1 is not finite"));
  }
  SECTION("unquantized weights load as they are; NaN reaches only the tokens that use them") {
    // Documented (docs/reliability.md): loading fp32/fp16/bf16 weights does
    // not scan them; an expert holding NaN gives NaN outputs for the tokens routed to it.
    SyntheticMoeSpec s;
    s.hidden = 32;
    s.intermediate = 32;
    s.experts = 4;
    s.dtype = DType::kF32;
    write_synthetic_moe(dir / "ckpt", s);
    const Checkpoint ok(dir / "ckpt");
    SafetensorsWriter w;
    for (const std::string& n : ok.tensor_names()) {
      const TensorInfo& t = ok.info(n);
      std::vector<std::byte> b(ok.bytes(n).begin(), ok.bytes(n).end());
      if (n == "model.layers.0.block_sparse_moe.experts.2.w2.weight") {
        std::memcpy(b.data() + 4 * 5, &kNaN, 4);
      }
      w.add(n, t.dtype, t.shape, std::move(b));
    }
    fs::create_directories(dir / "nan");
    w.write(dir / "nan" / "model.safetensors");
    fs::copy_file(dir / "ckpt" / "config.json", dir / "nan" / "config.json");
    const Checkpoint ckpt(dir / "nan");
    const MoELayer layer =
        load_moe_layer(ckpt, synthetic_moe_prefix(s),
                       read_moe_config(dir / "nan" / "config.json", Family::kMixtral));
    const int64_t t = 16, h = 32;
    const std::vector<float> x = randn(t * h, 9);
    std::vector<float> y(x.size());
    MoELayer::Workspace ws = layer.make_workspace(t);
    layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws);
    int routed_to_2 = 0;
    for (int64_t i = 0; i < t; ++i) {
      bool uses_2 = false;
      for (int64_t j = 0; j < ws.routing.slots; ++j) uses_2 |= ws.routing.id(i, j) == 2;
      routed_to_2 += uses_2;
      bool finite = true;
      for (int64_t c = 0; c < h; ++c) finite &= std::isfinite(y[i * h + c]);
      CHECK(finite == !uses_2);
    }
    CHECK(routed_to_2 > 0);
  }
}
