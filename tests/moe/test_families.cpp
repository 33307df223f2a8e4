// Every MoE family of transformers against transformers itself: tests/data/families holds, per
// case, one MoE layer as a tiny model saved by transformers (save_pretrained), an input x and the
// output and routing transformers' own MoE block computed (scripts/hf_crosscheck.py writes them;
// no torch is needed here). The family comes from config.json alone, as users meet it.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "cli/cli_util.hpp"
#include "moe/family_fixtures.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;
using namespace moqe::test;
namespace fs = std::filesystem;

namespace {

std::vector<float> run_layer(const MoELayer& layer, const Expected& e, Routing* routing = nullptr) {
  std::vector<float> y(e.x.size());
  auto ws = layer.make_workspace(e.t);
  layer.run(MatrixView<const float>(e.x.data(), e.t, e.h), MatrixView<float>(y.data(), e.t, e.h),
            ws);
  if (routing != nullptr) *routing = ws.routing;
  return y;
}

// A copy of a case's layer with tensors dropped, renamed (old -> new) or added, and its config
// edited, in `dir`.
void write_variant(const FixtureCase& c, const fs::path& dir, const std::set<std::string>& drop,
                   const std::map<std::string, std::string>& rename,
                   const std::map<std::string, std::vector<float>>& add,
                   const std::function<void(nlohmann::json&)>& edit = {}) {
  fs::create_directories(dir);
  const Checkpoint ckpt(c.dir / "model.safetensors");
  SafetensorsWriter w;
  for (const std::string& n : ckpt.tensor_names()) {
    if (drop.count(n) != 0) continue;
    const TensorInfo& t = ckpt.info(n);
    const auto it = rename.find(n);
    w.add_view(it == rename.end() ? n : it->second, t.dtype, t.shape, ckpt.bytes(n));
  }
  for (const auto& [n, v] : add) {
    w.add_values<float>(n, DType::kF32, {static_cast<int64_t>(v.size())}, std::span(v));
  }
  w.write(dir / "model.safetensors");
  std::ifstream in(c.dir / "config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  if (edit) edit(j);
  std::ofstream(dir / "config.json") << j.dump(1);
}

}  // namespace

TEST_CASE("every family of transformers 5 matches its own MoE block, from config.json alone",
          "[moe][families]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  std::set<std::string> families;
  for (const FixtureCase& c : cases) {
    DYNAMIC_SECTION(c.name) {
      const MoeConfig config = read_moe_config(c.dir / "config.json");
      CHECK(to_string(config.family) == c.family);
      const Expected e = expected(c);
      const MoELayer layer =
          load_moe_layer(Checkpoint(c.dir / "model.safetensors"), c.prefix, config);
      Routing r;
      const std::vector<float> y = run_layer(layer, e, &r);
      check_routing(e, r.ids, r.weights);
      CHECK(rel_err(y, e.y) < 1e-5);
      // The same weights stored as F32 (the fixtures store them as BF16, exactly).
      test::TempDir dir;
      const Checkpoint bf(c.dir / "model.safetensors");
      SafetensorsWriter w;
      for (const std::string& n : bf.tensor_names()) {
        const std::vector<float> v = bf.to_float(n);
        w.add_values<float>(n, DType::kF32, bf.info(n).shape, std::span<const float>(v));
      }
      w.write(dir / "f32.safetensors");
      Routing r32;
      const std::vector<float> y32 =
          run_layer(load_moe_layer(Checkpoint(dir / "f32.safetensors"), c.prefix, config), e, &r32);
      check_routing(e, r32.ids, r32.weights);
      CHECK(rel_err(y32, e.y) < 1e-5);
    }
    families.insert(c.family);
  }
  // Every family of the table has at least one case.
  for (const FamilyInfo& f : moqe::families()) {
    CAPTURE(f.name);
    CHECK(families.count(std::string(f.name)) == 1);
  }
}

TEST_CASE("quantized families run on their codes as on their dequantized weights",
          "[moe][families]") {
  // Original and fused layouts alike: `moqe quantize`'s path (per expert for fused tensors), then
  // the layer on the codes against the layer on the dequantized F32 weights.
  const std::vector<FixtureCase> cases = fixture_cases();
  const int bits[] = {2, 3, 4, 8};
  int n = 0;
  for (const FixtureCase& c : cases) {
    const int b = bits[n++ % 4];
    DYNAMIC_SECTION(c.name << " int" << b) {
      test::TempDir dir;
      const MoeConfig config = read_moe_config(c.dir / "config.json");
      ConvertOptions o;
      o.bits = b;
      o.mode = b <= 3 ? QuantMode::kAsym : QuantMode::kSym;
      o.group_policy = GroupPolicy::kPerChannel;
      o.expert_stack = [&](std::string_view name, std::span<const int64_t> shape) {
        return expert_stack(config, name, shape);
      };
      const Checkpoint original(c.dir / "model.safetensors");
      const ConvertReport qr = quantize_checkpoint(original, dir / "q.safetensors", o);
      CHECK(qr.quantized_count > 0);
      const Checkpoint q(dir / "q.safetensors");
      dequantize_checkpoint(q, dir / "d.safetensors");
      const Checkpoint d(dir / "d.safetensors");
      // Fused tensors keep their name and come back in their own layout.
      for (const std::string& name : quantized_weight_names(q)) {
        CHECK(d.info(name).shape == weight_shape(q, name));
        CHECK(d.info(name).shape == original.info(name).shape);
      }
      const Expected e = expected(c);
      Routing rq, rd;
      const std::vector<float> yq = run_layer(load_moe_layer(q, c.prefix, config), e, &rq);
      const std::vector<float> yd = run_layer(load_moe_layer(d, c.prefix, config), e, &rd);
      CHECK(rq.ids == rd.ids);
      CHECK(rel_err(yq, yd) < 1e-5);
    }
  }
}

TEST_CASE("the tool runs every family with no --family and no --config", "[moe][families][cli]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  test::TempDir dir;
  for (const FixtureCase& c : cases) {
    CAPTURE(c.name);
    const fs::path y = dir / (c.name + ".safetensors");
    const test::Run r = test::moqe_cli(
        dir, "moe-forward --weights " + c.dir.string() + " --prefix " + c.prefix + " --input " +
                 (c.dir / "x.safetensors").string() + " --output " + y.string());
    INFO(r.err);
    REQUIRE(r.status == 0);
    // The case directory also holds x and expected: named as ignored, not read as weights.
    CHECK_THAT(r.err, Catch::Contains("not part of the checkpoint, ignored: expected.safetensors, "
                                      "x.safetensors"));
    const Expected e = expected(c);
    const Checkpoint out(y);
    CHECK(out.metadata().at("moqe.family") == c.family);
    const auto b = out.bytes("topk_ids");
    std::vector<int32_t> ids(b.size() / 4);
    std::memcpy(ids.data(), b.data(), b.size());
    check_routing(e, ids, out.to_float("topk_weights"));
    CHECK(rel_err(out.to_float("y"), e.y) < 1e-5);
  }
}

TEST_CASE("what users met as silent wrong answers are errors naming the tensor, key or family",
          "[moe][families][cli]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  test::TempDir dir;
  auto forward = [&](const fs::path& weights, const std::string& prefix, const FixtureCase& c,
                     const std::string& extra = "") {
    return test::moqe_cli(dir, "moe-forward --weights " + weights.string() + " --prefix " + prefix +
                                   " --input " + (c.dir / "x.safetensors").string() + " --output " +
                                   (dir / "y.safetensors").string() + " " + extra);
  };
  auto fails_with = [&](const test::Run& r, const std::string& message) {
    INFO(r.err);
    CHECK(r.status == 1);
    CHECK_THAT(r.err, Catch::Contains("moqe: error: " + std::string()) && Catch::Contains(message));
    CHECK_FALSE(fs::exists(dir / "y.safetensors"));
  };
  SECTION("a --family that contradicts model_type; --family-override for custom models") {
    const FixtureCase& c = find_case(cases, "phimoe");
    fails_with(forward(c.dir, c.prefix, c, "--family mixtral"),
               "model_type 'phimoe' is the phimoe family, but the family asked for is mixtral");
    const test::Run r = forward(c.dir, c.prefix, c, "--family mixtral --family-override");
    CHECK(r.status == 0);
  }
  SECTION("a missing correction bias is never replaced by zeros") {
    for (const char* name : {"deepseek_v3", "minimax_m2", "exaone_moe", "ernie4_5_moe", "afmoe"}) {
      const FixtureCase& c = find_case(cases, name);
      const std::string bias =
          c.prefix + "." + std::string(family_info(*parse_family(c.family)).correction_bias);
      write_variant(c, dir / name, {bias}, {}, {});
      fails_with(forward(dir / name, c.prefix, c), "missing tensor '" + bias + "'");
    }
  }
  SECTION("tensors under the prefix the family does not use are listed") {
    // ERNIE 4.5 read as Qwen3-MoE: its shared experts and selection bias would be ignored.
    const FixtureCase& c = find_case(cases, "ernie4_5_moe");
    fails_with(forward(c.dir, c.prefix, c, "--family qwen3_moe --family-override"),
               "are not part of a qwen3_moe layer: " + c.prefix +
                   ".moe_statics.e_score_correction_bias, " + c.prefix +
                   ".shared_experts.down_proj.weight");
    const FixtureCase& m = find_case(cases, "mixtral");
    write_variant(m, dir / "extra", {}, {}, {{m.prefix + ".gate.bias", std::vector<float>(4)}});
    fails_with(forward(dir / "extra", m.prefix, m),
               "1 tensor(s) under '" + m.prefix + "' are not part of a mixtral layer: " + m.prefix +
                   ".gate.bias");
    CHECK(forward(dir / "extra", m.prefix, m, "--allow-unused-tensors").status == 0);
    // Quantized, a left-over weight is its parts (X.qweight, X.scales): named all the same.
    const std::string q = (dir / "ernie_q.safetensors").string();
    const test::Run r = test::moqe_cli(dir,
                                       "quantize --bits 8 --quiet --include 'proj\\.weight$' "
                                       "--input " +
                                           c.dir.string() + " --output " + q);
    INFO(r.err);
    REQUIRE(r.status == 0);
    fs::copy_file(c.dir / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
    fs::remove(dir / "y.safetensors");  // written by the run with --allow-unused-tensors
    fails_with(forward(q, c.prefix, c,
                       "--config " + (dir / "config.json").string() +
                           " --family qwen3_moe --family-override"),
               "are not part of a qwen3_moe layer: " + c.prefix +
                   ".moe_statics.e_score_correction_bias, " + c.prefix +
                   ".shared_experts.down_proj.weight.qweight");
  }
  SECTION("a needed key without a transformers default, and unknown or absent model_types") {
    const FixtureCase& c = find_case(cases, "dots1");
    write_variant(c, dir / "nokey", {}, {}, {},
                  [](nlohmann::json& j) { j.erase("n_routed_experts"); });
    fails_with(forward(dir / "nokey", c.prefix, c),
               "the dots1 family needs 'n_routed_experts', which is missing");
    write_variant(c, dir / "llama", {}, {}, {}, [](nlohmann::json& j) {
      j["model_type"] = "llama";
      j["architectures"] = {"LlamaForCausalLM"};
    });
    fails_with(forward(dir / "llama", c.prefix, c),
               "model_type 'llama' is not an MoE family moqe knows; supported: mixtral,");
    write_variant(c, dir / "none", {}, {}, {}, [](nlohmann::json& j) {
      j.erase("model_type");
      j.erase("architectures");
    });
    fails_with(forward(dir / "none", c.prefix, c), "no model_type");
    // architectures alone names the family.
    write_variant(c, dir / "arch", {}, {}, {}, [](nlohmann::json& j) { j.erase("model_type"); });
    CHECK(forward(dir / "arch", c.prefix, c).status == 0);
  }
  SECTION("other tools' quantized tensors are named as such") {
    const FixtureCase& c = find_case(cases, "qwen3_moe");
    const std::string w = c.prefix + ".experts.0.gate_proj";
    write_variant(c, dir / "gptq", {w + ".weight"}, {},
                  {{w + ".qweight", {0, 0}}, {w + ".qzeros", {0}}});
    fails_with(forward(dir / "gptq", c.prefix, c), "is a GPTQ or AWQ tensor");
  }
}

TEST_CASE("quantize: fused expert tensors need their family, and a run that matches nothing fails",
          "[moe][families][cli]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  test::TempDir dir;
  const FixtureCase& c = find_case(cases, "gpt_oss");
  fs::create_directories(dir / "noconfig");
  fs::copy_file(c.dir / "model.safetensors", dir / "noconfig" / "model.safetensors");
  const std::string out = (dir / "q.safetensors").string();
  test::Run r = test::moqe_cli(
      dir, "quantize --bits 4 --quiet --input " + (dir / "noconfig").string() + " --output " + out);
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("tensor '" + c.prefix + ".experts.down_proj'") &&
                        Catch::Contains("no config.json names the family"));
  r = test::moqe_cli(dir, "quantize --bits 4 --quiet --group-size channel --input " +
                              c.dir.string() + " --output " + out);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const Checkpoint q(out);
  CHECK(stored_scheme(q, c.prefix + ".experts.gate_up_proj").stack.transposed);
  CHECK(stored_scheme(q, c.prefix + ".experts.gate_up_proj").stack.experts == 4);
  CHECK_FALSE(is_quantized(q, c.prefix + ".experts.gate_up_proj_bias"));
  // Adaptive group sizes: one for all the experts of a fused tensor.
  r = test::moqe_cli(dir, "quantize --bits 4 --quiet --group-size adaptive --input " +
                              c.dir.string() + " --output " + (dir / "a.safetensors").string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  const Checkpoint a(dir / "a.safetensors");
  for (const char* n : {".experts.gate_up_proj", ".experts.down_proj"}) {
    const StoredScheme s = stored_scheme(a, c.prefix + n);
    CHECK(s.stack.experts == 4);
    CHECK(s.cols % s.scheme.resolved_group_size(s.cols) == 0);
  }
  r = test::moqe_cli(dir, "quantize --bits 4 --quiet --include nothing-matches --input " +
                              c.dir.string() + " --output " + (dir / "none.safetensors").string());
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("no tensor matched --include 'nothing-matches'"));
  CHECK_FALSE(fs::exists(dir / "none.safetensors"));
}

TEST_CASE("moe-forward input hygiene: outputs never replace inputs, x in F16 or BF16",
          "[moe][families][cli]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  const FixtureCase& c = find_case(cases, "qwen2_moe");
  test::TempDir dir;
  fs::copy(c.dir, dir / "case");
  const fs::path x = dir / "case" / "x.safetensors";
  const std::string x_before = test::slurp(x);
  auto forward = [&](const std::string& input, const std::string& output,
                     const std::string& extra = "") {
    return test::moqe_cli(dir, "moe-forward --weights " + (dir / "case").string() + " --prefix " +
                                   c.prefix + " --input " + input + " --output " + output + " " +
                                   extra);
  };
  test::Run r = forward(x.string(), x.string());
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("is also an input"));
  CHECK(test::slurp(x) == x_before);
  r = forward(x.string(), (dir / "case" / "model.safetensors").string());
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("is also an input"));
  r = forward(x.string(), (dir / "no" / "such" / "y.safetensors").string());
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("directory") && Catch::Contains("does not exist"));

  // F16 and BF16 x: y comes back in x's dtype, equal to the F32 run on the rounded x.
  const Expected e = expected(c);
  const MoELayer layer = load_moe_layer(Checkpoint(c.dir / "model.safetensors"), c.prefix,
                                        read_moe_config(c.dir / "config.json"));
  for (const DType dt : {DType::kF16, DType::kBF16}) {
    CAPTURE(dtype_name(dt));
    std::vector<uint16_t> bits(e.x.size());
    Expected rounded = e;
    for (size_t i = 0; i < e.x.size(); ++i) {
      bits[i] = dt == DType::kF16 ? float_to_half_bits(e.x[i]) : float_to_bf16_bits(e.x[i]);
      rounded.x[i] = dt == DType::kF16 ? half_bits_to_float(bits[i]) : bf16_bits_to_float(bits[i]);
    }
    SafetensorsWriter w;
    w.add_values<uint16_t>("x", dt, {e.t, e.h}, std::span<const uint16_t>(bits));
    w.write(dir / "x16.safetensors");
    r = forward((dir / "x16.safetensors").string(), (dir / "y16.safetensors").string(),
                "--chunk-tokens 5");
    INFO(r.err);
    REQUIRE(r.status == 0);
    const Checkpoint out(dir / "y16.safetensors");
    CHECK(out.info("y").dtype == dt);
    const std::vector<float> want = run_layer(layer, rounded);
    const std::vector<float> got = out.to_float("y");
    for (size_t i = 0; i < want.size(); ++i) {
      const float round = dt == DType::kF16 ? half_bits_to_float(float_to_half_bits(want[i]))
                                            : bf16_bits_to_float(float_to_bf16_bits(want[i]));
      CHECK(got[i] == round);
    }
    r = forward((dir / "x16.safetensors").string(), (dir / "y32.safetensors").string(),
                "--output-dtype f32");
    REQUIRE(r.status == 0);
    CHECK(Checkpoint(dir / "y32.safetensors").to_float("y") == want);
  }
}

