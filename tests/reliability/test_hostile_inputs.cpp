// Hostile checkpoints and configs: the inputs the fuzzers (fuzz/) found or aim at, as regression
// tests. Each must end in a moqe::Error that names the file and the problem: never a crash, a
// hang, undefined behaviour or an unbounded allocation.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <fstream>
#include <future>
#include <limits>
#include <string>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"
#include "moqe/quant/quantized_matrix.hpp"
#include "test_util.hpp"

using namespace moqe;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no moqe::Error thrown>";
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f << bytes;
  REQUIRE(f.good());
}

// A safetensors file with this raw JSON header and no data.
void write_header(const fs::path& p, const std::string& header) {
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  write_bytes(p, len + header);
}

std::string nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// Runs f, which may block opening `fifo`; after `timeout` a writer opens the FIFO so that a
// blocked open returns and the test fails instead of hanging. Returns f's moqe::Error message and
// whether f finished on its own.
template <class F>
std::pair<std::string, bool> without_hanging(const fs::path& fifo, F&& f) {
  auto result = std::async(std::launch::async, [&] { return error_of(f); });
  const bool on_time = result.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  // A blocked open returns once a writer opens the other end; closing it then gives EOF.
  bool unblocked = on_time;
  while (!unblocked) {
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);  // ENXIO until a reader waits
    if (fd >= 0) ::close(fd);
    unblocked = result.wait_for(std::chrono::milliseconds(10)) == std::future_status::ready;
  }
  return {result.get(), on_time};
}

SyntheticMoeSpec tiny(const std::string& family) {
  SyntheticMoeSpec s;
  s.family = family;
  s.hidden = 32;
  s.intermediate = 32;
  s.experts = 4;
  s.top_k = family == "switch" ? 1 : 2;
  s.dtype = DType::kF32;
  return s;
}

}  // namespace

TEST_CASE("deeply nested JSON in a header is an error, not a stack overflow",
          "[reliability][hostile]") {
  // A million levels fit the 100 MB header limit; printing the value recursively overflowed the
  // stack (nlohmann's dump()), so messages now print a bounded excerpt.
  test::TempDir dir;
  const fs::path p = dir / "deep.safetensors";
  SECTION("in a shape") {
    write_header(
        p, R"({"a":{"dtype":"U8","shape":)" + nested(1'000'000) + R"(,"data_offsets":[0,0]}})");
    CHECK_THAT(error_of([&] { SafetensorsFile f(p); }),
               Contains(p.string()) && Contains("tensor 'a'") && Contains("[[[[...]]]]"));
  }
  SECTION("in data_offsets") {
    write_header(p, R"({"a":{"dtype":"U8","shape":[0],"data_offsets":)" + nested(1'000'000) + "}}");
    CHECK_THAT(error_of([&] { SafetensorsFile f(p); }),
               Contains(p.string()) && Contains("data_offsets"));
  }
  SECTION("in a config value") {
    const fs::path c = dir / "config.json";
    write_bytes(c, R"({"num_local_experts":)" + nested(1'000'000) + "}");
    CHECK_THAT(error_of([&] { read_moe_config(c, Family::kMixtral); }),
               Contains(c.string()) && Contains("num_local_experts") && Contains("[[[[...]]]]"));
  }
}

TEST_CASE("TensorInfo::numel checks its shape", "[reliability][hostile]") {
  TensorInfo t;
  t.name = "w";
  t.shape = {int64_t{1} << 32, int64_t{1} << 32};
  CHECK_THAT(error_of([&] { (void)t.numel(); }), Contains("tensor 'w'") && Contains("2^63"));
  t.shape = {4, -1};
  CHECK_THAT(error_of([&] { (void)t.numel(); }), Contains("negative"));
  t.shape = {int64_t{1} << 31, int64_t{1} << 31};
  CHECK(t.numel() == int64_t{1} << 62);
  t.shape = {};
  CHECK(t.numel() == 1);
}

