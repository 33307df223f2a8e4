#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "moqe/core/dtypes.hpp"
#include "moqe/io/quantized_format.hpp"
#include "test_util.hpp"

using namespace moqe;

TEST_CASE("quantized weights round-trip through the file format", "[io][format]") {
  test::TempDir dir;
  const int64_t n = 6, k = 96;
  const std::vector<float> w = test::gaussian_weights(n, k, 1);
  const MatrixView<const float> v(w.data(), n, k);
  struct Case {
    std::string name;
    QuantScheme scheme;
  };
  const std::vector<Case> cases = {{"a.weight", {4, QuantMode::kSym, 32}},
                                   {"b.weight", {3, QuantMode::kAsym, kPerChannel}},
                                   {"c.weight", {2, QuantMode::kSymFull, 96, ScaleType::kF32}},
                                   {"d.weight", {8, QuantMode::kAsym, 32, ScaleType::kF32}}};
  SafetensorsWriter writer;
  std::vector<QuantizedMatrix> qs;
  for (const Case& c : cases) {
    qs.push_back(quantize(v, c.scheme));
    add_quantized(writer, c.name, qs.back());
  }
  writer.add_values<float>("norm.weight", DType::kF32, {k}, std::span<const float>(w.data(), k));
  writer.write(dir / "q.safetensors");

  const Checkpoint ckpt(dir / "q.safetensors");
  CHECK(ckpt.metadata().at("moqe.format") == "1");
  CHECK(quantized_weight_names(ckpt) ==
        std::vector<std::string>{"a.weight", "b.weight", "c.weight", "d.weight"});
  CHECK_FALSE(is_quantized(ckpt, "norm.weight"));
  CHECK(ckpt.info("a.weight.qweight").dtype == DType::kU8);
  CHECK(ckpt.info("a.weight.qweight").shape == std::vector<int64_t>{n, 48});
  CHECK(ckpt.info("a.weight.scales").dtype == DType::kF16);
  CHECK(ckpt.info("a.weight.scales").shape == std::vector<int64_t>{n, 3});
  CHECK_FALSE(ckpt.contains("a.weight.zeros"));
  CHECK(ckpt.info("b.weight.zeros").shape == std::vector<int64_t>{n, 1});
  CHECK(ckpt.info("b.weight.qweight").shape == std::vector<int64_t>{n, 36});
  CHECK(ckpt.info("c.weight.scales").dtype == DType::kF32);
  const auto j = nlohmann::json::parse(ckpt.metadata().at("moqe.scheme.b.weight"));
  CHECK(j["bits"] == 3);
  CHECK(j["mode"] == "asym");
  CHECK(j["group_size"] == k);  // per-channel is recorded as K
  CHECK(j["shape"] == nlohmann::json::array({n, k}));
  for (size_t i = 0; i < cases.size(); ++i) {
    const QuantizedMatrix back = load_quantized(ckpt, cases[i].name);
    CHECK(back.group_size() == qs[i].group_size());
    CHECK(back.scheme().bits == qs[i].bits());
    CHECK(dequantize(back) == dequantize(qs[i]));
    CHECK(weight_shape(ckpt, cases[i].name) == std::vector<int64_t>{n, k});
    CHECK(load_weight_f32(ckpt, cases[i].name).values == dequantize(qs[i]));
    CHECK(is_companion_tensor(ckpt, cases[i].name + ".qweight"));
    CHECK(is_companion_tensor(ckpt, cases[i].name + ".scales"));
  }
  CHECK_FALSE(is_companion_tensor(ckpt, "norm.weight"));
}

