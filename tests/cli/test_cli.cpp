// The `moqe` tool run as a user runs it: real files, real exit codes, one clear message on error,
// and no partial output file.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/cli_util.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "test_util.hpp"

using namespace moqe;
using test::count_lines;
using test::moqe_cli;
using test::Run;
using test::slurp;

namespace {

SyntheticMoeSpec spec() {
  SyntheticMoeSpec s;
  s.hidden = 256;
  s.intermediate = 128;
  s.experts = 2;
  s.dtype = DType::kF16;
  s.shards = 2;
  return s;
}

}  // namespace

TEST_CASE("cli: quantize, inspect and dequantize a sharded checkpoint", "[cli]") {
  test::TempDir dir;
  write_synthetic_moe(dir.path() / "in", spec());
  const std::string in = (dir.path() / "in").string();
  const std::string q = (dir / "q.safetensors").string();

  Run r = moqe_cli(dir, "quantize --input " + in + " --output " + q + " --bits 4 --mode asym " +
                            "--group-size 64 --report " + (dir / "r.json").string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("quantized 6 tensors"));
  CHECK_THAT(r.out, Catch::Contains("experts.1.w2.weight"));
  CHECK_THAT(r.out, Catch::Contains("int4 asym"));
  const auto report = nlohmann::json::parse(slurp(dir / "r.json"));
  CHECK(report["quantized_tensors"] == 6);

  r = moqe_cli(dir, "inspect " + q);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("int4 asym g64 f16"));
  CHECK_THAT(r.out, Catch::Contains("moqe format 1"));
  CHECK_THAT(r.out, Catch::Contains("block_sparse_moe.gate.weight"));
  r = moqe_cli(dir, "inspect " + in + " " + q + " --raw");
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains(".qweight"));

  const std::string f = (dir / "f.safetensors").string();
  r = moqe_cli(dir, "dequantize --input " + q + " --output " + f);
  REQUIRE(r.status == 0);
  const Checkpoint qc(q), fc(f);
  for (const std::string& name : quantized_weight_names(qc)) {
    REQUIRE(fc.to_float(name) == dequantize(load_quantized(qc, name)));
  }
  // Every output went through a temporary name: nothing else is left in the directory.
  CHECK(dir.entries() ==
        std::vector<std::string>{"f.safetensors", "in", "q.safetensors", "r.json"});
}

TEST_CASE("cli: bad input and arguments fail with one message and no output", "[cli]") {
  test::TempDir dir;
  write_synthetic_moe(dir.path() / "in", spec());
  const std::string in = (dir.path() / "in").string();
  const auto out = dir / "out.safetensors";
  { std::ofstream(out) << "previous output"; }
  const std::string o = " --output " + out.string();
  struct Case {
    std::string args;
    std::string message;
  };
  { std::ofstream(dir / "garbage.safetensors") << "this is not a safetensors file at all"; }
  const std::vector<Case> cases = {
      {"quantize --input " + (dir / "missing").string() + o + " --bits 4", "missing"},
      {"quantize --input " + (dir / "garbage.safetensors").string() + o + " --bits 4",
       "garbage.safetensors"},
      {"quantize --input " + in + o + " --bits 5", "unsupported --bits 5"},
      {"quantize --input " + in + o + " --bits 4 --group-size 48", "invalid --group-size '48'"},
      {"quantize --input " + in + o + " --bits 4 --group-size 96", "group_size 96"},
      {"quantize --input " + in + o + " --bits 4 --mode nf4", "unknown --mode 'nf4'"},
      {"quantize --input " + in + o + " --bits 4 --include '('", "invalid --include"},
      {"quantize --input " + in + o + " --bits 4 --error-budget 0.1", "--error-budget applies"},
      {"quantize --input " + in + " --output " + (dir / "nodir" / "x.safetensors").string() +
           " --bits 4",
       "nodir"},
      {"inspect " + (dir / "garbage.safetensors").string(), "garbage.safetensors"},
      {"dequantize --input " + (dir / "missing.safetensors").string() + o, "missing.safetensors"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.args);
    const Run r = moqe_cli(dir, c.args);
    CHECK(r.status != 0);
    CHECK(r.status < 128);  // an exit, not a signal
    CHECK_THAT(r.err, Catch::StartsWith("moqe: error: ") && Catch::Contains(c.message));
    CHECK(count_lines(r.err) == 1);
    CHECK(slurp(out) == "previous output");
  }
  // Usage errors (from the argument parser) also exit non-zero.
  CHECK(moqe_cli(dir, "quantize --input " + in).status != 0);
  CHECK(moqe_cli(dir, "frobnicate").status != 0);
  CHECK(moqe_cli(dir, "").status != 0);
  CHECK(dir.entries() == std::vector<std::string>{"garbage.safetensors", "in", "out.safetensors"});
}

