// The `moqe` tool run as a user runs it: real files, real exit codes, one clear message on error,
// and no partial output file.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moqe/io/quantized_format.hpp"
#include "moqe/io/synthetic.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

struct Run {
  int status = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

Run moqe_cli(const test::TempDir& dir, const std::string& args) {
  const auto out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = std::string(MOQE_CLI_PATH) + " " + args + " >" + out.string() + " 2>" +
                          err.string() + " </dev/null";
  const int raw = std::system(cmd.c_str());
  Run r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  r.out = slurp(out);
  r.err = slurp(err);
  std::filesystem::remove(out);
  std::filesystem::remove(err);
  return r;
}

int count_lines(const std::string& s) {
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

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
