// fp16 and bf16 activations through the layer API: every entry point computes in fp32 on the
// widened input and rounds its output once, so the result is exactly the fp32 call's on the same
// (16-bit) input, rounded to the output type.
#include <catch2/catch.hpp>

#include <vector>

#include "moe/family_fixtures.hpp"
#include "moqe/core/activations.hpp"
#include "moqe/dist/expert_parallel.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

template <class T>
std::vector<T> to_type(const std::vector<float>& v) {
  std::vector<T> out;
  for (const float f : v) out.push_back(T(f));
  return out;
}

template <class T>
std::vector<float> widen(const std::vector<T>& v) {
  std::vector<float> out;
  for (const T t : v) out.push_back(static_cast<float>(t));
  return out;
}

// The fp32 result rounded to T, as floats.
template <class T>
std::vector<float> rounded(const std::vector<float>& v) {
  return widen(to_type<T>(v));
}

// A layer with quantized experts, a gated shared expert and routing weights not summing to 1.
MoELayer layer_under_test() {
  const std::vector<test::FixtureCase> cases = test::fixture_cases();
  const test::FixtureCase& c = test::find_case(cases, "qwen2_moe");
  const MoeConfig config = read_moe_config(c.dir / "config.json");
  return load_moe_layer(Checkpoint(c.dir / "model.safetensors"), c.prefix, config);
}

}  // namespace

TEMPLATE_TEST_CASE("fp16 and bf16 activations: the fp32 result on the same input, rounded",
                   "[moe][activations]", Half, BFloat16) {
  using T = TestType;
  const MoELayer layer = layer_under_test();
  const int64_t t = 9, h = layer.hidden();
  // Inputs exactly representable in T, so the fp32 reference sees the same values.
  const std::vector<float> x = widen(to_type<T>(test::randn(static_cast<size_t>(t * h), 3)));
  const std::vector<T> xt = to_type<T>(x);

  SECTION("QuantizedLinear") {
    const auto wv = test::randn(48 * 64, 4);
    const QuantizedMatrix q =
        quantize(MatrixView<const float>(wv.data(), 48, 64), {4, QuantMode::kAsym, 32});
    const QuantizedLinear lin = QuantizedLinear::from_quantized(q);
    const std::vector<float> xs = widen(to_type<T>(test::randn(5 * 64, 6)));
    std::vector<float> want(5 * 48);
    lin.forward(MatrixView<const float>(xs.data(), 5, 64), MatrixView<float>(want.data(), 5, 48));
    const std::vector<T> xst = to_type<T>(xs);
    std::vector<T> got(5 * 48);
    lin.forward(MatrixView<const T>(xst.data(), 5, 64), MatrixView<T>(got.data(), 5, 48));
    CHECK(widen(got) == rounded<T>(want));
  }
  SECTION("ExpertMLP") {
    const ExpertMLP& mlp = layer.expert(1);
    std::vector<float> want(x.size()), scratch(static_cast<size_t>(mlp.scratch_floats<T>(t)));
    mlp.forward(MatrixView<const float>(x.data(), t, h), MatrixView<float>(want.data(), t, h),
                scratch.data());
    std::vector<T> got(x.size());
    mlp.forward(MatrixView<const T>(xt.data(), t, h), MatrixView<T>(got.data(), t, h),
                scratch.data());
    CHECK(widen(got) == rounded<T>(want));
  }
  SECTION("MoELayer, strided views, and the workspace reused across types") {
    auto ws = layer.make_workspace(t);
    std::vector<float> want(x.size());
    layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(want.data(), t, h), ws);
    const std::vector<int32_t> ids = ws.routing.ids;
    // Rows padded to h + 3 elements: the views' strides are honoured.
    const int64_t ld = h + 3;
    std::vector<T> xp(static_cast<size_t>(t * ld), T(0.0f)), yp(xp.size(), T(-7.0f));
    for (int64_t r = 0; r < t; ++r) {
      std::copy_n(xt.begin() + r * h, h, xp.begin() + r * ld);
    }
    layer.run(MatrixView<const T>(xp.data(), t, h, ld), MatrixView<T>(yp.data(), t, h, ld), ws);
    CHECK(ws.routing.ids == ids);
    std::vector<T> got;
    for (int64_t r = 0; r < t; ++r) {
      got.insert(got.end(), yp.begin() + r * ld, yp.begin() + r * ld + h);
      for (int64_t c = h; c < ld; ++c) CHECK(static_cast<float>(yp[r * ld + c]) == -7.0f);
    }
    CHECK(widen(got) == rounded<T>(want));
    // Too many tokens for the workspace: an error, as for fp32.
    std::vector<T> big(static_cast<size_t>((t + 1) * h));
    CHECK_THROWS_WITH(layer.run(MatrixView<const T>(big.data(), t + 1, h),
                                MatrixView<T>(big.data(), t + 1, h), ws),
                      Catch::Contains("exceed the workspace"));
  }
  SECTION("the expert-parallel layer on one rank") {
    auto ep =
        ExpertParallelMoELayer::from_layer(layer, std::make_shared<LocalCommunicator>(),
                                           ExpertPlacement::contiguous(layer.num_experts(), 1));
    auto ws = ep.make_workspace(t);
    std::vector<float> want(x.size());
    ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(want.data(), t, h), ws);
    std::vector<T> got(x.size());
    ep.run(MatrixView<const T>(xt.data(), t, h), MatrixView<T>(got.data(), t, h), ws);
    CHECK(widen(got) == rounded<T>(want));
    std::vector<T> wrong(static_cast<size_t>(t * (h + 1)));
    CHECK_THROWS_WITH(
        ep.run(MatrixView<const T>(wrong.data(), t, h + 1), MatrixView<T>(got.data(), t, h), ws),
        Catch::Contains("do not fit"));
  }
}