TEST_CASE("cli: moe-forward runs a layer and reports its routing", "[cli]") {
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.family = "deepseek_v3";
  s.hidden = 64;
  s.intermediate = 32;
  s.experts = 8;
  s.top_k = 3;
  s.n_group = 4;
  s.topk_group = 2;
  s.shared_intermediate = 32;
  s.shards = 2;
  write_synthetic_moe(dir.path() / "model", s);
  const int64_t t = 5, h = 64;
  std::vector<float> x(static_cast<size_t>(t * h));
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  {
    SafetensorsWriter w;
    w.add_values<float>("x", DType::kF32, {t, h}, x);
    w.write(dir / "x.safetensors");
  }
  const std::string common = "moe-forward --weights " + (dir.path() / "model").string() +
                             " --prefix model.layers.0.mlp --family deepseek_v3 --input " +
                             (dir / "x.safetensors").string();
  Run r = moqe_cli(dir, common + " --output " + (dir / "y.safetensors").string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  {  // An unknown MOQE_CPU_ISA is reported, not ignored silently; the run goes on uncapped.
    const Run bad = moqe_cli(dir, common + " --output " + (dir / "y2.safetensors").string(),
                             "MOQE_CPU_ISA=sse9");
    CHECK(bad.status == 0);
    CHECK(bad.err.find("MOQE_CPU_ISA=sse9 is not one of reference, avx2, avx512, avx512vnni") !=
          std::string::npos);
  }
  const Checkpoint out(dir / "y.safetensors");
  CHECK(out.info("y").shape == std::vector<int64_t>{t, h});
  CHECK(out.info("topk_ids").dtype == DType::kI32);
  CHECK(out.info("topk_ids").shape == std::vector<int64_t>{t, 3});
  CHECK(out.info("topk_weights").shape == std::vector<int64_t>{t, 3});
  // The same as the library's layer.
  const MoELayer layer =
      load_moe_layer(Checkpoint(dir.path() / "model"), "model.layers.0.mlp",
                     read_moe_config(dir.path() / "model" / "config.json", Family::kDeepSeekV3));
  std::vector<float> y(x.size());
  auto ws = layer.make_workspace(t);
  layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws);
  CHECK(out.to_float("y") == y);
  CHECK(out.to_float("topk_weights") == ws.routing.weights);

  struct Case {
    std::string args, message;
  };
  {
    SafetensorsWriter w;
    w.add_values<float>("x", DType::kF32, {t, 32}, std::span<const float>(x.data(), t * 32));
    w.write(dir / "x32.safetensors");
  }
  const std::string o = " --output " + (dir / "bad.safetensors").string();
  const std::string model = (dir.path() / "model").string();
  const std::vector<Case> cases = {
      {common + o + " --device cuda", "--device cuda"},
      {common + o + " --device tpu", "unknown --device 'tpu'"},
      {"moe-forward --weights " + model + " --prefix model.layers.0.mlp --family llama --input " +
           (dir / "x.safetensors").string() + o,
       "unknown --family 'llama'"},
      {"moe-forward --weights " + model +
           " --prefix model.layers.3.mlp --family deepseek_v3 --input " +
           (dir / "x.safetensors").string() + o,
       "missing tensor 'model.layers.3.mlp.gate.weight'"},
      {"moe-forward --weights " + model +
           " --prefix model.layers.0.mlp --family deepseek_v3 --input " +
           (dir / "x32.safetensors").string() + o,
       "tensor 'x' is F32 [5, 32], but the layer's hidden size is 64"},
      {"moe-forward --weights " + model +
           " --prefix model.layers.0.mlp --family deepseek_v3 --input " +
           (dir / "y.safetensors").string() + o,
       "no tensor 'x'"},
      {"moe-forward --weights " + model + " --config " + (dir / "none.json").string() +
           " --prefix model.layers.0.mlp --family deepseek_v3 --input " +
           (dir / "x.safetensors").string() + o,
       "none.json"},
  };
  // --numerics fast on a quantized copy: the library's layer with Numerics::kFast, not exact's.
  {
    const std::string q = (dir / "q.safetensors").string();
    Run qr = moqe_cli(
        dir, "quantize --quiet --bits 4 --group-size 32 --input " + model + " --output " + q);
    INFO(qr.err);
    REQUIRE(qr.status == 0);
    const std::string fast = common.substr(0, common.find(" --weights ")) + " --weights " + q +
                             " --config " + (dir.path() / "model" / "config.json").string() +
                             common.substr(common.find(" --prefix "));
    Run fr = moqe_cli(dir, fast + " --numerics fast --output " + (dir / "yf.safetensors").string());
    INFO(fr.err);
    REQUIRE(fr.status == 0);
    const MoeConfig mc = read_moe_config(dir.path() / "model" / "config.json", Family::kDeepSeekV3);
    LoadOptions lo;
    lo.numerics = Numerics::kFast;
    const MoELayer fl = load_moe_layer(Checkpoint(q), "model.layers.0.mlp", mc, lo);
    const MoELayer el = load_moe_layer(Checkpoint(q), "model.layers.0.mlp", mc);
    std::vector<float> yf(x.size()), ye(x.size());
    auto fws = fl.make_workspace(t);
    fl.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(yf.data(), t, h), fws);
    auto ews = el.make_workspace(t);
    el.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(ye.data(), t, h), ews);
    const Checkpoint out_fast(dir / "yf.safetensors");
    CHECK(out_fast.to_float("y") == yf);
    if (best_cpu_isa() >= CpuIsa::kAvx2) CHECK(yf != ye);  // fast mode ran (AVX2 only)
    CHECK(out_fast.metadata().at("moqe.numerics") == "fast");
  }
  const std::vector<Case> more = {
      {common + o + " --numerics quick", "unknown --numerics 'quick'"},
      {common + o + " --numerics fast --device cuda", "--numerics fast is a CPU option"},
  };
  for (const Case& c : more) {
    CAPTURE(c.args);
    const Run e = moqe_cli(dir, c.args);
    CHECK(e.status != 0);
    CHECK_THAT(e.err, Catch::StartsWith("moqe: error: ") && Catch::Contains(c.message));
    CHECK_FALSE(std::filesystem::exists(dir / "bad.safetensors"));
  }
  for (const Case& c : cases) {
    CAPTURE(c.args);
    const Run e = moqe_cli(dir, c.args);
    CHECK(e.status != 0);
    CHECK(e.status < 128);
    CHECK_THAT(e.err, Catch::StartsWith("moqe: error: ") && Catch::Contains(c.message));
    CHECK(count_lines(e.err) == 1);
    CHECK_FALSE(std::filesystem::exists(dir / "bad.safetensors"));
  }
}