TEST_CASE("a broken quantized weight is an error naming the file and tensor", "[io][format]") {
  test::TempDir dir;
  const std::vector<float> w = test::gaussian_weights(2, 64, 2);
  const QuantizedMatrix q =
      quantize(MatrixView<const float>(w.data(), 2, 64), {4, QuantMode::kAsym, 32});
  auto write_with = [&](const std::string& scheme_json, bool drop_zeros, const std::string& file) {
    SafetensorsWriter wr;
    add_quantized(wr, "x", q);
    if (!scheme_json.empty()) wr.set_metadata("moqe.scheme.x", scheme_json);
    if (drop_zeros) {
      SafetensorsWriter w2;  // the same without x.zeros
      w2.add_values<uint8_t>("x.qweight", DType::kU8, {2, 32}, q.qweight());
      std::vector<uint16_t> h(q.scales().size());
      for (size_t i = 0; i < h.size(); ++i) h[i] = float_to_half_bits(q.scales()[i]);
      w2.add_values<uint16_t>("x.scales", DType::kF16, {2, 2}, h);
      w2.set_metadata("moqe.format", "1");
      w2.set_metadata("moqe.scheme.x", scheme_to_json(q));
      w2.write(dir / file);
      return;
    }
    wr.write(dir / file);
  };
  write_with("", true, "nozeros.safetensors");
  CHECK_THROWS_WITH(load_quantized(Checkpoint(dir / "nozeros.safetensors"), "x"),
                    Catch::Contains("nozeros.safetensors") && Catch::Contains("'x.zeros'"));
  write_with(R"({"bits":4,"mode":"asym","group_size":32,"shape":[2,128]})", false,
             "shape.safetensors");
  CHECK_THROWS_WITH(
      load_quantized(Checkpoint(dir / "shape.safetensors"), "x"),
      Catch::Contains("tensor 'x.qweight'") && Catch::Contains("expected U8 [2, 64]"));
  write_with(R"({"bits":5,"mode":"asym","group_size":32,"shape":[2,64]})", false,
             "bits.safetensors");
  CHECK_THROWS_WITH(load_quantized(Checkpoint(dir / "bits.safetensors"), "x"),
                    Catch::Contains("unsupported bits 5"));
  write_with(R"({"bits":4,"mode":"nf4","group_size":32,"shape":[2,64]})", false,
             "mode.safetensors");
  CHECK_THROWS_WITH(load_quantized(Checkpoint(dir / "mode.safetensors"), "x"),
                    Catch::Contains("unknown quantization mode 'nf4'"));
  write_with("{not json", false, "json.safetensors");
  CHECK_THROWS_WITH(
      load_quantized(Checkpoint(dir / "json.safetensors"), "x"),
      Catch::Contains("json.safetensors: tensor 'x'") && Catch::Contains("not valid JSON"));
}

TEST_CASE("fp8 E4M3 weights with 128x128 block scales load as fp32", "[io][format]") {
  test::TempDir dir;
  const int64_t n = 130, k = 129;  // ragged blocks at both edges
  std::vector<uint8_t> f8(static_cast<size_t>(n * k));
  for (size_t i = 0; i < f8.size(); ++i) f8[i] = static_cast<uint8_t>((i * 7) % 0x7e);  // finite
  const std::vector<float> inv = {1.0f, 2.0f, 0.5f, 4.0f};                              // [2, 2]
  SafetensorsWriter wr;
  wr.add_values<uint8_t>("w", DType::kF8_E4M3, {n, k}, f8);
  wr.add_values<float>("w_scale_inv", DType::kF32, {2, 2}, inv);
  wr.write(dir / "f8.safetensors");
  const Checkpoint ckpt(dir / "f8.safetensors");
  const DenseWeight d = load_weight_f32(ckpt, "w");
  REQUIRE(d.rows == n);
  for (int64_t r : {0, 127, 128, 129}) {
    for (int64_t c : {0, 127, 128}) {
      const float expect = fp8_e4m3_to_float(f8[r * k + c]) * inv[(r / 128) * 2 + c / 128];
      REQUIRE(d.values[r * k + c] == expect);
    }
  }
  CHECK(is_companion_tensor(ckpt, "w_scale_inv"));
}
