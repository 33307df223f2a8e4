// Other tools' quantized checkpoints read in place (io/foreign.hpp, docs/formats.md): GPTQ (v1 and
// v2 zero points, act-order g_idx, GPTQModel's old 3-bit words), AWQ (GEMM) and
// compressed-tensors (pack-quantized before and after 0.18, naive 8-bit). tests/data/formats holds
// tiny MoE layers written by scripts/make_format_fixtures.py (compressed-tensors by its own
// package; GPTQ and AWQ by packers checked against GPTQModel's loader and AutoAWQ's dequantizer)
// with transformers' output on their dequantized weights.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/cli_util.hpp"
#include "moe/family_fixtures.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/foreign.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;
using namespace moqe::test;
namespace fs = std::filesystem;

namespace {

const fs::path kFormats = test_data("formats", MOQE_FORMAT_FIXTURES);

std::vector<float> run_layer(const MoELayer& layer, const Expected& e, Routing* routing = nullptr) {
  std::vector<float> y(e.x.size());
  auto ws = layer.make_workspace(e.t);
  layer.run(MatrixView<const float>(e.x.data(), e.t, e.h), MatrixView<float>(y.data(), e.t, e.h),
            ws);
  if (routing != nullptr) *routing = ws.routing;
  return y;
}

Expected expected_of(const FixtureCase& c) {
  Expected e = expected(c);
  e.k = 2;
  return e;
}

// A tensor as the variant writer stores it.
struct Tensor {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};

// A copy of case `c` in `dir` whose tensors `edit` may change or drop (by returning nullopt), and
// whose config `edit_config` may change.
void write_variant(const FixtureCase& c, const fs::path& dir,
                   const std::function<std::optional<Tensor>(const std::string&, Tensor)>& edit,
                   const std::function<void(nlohmann::json&)>& edit_config = {}) {
  fs::create_directories(dir);
  const Checkpoint ckpt(c.dir / "model.safetensors");
  std::map<std::string, Tensor> kept;
  for (const std::string& n : ckpt.tensor_names()) {
    const TensorInfo& t = ckpt.info(n);
    const auto b = ckpt.bytes(n);
    std::optional<Tensor> v = edit(n, Tensor{t.dtype, t.shape, {b.begin(), b.end()}});
    if (v) kept.emplace(n, std::move(*v));
  }
  SafetensorsWriter w;
  for (const auto& [n, t] : kept) w.add_view(n, t.dtype, t.shape, std::span(t.bytes));
  w.write(dir / "model.safetensors");
  std::ifstream in(c.dir / "config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  if (edit_config) edit_config(j);
  std::ofstream(dir / "config.json") << j.dump(1);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no moqe::Error thrown>";
}

std::string load_error(const FixtureCase& c, const fs::path& dir) {
  return error_of([&] {
    const Checkpoint ckpt(dir / "model.safetensors");
    load_moe_layer(ckpt, c.prefix, read_moe_config(dir / "config.json"));
  });
}

}  // namespace

TEST_CASE("GPTQ, AWQ and compressed-tensors layers run in place, equal to their dequantization",
          "[io][formats]") {
  const std::vector<FixtureCase> cases = fixture_cases(kFormats);
  REQUIRE(cases.size() >= 14);
  for (const FixtureCase& c : cases) {
    DYNAMIC_SECTION(c.name) {
      const Checkpoint ckpt(c.dir / "model.safetensors");
      const QuantizationConfig& qc = ckpt.quantization();
      CHECK(qc.format == (c.format == "gptq"  ? ForeignFormat::kGptq
                          : c.format == "awq" ? ForeignFormat::kAwq
                                              : ForeignFormat::kCompressedTensors));
      // Every routed expert's projection is a foreign weight; nothing else is.
      const std::vector<std::string> names = quantized_weight_names(ckpt);
      CHECK(names.size() == 12);
      for (const std::string& n : names) CHECK(n.find(".experts.") != std::string::npos);
      const Expected e = expected_of(c);
      const MoELayer layer = load_moe_layer(ckpt, c.prefix, read_moe_config(c.dir / "config.json"));
      Routing r;
      const std::vector<float> y = run_layer(layer, e, &r);
      check_routing(e, r.ids, r.weights);
      CHECK(rel_err(y, e.y) < 1e-5);
      // The same kernels as moqe's own matrices of that scheme.
      const QuantizedMatrix q = load_quantized(ckpt, names[0]);
      const QuantizedLinear foreign = QuantizedLinear::from_quantized(q);
      const std::vector<float> w = dequantize(q);
      const QuantizedLinear own = QuantizedLinear::from_quantized(
          quantize(MatrixView<const float>(w.data(), q.rows(), q.cols()), q.scheme()));
      CHECK(foreign.isa() == own.isa());
    }
  }
}

TEST_CASE("act-order GPTQ keeps its input order; sym GPTQ is sym_full, asym keeps zero points",
          "[io][formats]") {
  const std::vector<FixtureCase> cases = fixture_cases(kFormats);
  auto first = [](const Checkpoint& ckpt) {
    return load_quantized(ckpt, quantized_weight_names(ckpt).front());
  };
  const Checkpoint act(find_case(cases, "gptq-v1-desc_act-4bit-g32").dir / "model.safetensors");
  const QuantizedMatrix qa = first(act);
  CHECK(qa.has_input_order());
  CHECK(qa.scheme().mode == QuantMode::kSymFull);
  CHECK(qa.group_size() == 32);
  const Checkpoint asym(find_case(cases, "gptq-v1-2bit-g64").dir / "model.safetensors");
  const QuantizedMatrix q2 = first(asym);
  CHECK_FALSE(q2.has_input_order());  // g_idx = k / G: no permutation
  CHECK(q2.scheme().mode == QuantMode::kAsym);
  CHECK(q2.bits() == 2);
  CHECK(q2.group_size() == 64);
  const Checkpoint ch(find_case(cases, "awq-4bit-channel").dir / "model.safetensors");
  CHECK(first(ch).scheme().group_size == kPerChannel);
}

TEST_CASE("moqe with other tools' checkpoints: inspect names the format, quantize keeps the codes",
          "[io][formats][cli]") {
  const std::vector<FixtureCase> cases = fixture_cases(kFormats);
  TempDir dir;
  for (const char* name : {"gptq-v1-desc_act-4bit-g32", "awq-4bit-g32", "ct-pack-3bit-g32-asym",
                           "ct-naive-8bit-channel"}) {
    CAPTURE(name);
    const FixtureCase& c = find_case(cases, name);
    Run r = moqe_cli(dir, "inspect " + (c.dir / "model.safetensors").string());
    INFO(r.err);
    REQUIRE(r.status == 0);
    const std::string format = c.format == "ct" ? "compressed-tensors" : c.format;
    CHECK_THAT(r.out, Catch::Contains(format + " weights"));
    // moe-forward on the checkpoint as downloaded, and on moqe quantize's rewrite of it.
    const std::string x = (c.dir / "x.safetensors").string();
    r = moqe_cli(dir, "moe-forward --weights " + (c.dir / "model.safetensors").string() +
                          " --prefix " + c.prefix + " --input " + x + " --output " +
                          (dir / "y.safetensors").string());
    INFO(r.err);
    REQUIRE(r.status == 0);
    const Expected e = expected_of(c);
    const std::vector<float> y = Checkpoint(dir / "y.safetensors").to_float("y");
    CHECK(rel_err(y, e.y) < 1e-5);
    const fs::path q = dir / "rewritten";
    fs::create_directories(q);
    fs::copy_file(c.dir / "config.json", q / "config.json", fs::copy_options::overwrite_existing);
    r = moqe_cli(dir, "quantize --bits 4 --input " + (c.dir / "model.safetensors").string() +
                          " --output " + (q / "model.safetensors").string());
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK_THAT(r.out, Catch::Contains("of which 12 already quantized by " + format +
                                      ": kept as stored (lossless"));
    const Checkpoint rewritten(q / "model.safetensors");
    CHECK(rewritten.metadata().count("moqe.format") == 1);
    r = moqe_cli(dir, "moe-forward --weights " + q.string() + " --prefix " + c.prefix +
                          " --input " + x + " --output " + (dir / "y2.safetensors").string());
    INFO(r.err);
    REQUIRE(r.status == 0);
    CHECK(Checkpoint(dir / "y2.safetensors").to_float("y") == y);
    // dequantize: the same values from the original and from the rewrite.
    for (const auto& [in, out] : {std::pair{c.dir / "model.safetensors", dir / "d1.safetensors"},
                                  std::pair{q / "model.safetensors", dir / "d2.safetensors"}}) {
      r = moqe_cli(dir, "dequantize --input " + in.string() + " --output " + out.string());
      INFO(r.err);
      REQUIRE(r.status == 0);
    }
    const Checkpoint d1(dir / "d1.safetensors"), d2(dir / "d2.safetensors");
    CHECK(d1.tensor_names() == d2.tensor_names());
    for (const std::string& n : quantized_weight_names(rewritten)) {
      CHECK(d1.to_float(n) == d2.to_float(n));
    }
    fs::remove_all(q);
  }
}

TEST_CASE("malformed GPTQ, AWQ and compressed-tensors weights are errors naming the tensor",
          "[io][formats]") {
  const std::vector<FixtureCase> cases = fixture_cases(kFormats);
  TempDir dir;
  auto keep = [](const std::string&, Tensor t) -> std::optional<Tensor> { return t; };
  SECTION("GPTQ") {
    const FixtureCase& c = find_case(cases, "gptq-v1-desc_act-4bit-g32");
    const std::string w = c.prefix + ".experts.1.up_proj";
    write_variant(c, dir / "noscales",
                  [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
                    if (n == w + ".scales") return std::nullopt;
                    return t;
                  });
    CHECK_THAT(load_error(c, dir / "noscales"), Catch::Contains("'" + w + ".scales'"));
    write_variant(c, dir / "rows", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".qweight") {
        t.shape[0] -= 1;
        t.bytes.resize(t.bytes.size() - static_cast<size_t>(t.shape[1]) * 4);
      }
      return t;
    });
    CHECK_THAT(load_error(c, dir / "rows"),
               Catch::Contains("'" + w + ".qweight'") && Catch::Contains("rows"));
    write_variant(c, dir / "gidx", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".g_idx") std::fill(t.bytes.begin(), t.bytes.end(), std::byte{0});
      return t;
    });
    CHECK_THAT(load_error(c, dir / "gidx"),
               Catch::Contains("g_idx gives group 0 64 columns, not the group size 32"));
    write_variant(c, dir / "gidx2", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".g_idx") {
        const int32_t v = 7;  // 2 groups of 32: group 7 does not exist
        std::memcpy(&t.bytes[8], &v, 4);
      }
      return t;
    });
    CHECK_THAT(load_error(c, dir / "gidx2"),
               Catch::Contains(w) && Catch::Contains("g_idx[2] = 7 is not one of the 2 groups"));
    write_variant(c, dir / "nan", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".scales") {
        const uint16_t nan = 0x7e00;  // fp16 NaN
        std::memcpy(&t.bytes[2], &nan, 2);
      }
      return t;
    });
    CHECK_THAT(load_error(c, dir / "nan"),
               Catch::Contains("'" + w + ".scales'") && Catch::Contains("non-finite scale"));
    write_variant(c, dir / "bits", keep,
                  [](nlohmann::json& j) { j["quantization_config"]["bits"] = 5; });
    CHECK_THAT(load_error(c, dir / "bits"), Catch::Contains("GPTQ bits 5 are not read"));
    write_variant(c, dir / "planar", keep, [](nlohmann::json& j) {
      j["quantization_config"]["checkpoint_format"] = "gptq_p";
    });
    CHECK_THAT(load_error(c, dir / "planar"),
               Catch::Contains("checkpoint_format 'gptq_p' is not read"));
  }
  SECTION("AWQ") {
    const FixtureCase& c = find_case(cases, "awq-4bit-g32");
    const std::string w = c.prefix + ".experts.0.w2";
    write_variant(c, dir / "zeros", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".qzeros") {
        t.shape[0] -= 1;
        t.bytes.resize(t.bytes.size() - static_cast<size_t>(t.shape[1]) * 4);
      }
      return t;
    });
    CHECK_THAT(load_error(c, dir / "zeros"), Catch::Contains("'" + w + ".qzeros'"));
    write_variant(c, dir / "gemv", keep,
                  [](nlohmann::json& j) { j["quantization_config"]["version"] = "gemv"; });
    CHECK_THAT(load_error(c, dir / "gemv"), Catch::Contains("AWQ version 'gemv' is not read"));
  }
  SECTION("compressed-tensors") {
    const FixtureCase& c = find_case(cases, "ct-pack-4bit-g32-sym");
    const std::string w = c.prefix + ".experts.2.down_proj";
    write_variant(c, dir / "shape", [&](const std::string& n, Tensor t) -> std::optional<Tensor> {
      if (n == w + ".weight_shape") {
        int64_t k = 0;
        std::memcpy(&k, &t.bytes[8], 8);
        k += 32;
        std::memcpy(&t.bytes[8], &k, 8);
      }
      return t;
    });
    CHECK_THAT(load_error(c, dir / "shape"), Catch::Contains("'" + w + ".weight_packed'"));
    write_variant(c, dir / "fp4", keep, [](nlohmann::json& j) {
      j["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float";
    });
    CHECK_THAT(load_error(c, dir / "fp4"),
               Catch::Contains("holds float weights") && Catch::Contains("config.json"));
    // As compressed-tensors matches: a regex naming the experts wins over "Linear", whatever
    // the order of the groups.
    write_variant(c, dir / "two", keep, [](nlohmann::json& j) {
      nlohmann::json& g = j["quantization_config"]["config_groups"];
      g["a_linear"] = g["group_0"];
      g["a_linear"]["weights"]["num_bits"] = 8;
      g["group_0"]["targets"] = {"re:.*experts\\.\\d+\\."};
    });
    CHECK(load_error(c, dir / "two") == "<no moqe::Error thrown>");
    // Ignored by the config, the experts' weights would not be quantized: an error, not zeros.
    write_variant(c, dir / "ignored", keep, [](nlohmann::json& j) {
      j["quantization_config"]["ignore"].push_back("re:.*experts.*");
    });
    CHECK_THAT(load_error(c, dir / "ignored"),
               Catch::Contains("no config group") || Catch::Contains("not part of"));
  }
  SECTION("no quantization_config: the tensors are named as another tool's") {
    const FixtureCase& c = find_case(cases, "gptq-v1-sym-4bit-g32");
    write_variant(c, dir / "noconfig", keep,
                  [](nlohmann::json& j) { j.erase("quantization_config"); });
    CHECK_THAT(load_error(c, dir / "noconfig"), Catch::Contains("is a GPTQ or AWQ tensor") &&
                                                    Catch::Contains("has no quantization_config"));
  }
}