TEST_CASE("docs/families.md and the README list the families of the table", "[moe][families]") {
  const std::string doc = test::slurp(fs::path(MOQE_SOURCE_DIR) / "docs" / "families.md");
  CHECK_THAT(doc, Catch::Contains(families_markdown()));
  const std::string readme = test::slurp(fs::path(MOQE_SOURCE_DIR) / "README.md");
  CHECK_THAT(readme, Catch::Contains(supported_families()));
}

TEST_CASE("HunYuan's per-layer moe_topk picks the prefix's layer", "[moe][families]") {
  const std::vector<FixtureCase> cases = fixture_cases();
  const FixtureCase& c = find_case(cases, "hunyuan_v1_moe");
  test::TempDir dir;
  write_variant(c, dir / "lists", {}, {}, {}, [](nlohmann::json& j) {
    j["moe_topk"] = nlohmann::json::array({2, 1});
  });
  const MoeConfig config = read_moe_config(dir / "lists" / "config.json");
  CHECK(config.layer_top_k == std::vector<int64_t>{2, 1});
  CHECK(config.for_layer("model.layers.0.mlp").top_k() == 2);
  CHECK(config.for_layer("model.layers.1.mlp").top_k() == 1);
  CHECK_THROWS_WITH(config.for_layer("model.layers.2.mlp"),
                    Catch::Contains("'moe_topk' lists 2 layers; the prefix 'model.layers.2.mlp' "
                                    "is layer 2"));
  CHECK_THROWS_WITH(config.for_layer("mlp"), Catch::Contains("names no layer"));
  // Layer 0 of the list is the fixture's top-2: transformers' result.
  const Expected e = expected(c);
  Routing r;
  const std::vector<float> y = run_layer(
      load_moe_layer(Checkpoint(dir / "lists" / "model.safetensors"), c.prefix, config), e, &r);
  check_routing(e, r.ids, r.weights);
  CHECK(rel_err(y, e.y) < 1e-5);
}