TEST_CASE("a FIFO posing as a checkpoint file is refused without blocking",
          "[reliability][hostile]") {
  // Opening a FIFO for reading waits for a writer: a hostile checkpoint directory could hang
  // every process that loads it.
  test::TempDir dir;
  const fs::path fifo = dir / "fifo.safetensors";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  SECTION("as a shard named by the index") {
    write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"x":"fifo.safetensors"}})");
    const auto [message, on_time] = without_hanging(fifo, [&] { Checkpoint c(dir.path()); });
    CHECK(on_time);
    CHECK_THAT(message, Contains("shard 'fifo.safetensors'") && Contains("not a regular file"));
  }
  SECTION("opened directly") {
    const auto [message, on_time] = without_hanging(fifo, [&] { SafetensorsFile f(fifo); });
    CHECK(on_time);
    CHECK_THAT(message, Contains(fifo.string()) && Contains("not a regular file"));
  }
  SECTION("as the index or the config") {
    const fs::path index = dir / "model.safetensors.index.json";
    const fs::path config = dir / "config.json";
    REQUIRE(::mkfifo(index.c_str(), 0600) == 0);
    REQUIRE(::mkfifo(config.c_str(), 0600) == 0);
    const auto [m1, t1] = without_hanging(index, [&] { Checkpoint c(dir.path()); });
    CHECK(t1);
    CHECK_THAT(m1, Contains(index.string()) && Contains("not a regular file"));
    const auto [m2, t2] = without_hanging(config, [&] { read_moe_config(config, Family::kOlmoe); });
    CHECK(t2);
    CHECK_THAT(m2, Contains(config.string()) && Contains("not a regular file"));
  }
}

TEST_CASE("index and config files past their size limits are refused before reading",
          "[reliability][hostile]") {
  // Sparse files: the size is what counts, no disk is used.
  test::TempDir dir;
  const fs::path index = dir / "model.safetensors.index.json";
  write_bytes(index, "{}");
  fs::resize_file(index, Checkpoint::kMaxIndexBytes + 1);
  CHECK_THAT(error_of([&] { Checkpoint c(dir.path()); }),
             Contains(index.string()) && Contains("exceeds the limit"));
  const fs::path config = dir / "config.json";
  write_bytes(config, "{}");
  fs::resize_file(config, 64 << 20);
  CHECK_THAT(error_of([&] { read_moe_config(config, Family::kMixtral); }),
             Contains(config.string()) && Contains("exceeds the limit"));
}

TEST_CASE("a shard name with a NUL character is refused", "[reliability][hostile]") {
  // The system would open "model.safetensors": another file than the one named.
  test::TempDir dir;
  SafetensorsWriter w;
  w.add_values<float>("x", DType::kF32, {1}, std::vector<float>{1.0f});
  w.write(dir / "model.safetensors");
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map":{"x":"model.safetensors\u0000.evil"}})");
  CHECK_THAT(error_of([&] { Checkpoint c(dir.path()); }),
             Contains("tensor 'x'") && Contains("NUL"));
}

TEST_CASE("quantized shapes whose sizes overflow are errors, not undefined behaviour",
          "[reliability][hostile]") {
  // Found by fuzz_quantized / fuzz_safetensors (UBSan): cols * bits overflowed int64 in
  // packed_row_bytes, and a 2^62-column matrix with no stored codes was accepted.
  const std::string what = "q.safetensors: tensor 'w'";
  auto scheme = [](const std::string& shape, const std::string& bits = "4") {
    return R"({"bits":)" + bits + R"(,"group_size":0,"mode":"sym","shape":)" + shape + "}";
  };
  CHECK_THAT(error_of([&] { parse_scheme_json(scheme("[2,4611686018427387904]"), what); }),
             Contains(what) && Contains("too large"));
  CHECK_THAT(error_of([&] { parse_scheme_json(scheme("[2305843009213693952,32]"), what); }),
             Contains("too large"));
  // Found by fuzz_safetensors (UBSan, 2026-11-22): with no rows the product rows x cols x 8 is 0,
  // but one row's bits (cols x 8) still overflowed in packed_row_bytes.
  CHECK_THAT(error_of([&] { parse_scheme_json(scheme("[0,4611686018427387904]"), what); }),
             Contains("too large"));
  // 2^32 + 4 used to be truncated to 4 bits and accepted.
  CHECK_THAT(error_of([&] { parse_scheme_json(scheme("[1,32]", "4294967300"), what); }),
             Contains("unsupported bits 4294967300"));
  const StoredScheme ok = parse_scheme_json(scheme("[3,64]"), what);
  CHECK((ok.rows == 3 && ok.cols == 64 && ok.scheme.bits == 4));

  QuantScheme s;
  s.bits = 4;
  s.group_size = kPerChannel;
  CHECK_THAT(error_of([&] {
               QuantizedMatrix::from_parts(2, int64_t{1} << 62, s, {}, {1.0f, 1.0f}, {}, what);
             }),
             Contains("too large"));
}

