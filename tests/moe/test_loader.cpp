// Loaders end to end: synthetic checkpoints in each family's Hugging Face layout, loaded and run,
// against the separately written per-token reference (hf_reference.hpp).
#include <catch2/catch.hpp>

#include <fstream>
#include <random>

#include "moe/hf_reference.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

struct Case {
  std::string name;
  SyntheticMoeSpec spec;
};

std::vector<Case> family_cases() {
  auto base = [](const std::string& family) {
    SyntheticMoeSpec s;
    s.family = family;
    s.hidden = 64;
    s.intermediate = 96;
    s.experts = 8;
    s.top_k = family == "switch" ? 1 : 2;
    s.dtype = DType::kF32;
    s.outlier_fraction = 0.0;
    s.seed = 5;
    return s;
  };
  std::vector<Case> cases;
  cases.push_back({"mixtral", base("mixtral")});
  auto m = base("mixtral");
  m.fused_experts = true;
  m.dtype = DType::kBF16;
  cases.push_back({"mixtral fused bf16", m});
  auto q2 = base("qwen2_moe");
  q2.shared_intermediate = 128;
  q2.top_k = 4;
  cases.push_back({"qwen2_moe shared", q2});
  auto q3 = base("qwen3_moe");
  q3.norm_topk_prob = true;
  q3.shards = 3;
  cases.push_back({"qwen3_moe sharded", q3});
  auto q3f = q3;
  q3f.fused_experts = true;
  q3f.shards = 1;
  q3f.dtype = DType::kF16;
  cases.push_back({"qwen3_moe fused f16", q3f});
  cases.push_back({"olmoe", base("olmoe")});
  auto v2 = base("deepseek_v2");
  v2.topk_method = "group_limited_greedy";
  v2.n_group = 4;
  v2.topk_group = 2;
  v2.top_k = 3;
  v2.routed_scaling_factor = 16.0f;
  v2.shared_intermediate = 192;
  cases.push_back({"deepseek_v2 group-limited", v2});
  auto v2g = base("deepseek_v2");
  v2g.routed_scaling_factor = 2.0f;
  cases.push_back({"deepseek_v2 greedy", v2g});
  auto v3 = base("deepseek_v3");
  v3.n_group = 4;
  v3.topk_group = 2;
  v3.top_k = 4;
  v3.norm_topk_prob = true;
  v3.routed_scaling_factor = 2.5f;
  v3.shared_intermediate = 96;
  cases.push_back({"deepseek_v3", v3});
  auto sw = base("switch");
  sw.expert_capacity = 4;  // 40 tokens over 8 experts: some overflow
  cases.push_back({"switch capacity", sw});
  return cases;
}

test::RefFamily ref_family(const SyntheticMoeSpec& s) {
  test::RefFamily f;
  f.family = s.family;
  f.experts = s.experts;
  f.top_k = s.family == "switch" ? 1 : s.top_k;
  f.norm_topk_prob = s.norm_topk_prob;
  f.group_limited = s.topk_method == "group_limited_greedy";
  f.n_group = s.n_group;
  f.topk_group = s.topk_group;
  f.scaling = s.routed_scaling_factor;
  f.capacity = s.expert_capacity;
  f.fused = s.fused_experts;
  return f;
}

std::vector<float> random_x(int64_t t, int64_t h, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(t * h));
  for (auto& v : x) v = g(rng);
  return x;
}

double rel_err(const std::vector<float>& y, const std::vector<double>& ref) {
  double e = 0, n = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    e += (y[i] - ref[i]) * (y[i] - ref[i]);
    n += ref[i] * ref[i];
  }
  return std::sqrt(e / n);
}

}  // namespace

