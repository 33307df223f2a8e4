#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <regex>

#include "moqe/io/convert.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/synthetic.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

SyntheticMoeSpec small_spec() {
  SyntheticMoeSpec s;
  s.hidden = 128;
  s.intermediate = 96;  // 96 is not a multiple of 128: default group falls to per-channel
  s.experts = 3;
  s.dtype = DType::kBF16;
  return s;
}

}  // namespace

TEST_CASE("the default include matches expert weights of every known family only",
          "[io][convert]") {
  const std::regex re{std::string(default_include_regex())};
  for (const char* yes : {"model.layers.0.block_sparse_moe.experts.7.w1.weight",
                          "model.layers.3.block_sparse_moe.experts.0.w2.weight",
                          "model.layers.1.mlp.experts.63.gate_proj.weight",
                          "model.layers.1.mlp.experts.0.down_proj.weight",
                          "encoder.block.1.layer.1.mlp.experts.expert_5.wi.weight",
                          "decoder.block.3.layer.2.mlp.experts.expert_0.wo.weight"}) {
    CHECK(std::regex_search(std::string(yes), re));
  }
  for (const char* no :
       {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "encoder.block.1.layer.1.mlp.router.classifier.weight", "model.embed_tokens.weight",
        "model.norm.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}) {
    CHECK_FALSE(std::regex_search(std::string(no), re));
  }
}

TEST_CASE("quantize_checkpoint quantizes experts and copies the rest unchanged", "[io][convert]") {
  test::TempDir dir;
  write_synthetic_moe(dir.path() / "in", small_spec());
  const Checkpoint in(dir.path() / "in");
  ConvertOptions o;
  o.bits = 4;
  const ConvertReport r = quantize_checkpoint(in, dir / "q.safetensors", o);
  CHECK(r.quantized_count == 9);
  const Checkpoint q(dir / "q.safetensors");
  CHECK(quantized_weight_names(q).size() == 9);
  for (const std::string& name : in.tensor_names()) {
    const bool expert = name.find(".experts.") != std::string::npos;
    CHECK(is_quantized(q, name) == expert);
    if (!expert) {  // copied byte for byte, same dtype
      REQUIRE(q.info(name).dtype == in.info(name).dtype);
      const auto a = in.bytes(name), b = q.bytes(name);
      REQUIRE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    } else {
      const QuantizedMatrix m = load_quantized(q, name);
      // w1/w3 have K = 128 (group 128); w2 has K = 96 (per-channel by default).
      CHECK(m.group_size() == (name.ends_with("w2.weight") ? 96 : 128));
      // The stored result is exactly the reference quantization of the converted weights.
      const DenseWeight w = load_weight_f32(in, name);
      const QuantizedMatrix ref = quantize(MatrixView<const float>(w.values.data(), w.rows, w.cols),
                                           {4, QuantMode::kSym, m.group_size() == 96 ? 0 : 128});
      REQUIRE(dequantize(m) == dequantize(ref));
    }
  }
  CHECK(r.quantized_bytes_out < r.quantized_bytes_in / 3);
  const auto report = nlohmann::json::parse(report_to_json(r));
  CHECK(report["quantized_tensors"] == 9);
  CHECK(report["tensors"].size() == in.size());

  // Dequantize back: F32 tensors equal to the library's dequantization.
  dequantize_checkpoint(q, dir / "f.safetensors");
  const Checkpoint f(dir / "f.safetensors");
  CHECK(f.size() == in.size());
  CHECK(f.metadata().count("moqe.format") == 0);
  for (const std::string& name : quantized_weight_names(q)) {
    REQUIRE(f.info(name).dtype == DType::kF32);
    REQUIRE(f.to_float(name) == dequantize(load_quantized(q, name)));
  }
}

TEST_CASE("quantize_checkpoint options: fixed, adaptive, include/exclude and errors",
          "[io][convert]") {
  test::TempDir dir;
  write_synthetic_moe(dir.path() / "in", small_spec());
  const Checkpoint in(dir.path() / "in");
  ConvertOptions o;
  o.bits = 3;
  o.mode = QuantMode::kAsym;
  o.group_policy = GroupPolicy::kFixed;
  o.group_size = 64;  // does not divide K = 96 of w2
  CHECK_THROWS_WITH(quantize_checkpoint(in, dir / "bad.safetensors", o),
                    Catch::Contains("w2.weight' with K = 96") && Catch::Contains("group_size 64"));
  CHECK_FALSE(std::filesystem::exists(dir / "bad.safetensors"));
  o.group_size = 32;
  o.include_regex = "experts\\.0\\.";
  o.exclude_regex = "w3";
  ConvertReport r = quantize_checkpoint(in, dir / "fixed.safetensors", o);
  CHECK(r.quantized_count == 2);
  const Checkpoint fixed(dir / "fixed.safetensors");
  CHECK(load_quantized(fixed, "model.layers.0.block_sparse_moe.experts.0.w1.weight").group_size() ==
        32);
  CHECK_FALSE(is_quantized(fixed, "model.layers.0.block_sparse_moe.experts.0.w3.weight"));

  ConvertOptions a;
  a.group_policy = GroupPolicy::kAdaptive;
  r = quantize_checkpoint(in, dir / "adaptive.safetensors", a);
  CHECK(r.quantized_count == 9);
  for (const TensorReport& t : r.tensors) {
    if (t.quantized) CHECK((t.group_size == t.shape[1] || t.shape[1] % t.group_size == 0));
  }
  a.include_regex = "(";
  CHECK_THROWS_WITH(quantize_checkpoint(in, dir / "x.safetensors", a),
                    Catch::Contains("invalid --include regular expression '('"));
  // A router named explicitly is quantized: never by default, always on request.
  a.include_regex = "gate\\.weight$";
  r = quantize_checkpoint(in, dir / "router.safetensors", a);
  CHECK(r.quantized_count == 1);
}