TEST_CASE("cli: the width picks the default mode and method, and noisy results are named",
          "[cli]") {
  test::TempDir dir;
  SyntheticMoeSpec s = spec();
  s.shards = 1;
  write_synthetic_moe(dir.path() / "in", s);
  const std::string in = (dir.path() / "in").string();
  auto quantize = [&](const std::string& args) {
    return moqe_cli(dir, "quantize --input " + in + " --output " +
                             (dir / "q.safetensors").string() + " --report " +
                             (dir / "r.json").string() + " " + args);
  };
  Run r = quantize("--bits 3");
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("3 bits, mode asym (default), method search (default)"));
  CHECK_THAT(r.out, Catch::Contains("int3 asym"));
  auto report = nlohmann::json::parse(slurp(dir / "r.json"));
  for (const auto& t : report["tensors"]) {
    if (t.contains("bits")) CHECK(t["method"] == "search");
  }
  r = quantize("--bits 4");
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("4 bits, mode sym (default), method rtn (default)"));
  r = quantize("--bits 3 --mode sym --method rtn");
  REQUIRE(r.status == 0);
  CHECK_THAT(r.out, Catch::Contains("3 bits, mode sym, method rtn\n"));
  // 2-bit sym has three levels: the relative error passes 0.5 and the tool says so.
  r = quantize("--bits 2 --mode sym --method rtn --quiet");
  REQUIRE(r.status == 0);
  CHECK_THAT(r.err, Catch::Contains("moqe: warning: 6 quantized tensor(s) have a relative error of "
                                    "0.5 or more") &&
                        Catch::Contains("int2 sym"));
  r = quantize("--bits 2 --quiet");  // the default (asym, search) stays under it here
  REQUIRE(r.status == 0);
  CHECK(r.err.find("warning") == std::string::npos);
  r = quantize("--bits 3 --method lloyd");
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("unknown --method 'lloyd'; supported: auto, rtn, search, hqq"));
}