TEST_CASE("every family loads and matches the per-token reference", "[moe][loader]") {
  for (const Case& c : family_cases()) {
    SECTION(c.name) {
      test::TempDir dir;
      write_synthetic_moe(dir.path(), c.spec);
      const Checkpoint ckpt(dir.path());
      const Family family = *parse_family(c.spec.family);
      const MoeConfig config = read_moe_config(dir / "config.json", family);
      const std::string prefix = synthetic_moe_prefix(c.spec);
      LoadOptions lo;
      lo.switch_passthrough = true;  // the reference's (transformers 4) semantics
      const MoELayer layer = load_moe_layer(ckpt, prefix, config, lo);
      const int64_t t = 40, h = c.spec.hidden;
      const auto x = random_x(t, h, 11);
      std::vector<float> y(x.size());
      auto ws = layer.make_workspace(t);
      layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws);
      const test::RefResult ref = test::RefMoe(ckpt, prefix, ref_family(c.spec)).run(x, t, h);
      REQUIRE(ws.routing.ids == ref.ids);
      for (size_t i = 0; i < ref.weights.size(); ++i) {
        REQUIRE(ws.routing.weights[i] == Approx(ref.weights[i]).epsilon(1e-6));
      }
      CHECK(rel_err(y, ref.y) < 1e-5);
      if (c.spec.family == "switch") {  // the capacity case must exercise the pass-through
        CHECK(std::count(ws.routing.passthrough.begin(), ws.routing.passthrough.end(), 1) > 0);
      }
      // Shared experts are found when present.
      CHECK(layer.shared_experts().size() == (c.spec.shared_intermediate > 0 ? 1u : 0u));
    }
  }
}

TEST_CASE("a quantized checkpoint runs like its dequantized weights, bit for bit",
          "[moe][loader]") {
  // Bit for bit holds for the reference kernels, whose summation order does not depend on the
  // storage; the SIMD kernels agree to fp32 rounding (tests/gemm).
  const test::ScopedCpuIsa reference(CpuIsa::kReference);
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.family = "qwen2_moe";
  s.hidden = 64;
  s.intermediate = 96;
  s.shared_intermediate = 64;
  s.experts = 6;
  s.top_k = 2;
  s.shards = 2;
  write_synthetic_moe(dir / "orig", s);
  const Checkpoint orig(dir / "orig");
  for (int bits : {8, 4, 3, 2}) {
    ConvertOptions o;
    o.bits = bits;
    o.mode = bits == 3 ? QuantMode::kAsym : QuantMode::kSym;
    o.include_regex = "experts?\\.";  // routed and shared experts
    quantize_checkpoint(orig, dir / "q.safetensors", o);
    dequantize_checkpoint(Checkpoint(dir / "q.safetensors"), dir / "f.safetensors");
    const MoeConfig config = read_moe_config(dir / "orig" / "config.json", Family::kQwen2Moe);
    const MoELayer lq =
        load_moe_layer(Checkpoint(dir / "q.safetensors"), "model.layers.0.mlp", config);
    const MoELayer lf =
        load_moe_layer(Checkpoint(dir / "f.safetensors"), "model.layers.0.mlp", config);
    CHECK(lq.expert(0).describe().starts_with("int" + std::to_string(bits)));
    CHECK(lf.expert(0).describe() == "f32");
    CHECK(lq.stats().weight_bytes < lf.stats().weight_bytes);
    const int64_t t = 9, h = 64;
    const auto x = random_x(t, h, 3);
    std::vector<float> yq(x.size()), yf(x.size());
    auto wq = lq.make_workspace(t), wf = lf.make_workspace(t);
    lq.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(yq.data(), t, h), wq);
    lf.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(yf.data(), t, h), wf);
    CHECK(yq == yf);
    CHECK(wq.routing.ids == wf.routing.ids);
  }
}

