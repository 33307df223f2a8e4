// An interrupted or failing `moqe quantize` (SIGINT, SIGTERM, a file size limit standing in for a
// full disk) exits non-zero with a message, leaves the previous output byte for byte intact, and
// leaves no partial or temporary file.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "reliability/process_util.hpp"
#include "test_util.hpp"

using namespace moqe;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// A checkpoint that takes a while to quantize (adaptive group sizes try seven per matrix) and
// whose output is large enough that writing it takes a while too (a 48 MiB tensor is copied).
void write_slow_checkpoint(const fs::path& dir) {
  SyntheticMoeSpec s;
  s.hidden = 512;
  s.intermediate = 1024;
  s.experts = 8;
  write_synthetic_moe(dir, s);
  SafetensorsWriter big;
  big.add("model.embed_tokens.weight", DType::kU8, {48, 1 << 20},
          std::vector<std::byte>(size_t{48} << 20, std::byte{7}));
  big.write(dir / "embed.safetensors");
}

// A small, valid previous output at `out`.
std::string write_previous_output(const test::TempDir& dir, const fs::path& out) {
  SyntheticMoeSpec s;
  s.hidden = 64;
  s.intermediate = 64;
  s.experts = 2;
  write_synthetic_moe(dir / "small", s);
  test::CliProcess p({"quantize", "--input", (dir / "small").string(), "--output", out.string(),
                      "--bits", "4", "--quiet"},
                     dir / "logs" / "previous");
  const test::Outcome o = p.wait();
  INFO(o.err);
  REQUIRE((o.exited && o.code == 0));
  return test::read_text(out);
}

// `slow`: adaptive group sizes (seven quantizations per matrix) for a long quantizing phase.
std::vector<std::string> quantize_args(const test::TempDir& dir, const fs::path& out, bool slow) {
  return {"quantize",
          "--input",
          (dir / "in").string(),
          "--output",
          out.string(),
          "--bits",
          "4",
          "--group-size",
          slow ? "adaptive" : "128",
          "--report",
          (out.parent_path() / "report.json").string(),
          "--threads",
          "2"};
}

bool has_temp_file(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
  }
  return false;
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("an interrupted quantize keeps the previous output and leaves no temporary file",
          "[reliability][signals]") {
  test::TempDir dir;
  fs::create_directories(dir / "logs");
  fs::create_directories(dir / "out");
  const fs::path out = dir / "out" / "q.safetensors";
  const std::string previous = write_previous_output(dir, out);
  write_slow_checkpoint(dir / "in");

  SECTION("SIGINT while quantizing") {
    test::CliProcess p(quantize_args(dir, out, true), dir / "logs" / "sigint");
    // Once the input is mapped the handlers are installed and quantizing has begun; it lasts
    // seconds (adaptive group sizes) and writing starts only after it.
    const std::string input = (dir / "in" / "model.safetensors").string();
    REQUIRE(test::wait_until(
        [&] {
          return test::read_text(fmt::format("/proc/{}/maps", p.pid())).find(input) !=
                     std::string::npos ||
                 !p.running();
        },
        60s));
    REQUIRE(p.running());
    REQUIRE_FALSE(has_temp_file(out.parent_path()));
    p.signal(SIGINT);
    const test::Outcome o = p.wait();
    INFO(o.err);
    CHECK(o.exited);
    CHECK(o.code == 130);
    CHECK_THAT(o.err, Catch::Contains("interrupted (SIGINT)"));
  }
  SECTION("SIGTERM while the output is being written") {
    // The temporary file exists only while the output is written: signal as soon as it appears.
    bool caught = false;
    test::Outcome o;
    for (int attempt = 0; attempt < 3 && !caught; ++attempt) {
      test::CliProcess p(quantize_args(dir, out, false), dir / "logs" / "sigterm");
      caught = test::wait_until([&] { return has_temp_file(out.parent_path()) || !p.running(); },
                                120s) &&
               has_temp_file(out.parent_path());
      if (caught) p.signal(SIGTERM);
      o = p.wait();
      if (!caught) {  // it finished first: put the previous output back and try again
        std::ofstream(out, std::ios::binary) << previous;
        fs::remove(out.parent_path() / "report.json");
      }
    }
    REQUIRE(caught);
    INFO(o.err);
    CHECK(o.exited);
    CHECK(o.code == 143);
    CHECK_THAT(o.err, Catch::Contains("terminated (SIGTERM)"));
  }
  CHECK(test::read_text(out) == previous);
  CHECK(entries(out.parent_path()) == std::vector<std::string>{"q.safetensors"});
}

TEST_CASE("a full disk (file size limit) fails with a message and keeps the previous output",
          "[reliability][signals]") {
  // RLIMIT_FSIZE makes write() fail past 1 MiB, as a full disk would. The tool must ignore SIGXFSZ
  // itself (the child starts with the default action, which kills), report EFBIG and clean up.
  test::TempDir dir;
  fs::create_directories(dir / "logs");
  fs::create_directories(dir / "out");
  const fs::path out = dir / "out" / "q.safetensors";
  const std::string previous = write_previous_output(dir, out);
  REQUIRE(previous.size() < (1 << 20));
  SyntheticMoeSpec s;
  s.hidden = 256;
  s.intermediate = 512;
  s.experts = 4;
  write_synthetic_moe(dir / "in", s);

  test::CliProcess p({"quantize", "--input", (dir / "in").string(), "--output", out.string(),
                      "--bits", "8", "--quiet"},
                     dir / "logs" / "fsize", rlim_t{1} << 20);
  const test::Outcome o = p.wait();
  INFO(o.err);
  CHECK(o.exited);
  CHECK(o.code == 1);
  CHECK_THAT(o.err, Catch::Contains("moqe: error:") && Catch::Contains("File too large") &&
                        Catch::Contains(out.string()));
  CHECK(test::read_text(out) == previous);
  CHECK(entries(out.parent_path()) == std::vector<std::string>{"q.safetensors"});
}