TEST_CASE("a greedy DeepSeek-V2 config may carry any n_group", "[reliability][hostile]") {
  // Found by auditing fuzz_config's reach: the router sized group buffers by n_group and divided
  // by it even when routing greedily, which ignores groups (n_group 0: division by zero;
  // negative: std::length_error). Now the value is ignored, as transformers does.
  test::TempDir dir;
  write_synthetic_moe(dir.path(), tiny("deepseek_v2"));
  const Checkpoint ckpt(dir.path());
  auto run = [&](const std::string& n_group) {
    write_bytes(dir / "config.json",
                R"({"n_routed_experts":4,"num_experts_per_tok":2,"n_shared_experts":0,)"
                R"("topk_method":"greedy","n_group":)" +
                    n_group + "}");
    const MoeConfig c = read_moe_config(dir / "config.json", Family::kDeepSeekV2);
    const MoELayer layer = load_moe_layer(ckpt, "model.layers.0.mlp", c);
    std::vector<float> x(5 * 32), y(x.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
    MoELayer::Workspace ws = layer.make_workspace(5);
    layer.run(MatrixView<const float>(x.data(), 5, 32), MatrixView<float>(y.data(), 5, 32), ws,
              {1, {}, {}, 0, {}});
    return std::make_pair(y, ws.routing.ids);
  };
  const auto reference = run("1");
  CHECK(run("0") == reference);
  CHECK(run("-3") == reference);
  CHECK(run("1000000000000") == reference);
}

TEST_CASE("non-finite or huge scaling and capacity factors", "[reliability][hostile]") {
  test::TempDir dir;
  const fs::path c = dir / "config.json";
  // nlohmann refuses 1e999 itself; 1e300 is a double but no float.
  write_bytes(c, R"({"n_routed_experts":4,"num_experts_per_tok":2,"routed_scaling_factor":1e999})");
  CHECK_THAT(error_of([&] { read_moe_config(c, Family::kDeepSeekV3); }),
             Contains(c.string()) && Contains("1e999"));
  for (Family f : {Family::kDeepSeekV2, Family::kDeepSeekV3}) {
    write_bytes(c,
                R"({"n_routed_experts":4,"num_experts_per_tok":2,"routed_scaling_factor":-1e300})");
    CHECK_THAT(error_of([&] { read_moe_config(c, f); }),
               Contains(c.string()) &&
                   Contains("'routed_scaling_factor' = -1e+300 is not a finite float"));
  }

  RouterConfig rc;
  rc.num_experts = 4;
  rc.top_k = 2;
  for (double f : {std::nan(""), std::numeric_limits<double>::infinity(), -1.0}) {
    rc.capacity_factor = f;
    CHECK_THAT(check_router_config(rc), Contains("capacity_factor"));
  }
  // Huge but finite: every slot fits (the capacity saturates instead of overflowing int64).
  rc.capacity_factor = 1e300;
  CHECK(check_router_config(rc).empty());
  const Router r(rc, std::vector<float>(4 * 2, 0.5f), 2);
  Routing out;
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};
  r.route(MatrixView<const float>(x.data(), 3, 2), out);
  for (uint8_t k : out.kept) CHECK(k == 1);
}

TEST_CASE("a config with more experts than the checkpoint holds fails at once",
          "[reliability][hostile]") {
  // Found by fuzz_config: num_local_experts 18446551615 made the loader plan three tensor names
  // per expert (minutes) before noticing the first one missing. The loader now walks the
  // checkpoint's names instead, and the router's shape names the mismatch.
  test::TempDir dir;
  for (const char* family : {"mixtral", "switch"}) {
    CAPTURE(family);
    const fs::path d = dir / family;
    write_synthetic_moe(d, tiny(family));
    const Checkpoint ckpt(d);
    const std::string key = std::string(family) == "switch" ? "num_experts" : "num_local_experts";
    write_bytes(d / "config.json", R"({")" + key + R"(":18446551615,"num_experts_per_tok":2})");
    const MoeConfig c = read_moe_config(d / "config.json", *parse_family(family));
    const std::string e =
        error_of([&] { load_moe_layer(ckpt, synthetic_moe_prefix(tiny(family)), c); });
    CHECK_THAT(e, Contains("has shape [4, 32]") && Contains("config has 18446551615 experts"));
  }
}