TEST_CASE("broken checkpoints and configs are errors naming the tensor, key and shapes",
          "[moe][loader]") {
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.family = "mixtral";
  s.hidden = 32;
  s.intermediate = 64;
  s.experts = 4;
  s.dtype = DType::kF32;
  write_synthetic_moe(dir.path(), s);
  const Checkpoint ckpt(dir.path());
  MoeConfig c = read_moe_config(dir / "config.json", Family::kMixtral);
  const std::string p = "model.layers.0.block_sparse_moe";
  CHECK_THROWS_WITH(
      load_moe_layer(ckpt, "model.layers.7.block_sparse_moe", c),
      Catch::Contains("missing tensor 'model.layers.7.block_sparse_moe.gate.weight'"));
  c.router.num_experts = 5;
  CHECK_THROWS_WITH(load_moe_layer(ckpt, p, c),
                    Catch::Contains("gate.weight' has shape [4, 32], but the mixtral config has 5 "
                                    "experts"));
  // A mis-shaped expert tensor names itself and both shapes.
  {
    SafetensorsWriter w;
    for (const std::string& name : ckpt.tensor_names()) {
      const TensorInfo& t = ckpt.info(name);
      if (name == p + ".experts.2.w3.weight") {
        std::vector<float> v(64 * 16, 0.5f);
        w.add_values<float>(name, DType::kF32, {64, 16}, v);
      } else {
        w.add_view(name, t.dtype, t.shape, ckpt.bytes(name));
      }
    }
    w.write(dir / "bad.safetensors");
  }
  c.router.num_experts = 4;
  CHECK_THROWS_WITH(load_moe_layer(Checkpoint(dir / "bad.safetensors"), p, c),
                    Catch::Contains("experts.2.w3.weight' has shape [64, 16], expected [64, 32]"));
  // Config errors.
  auto write_config = [&](const std::string& text) {
    std::ofstream(dir / "c.json") << text;
    return dir / "c.json";
  };
  CHECK_THROWS_WITH(
      read_moe_config(write_config("{\"num_local_experts\": \"eight\"}"), Family::kMixtral),
      Catch::Contains("c.json: 'num_local_experts' must be an integer"));
  CHECK_THROWS_WITH(read_moe_config(write_config("{\"num_experts_per_tok\": 9}"), Family::kMixtral),
                    Catch::Contains("num_experts_per_tok 9 must be between 1 and the 8 experts"));
  CHECK_THROWS_WITH(read_moe_config(write_config("{\"hidden_act\": \"mish\"}"), Family::kMixtral),
                    Catch::Contains("unsupported activation hidden_act = 'mish'"));
  CHECK_THROWS_WITH(
      read_moe_config(write_config("{\"topk_method\": \"noaux_tc\", \"num_experts_per_tok\": 2}"),
                      Family::kDeepSeekV2),
      Catch::Contains("topk_method 'noaux_tc'"));
  CHECK_THROWS_WITH(read_moe_config(write_config("{}"), Family::kDeepSeekV2),
                    Catch::Contains("the deepseek_v2 family needs 'num_experts_per_tok'") &&
                        Catch::Contains("transformers has no default"));
  CHECK_THROWS_WITH(read_moe_config(write_config("[1, 2"), Family::kMixtral),
                    Catch::Contains("not valid JSON"));
  CHECK_THROWS_WITH(read_moe_config(dir / "missing.json", Family::kMixtral),
                    Catch::Contains("missing.json"));
  CHECK_FALSE(parse_family("llama").has_value());
  CHECK(families().size() == 28);
  CHECK(supported_families().starts_with("mixtral, minimax, qwen2_moe,"));
  // DeepSeek with shared experts in the config but not in the file.
  SyntheticMoeSpec d = s;
  d.family = "deepseek_v2";
  write_synthetic_moe(dir / "ds", d);
  MoeConfig dc = read_moe_config(dir / "ds" / "config.json", Family::kDeepSeekV2);
  dc.shared = true;
  CHECK_THROWS_WITH(
      load_moe_layer(Checkpoint(dir / "ds"), "model.layers.0.mlp", dc),
      Catch::Contains("missing tensor 'model.layers.0.mlp.shared_experts.gate_proj.weight'"));
}

TEST_CASE("load_linear reads one weight in any storage, with its shape", "[moe][loader]") {
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.hidden = 64;
  s.intermediate = 32;
  s.experts = 2;
  write_synthetic_moe(dir.path(), s);
  ConvertOptions q;
  q.bits = 8;
  q.group_policy = GroupPolicy::kPerChannel;
  q.include_regex = "o_proj";
  quantize_checkpoint(Checkpoint(dir.path()), dir / "q.safetensors", q);
  const Checkpoint bf(dir.path()), qc(dir / "q.safetensors");
  const std::string o = "model.layers.0.self_attn.o_proj.weight";
  const QuantizedLinear a = load_linear(bf, o), b = load_linear(qc, o);
  CHECK(a.storage() == WeightStorage::kBF16);
  CHECK(b.storage() == WeightStorage::kQuantized);
  CHECK((b.out_features() == 64 && b.in_features() == 64 && b.scheme().bits == 8));
  // The quantized layer is its dequantized weights, exactly.
  const QuantizedMatrix m = load_quantized(qc, o);
  std::vector<float> row(64);
  b.decode_row(7, row.data());
  for (int64_t c = 0; c < 64; ++c) CHECK(row[static_cast<size_t>(c)] == m.at(7, c));
  CHECK_THROWS_WITH(load_linear(bf, "model.layers.0.self_attn.q_proj.weight"),
                    Catch::Contains("missing tensor 'model.layers.0.self_attn.q_proj.weight'"));
  CHECK_THROWS_WITH(load_linear(bf, "model.layers.0.post_attention_layernorm.weight"),
                    Catch::Contains("not a matrix"));
}
