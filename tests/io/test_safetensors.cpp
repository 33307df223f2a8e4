#include <sys/resource.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using Catch::Contains;
using moqe::DType;
using moqe::SafetensorsFile;
using moqe::SafetensorsWriter;

// A fresh directory under the system temp dir, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("moqe-io-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from a raw header and data; `n` overrides the stored header length.
void write_raw(const fs::path& p, const std::string& header, const std::string& data = {},
               std::optional<uint64_t> n = std::nullopt) {
  write_file(p, le64(n.value_or(header.size())) + header + data);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moqe::Error& e) {
    return e.what();
  }
  return "<no moqe::Error thrown>";
}

std::string open_error(const fs::path& p) {
  return error_of([&] { SafetensorsFile f(p); });
}

std::vector<std::byte> pattern(size_t n, int seed) {
  std::vector<std::byte> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<std::byte>((i * 37 + seed * 11 + 5) & 0xff);
  return b;
}

std::string str(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

uint64_t stored_header_length(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  unsigned char b[8] = {};
  in.read(reinterpret_cast<char*>(b), 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  return n;
}

const DType kAllTypes[] = {
    DType::kBool, DType::kU8,  DType::kI8,  DType::kF8_E5M2, DType::kF8_E4M3, DType::kF8_E8M0,
    DType::kI16,  DType::kU16, DType::kF16, DType::kBF16,    DType::kI32,     DType::kU32,
    DType::kF32,  DType::kC64, DType::kF64, DType::kI64,     DType::kU64,
};

}  // namespace

TEST_CASE("every dtype round-trips through the writer and reader", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "all.safetensors";
  SafetensorsWriter w;
  int seed = 0;
  for (DType t : kAllTypes) {
    // Odd element counts, so that only the layout order keeps wider types aligned.
    const std::vector<int64_t> shape = {3, 1 + seed % 3};
    const size_t n = static_cast<size_t>(shape[0] * shape[1]) * moqe::dtype_size(t);
    w.add("t." + std::string(moqe::dtype_name(t)), t, shape, pattern(n, seed++));
  }
  w.set_metadata("format", "pt");
  w.set_metadata("moqe.note", "h\u00e9llo \"quoted\"");
  REQUIRE(w.size() == std::size(kAllTypes));
  REQUIRE(w.contains("t.BF16"));
  REQUIRE_FALSE(w.contains("t.F4"));
  w.write(p);

  const uint64_t n = stored_header_length(p);
  CHECK((8 + n) % 8 == 0);

  const SafetensorsFile f(p);
  CHECK(f.path() == p);
  REQUIRE(f.tensors().size() == std::size(kAllTypes));
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"},
                                                           {"moqe.note", "h\u00e9llo \"quoted\""}});
  seed = 0;
  for (DType t : kAllTypes) {
    const std::string name = "t." + std::string(moqe::dtype_name(t));
    REQUIRE(f.contains(name));
    const moqe::TensorInfo& info = f.info(name);
    CHECK(info.name == name);
    CHECK(info.dtype == t);
    CHECK(info.shape == std::vector<int64_t>{3, 1 + seed % 3});
    CHECK(info.begin % moqe::dtype_size(t) == 0);
    CHECK(str(f.bytes(name)) == str(pattern(info.nbytes(), seed)));
    CHECK(info.nbytes() == static_cast<uint64_t>(info.numel()) * moqe::dtype_size(t));
    ++seed;
  }
  // File order: non-increasing element size, then by name.
  for (size_t i = 1; i < f.tensors().size(); ++i) {
    const auto& a = f.tensors()[i - 1];
    const auto& b = f.tensors()[i];
    CHECK(a.end == b.begin);
    const size_t sa = moqe::dtype_size(a.dtype), sb = moqe::dtype_size(b.dtype);
    CHECK((sa > sb || (sa == sb && a.name < b.name)));
  }
  CHECK(dir_entries(dir.path) == std::vector<std::string>{"all.safetensors"});
}

TEST_CASE("writer and reader agree on values", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "v.safetensors";
  const std::vector<float> values = {1.0f, -2.5f, 3.25f, 1e-3f, 0.0f, 65504.0f};
  const std::vector<uint16_t> halves = {0x3c00, 0xc000};
  SafetensorsWriter w;
  w.add_values<float>("w", DType::kF32, {2, 3}, values);
  w.add_values<uint16_t>("h", DType::kF16, {2}, halves);
  const std::vector<std::byte> borrowed = pattern(5, 9);
  w.add_view("borrowed", DType::kU8, {5}, borrowed);
  w.write(p);

  const SafetensorsFile f(p);
  CHECK(f.to_float("w") == values);
  CHECK(f.to_float("h") == std::vector<float>{1.0f, -2.0f});
  CHECK(str(f.bytes("borrowed")) == str(borrowed));
  CHECK(f.info("w").describe() == "F32 [2, 3]");
  std::vector<float> out(6);
  f.to_float(f.info("w"), out);
  CHECK(out == values);
  std::vector<float> wrong(5);
  CHECK_THAT(error_of([&] { f.to_float(f.info("w"), wrong); }), Contains("'w'"));
  CHECK(moqe::shape_to_string(std::vector<int64_t>{}) == "[]");
  CHECK(moqe::shape_to_string(std::vector<int64_t>{14336, 4096}) == "[14336, 4096]");
}

TEST_CASE("zero-size and rank-0 tensors", "[io][safetensors]") {
  TempDir dir;
  SECTION("written and read back") {
    const fs::path p = dir / "z.safetensors";
    SafetensorsWriter w;
    w.add("empty", DType::kF32, {0, 4}, {});
    w.add_values<double>("scalar", DType::kF64, {}, std::vector<double>{2.5});
    w.add("also_empty", DType::kBF16, {3, 0}, {});
    w.write(p);
    const SafetensorsFile f(p);
    REQUIRE(f.tensors().size() == 3);
    CHECK(f.info("empty").numel() == 0);
    CHECK(f.info("empty").nbytes() == 0);
    CHECK(f.bytes("empty").empty());
    CHECK(f.to_float("empty").empty());
    CHECK(f.info("scalar").shape.empty());
    CHECK(f.info("scalar").numel() == 1);
    CHECK(f.to_float("scalar") == std::vector<float>{2.5f});
    CHECK(f.info("also_empty").describe() == "BF16 [3, 0]");
  }
  SECTION("hand-written, zero-size tensors sharing offsets") {
    const fs::path p = dir / "z2.safetensors";
    write_raw(p,
              R"({"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
              R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("c":{"dtype":"I8","shape":[2,0,3],"data_offsets":[4,4]},)"
              R"("d":{"dtype":"I16","shape":[],"data_offsets":[4,6]}})",
              std::string("abcd\x01\x80", 6));
    const SafetensorsFile f(p);
    REQUIRE(f.tensors().size() == 4);
    CHECK(f.tensors().front().name == "a");
    CHECK(f.tensors().back().name == "d");
    CHECK(f.to_float("d") == std::vector<float>{-32767.0f});
  }
  SECTION("only zero-size tensors: a 0-byte buffer") {
    const fs::path p = dir / "z3.safetensors";
    write_raw(p, R"({"e":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}})");
    const SafetensorsFile f(p);
    CHECK(f.tensors().size() == 1);
  }
}

TEST_CASE("a file without tensors", "[io][safetensors]") {
  TempDir dir;
  SECTION("written by the writer") {
    const fs::path p = dir / "none.safetensors";
    SafetensorsWriter w;
    w.write(p);
    const SafetensorsFile f(p);
    CHECK(f.tensors().empty());
    CHECK(f.metadata().empty());
    CHECK(fs::file_size(p) % 8 == 0);
  }
  SECTION("with metadata only") {
    const fs::path p = dir / "meta.safetensors";
    SafetensorsWriter w;
    w.set_metadata("k", "v1");
    w.set_metadata("k", "v2");
    w.write(p);
    const SafetensorsFile f(p);
    CHECK(f.tensors().empty());
    CHECK(f.metadata().at("k") == "v2");
  }
  SECTION("hand-written, with surrounding whitespace") {
    const fs::path p = dir / "ws.safetensors";
    write_raw(p, " \n\t{ \"__metadata__\" : {\"a\":\"b\"} }   \n ");
    const SafetensorsFile f(p);
    CHECK(f.tensors().empty());
    CHECK(f.metadata().at("a") == "b");
  }
}

TEST_CASE("unaligned data is read correctly", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "unaligned.safetensors";
  const float values[3] = {1.5f, -1024.25f, 7e-5f};
  const uint16_t halves[2] = {0x3c00, 0x0001};
  std::string data(sizeof values + sizeof halves, '\0');
  std::memcpy(data.data(), values, sizeof values);
  std::memcpy(data.data() + sizeof values, halves, sizeof halves);
  std::string header = R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                       R"("y":{"dtype":"F16","shape":[2],"data_offsets":[12,16]}})";
  if ((8 + header.size()) % 2 == 0) header += ' ';  // data starts at an odd offset
  write_raw(p, header, data);

  const SafetensorsFile f(p);
  const auto b = f.bytes("x");
  CHECK(reinterpret_cast<uintptr_t>(b.data()) % 2 == 1);
  CHECK(f.to_float("x") == std::vector<float>(std::begin(values), std::end(values)));
  CHECK(f.to_float("y") == std::vector<float>{1.0f, 5.9604644775390625e-8f});
}

TEST_CASE("reader rejects malformed files", "[io][safetensors]") {
  TempDir dir;
  const std::string kGood = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string kData(8, '\x01');

  SECTION("empty file") {
    const fs::path p = dir / "empty.safetensors";
    write_file(p, "");
    CHECK_THAT(open_error(p), Contains("empty.safetensors") && Contains("too small"));
  }
  SECTION("file shorter than 8 bytes") {
    const fs::path p = dir / "short.safetensors";
    write_file(p, std::string("\x02\0\0\0\0", 5));
    CHECK_THAT(open_error(p), Contains("short.safetensors") && Contains("too small"));
  }
  SECTION("missing file") {
    CHECK_THAT(open_error(dir / "missing.safetensors"), Contains("missing.safetensors"));
  }
  SECTION("a directory") {
    fs::create_directory(dir / "d.safetensors");
    CHECK_THAT(open_error(dir / "d.safetensors"),
               Contains("d.safetensors") && Contains("not a regular file"));
  }
  SECTION("header length over the limit") {
    const fs::path p = dir / "huge.safetensors";
    write_raw(p, kGood, kData, SafetensorsFile::kMaxHeaderBytes + 1);
    CHECK_THAT(open_error(p), Contains("huge.safetensors") && Contains("100000000"));
  }
  SECTION("header length past the end of the file") {
    const fs::path p = dir / "past.safetensors";
    write_raw(p, kGood, kData, kGood.size() + kData.size() + 1);
    CHECK_THAT(open_error(p), Contains("past.safetensors") && Contains("past the end"));
  }
  SECTION("header length 0") {
    const fs::path p = dir / "zero.safetensors";
    write_raw(p, "", kData);
    CHECK_THAT(open_error(p), Contains("zero.safetensors") && Contains("header length is 0"));
  }
  SECTION("invalid UTF-8") {
    const fs::path p = dir / "utf8.safetensors";
    write_raw(p, "{\"a\xc3\x28\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", kData);
    CHECK_THAT(open_error(p), Contains("utf8.safetensors") && Contains("UTF-8"));
  }
  SECTION("overlong UTF-8") {
    const fs::path p = dir / "overlong.safetensors";
    write_raw(p, "{\"a\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", kData);
    CHECK_THAT(open_error(p), Contains("overlong.safetensors") && Contains("UTF-8"));
  }
  SECTION("NUL byte in the header") {
    const fs::path p = dir / "nul.safetensors";
    write_raw(p, kGood + std::string(1, '\0'), kData);
    CHECK_THAT(open_error(p), Contains("nul.safetensors") && Contains("NUL"));
  }
  SECTION("invalid JSON") {
    const fs::path p = dir / "json.safetensors";
    write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", kData);
    CHECK_THAT(open_error(p), Contains("json.safetensors") && Contains("not valid JSON"));
  }
  SECTION("header not an object") {
    const fs::path p = dir / "array.safetensors";
    write_raw(p, "[1, 2]", "");
    CHECK_THAT(open_error(p), Contains("array.safetensors") && Contains("not an object"));
  }
  SECTION("unknown dtype") {
    const fs::path p = dir / "dtype.safetensors";
    write_raw(p, R"({"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", kData);
    CHECK_THAT(open_error(p),
               Contains("dtype.safetensors") && Contains("'a'") && Contains("unknown dtype 'F12'"));
  }
  SECTION("entry not an object") {
    const fs::path p = dir / "entry.safetensors";
    write_raw(p, R"({"a":[0, 8]})", kData);
    CHECK_THAT(open_error(p), Contains("entry.safetensors") && Contains("'a'"));
  }
  SECTION("missing or mistyped fields") {
    const std::pair<const char*, const char*> cases[] = {
        {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", "missing \"dtype\""},
        {R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", "missing \"shape\""},
        {R"({"a":{"dtype":"F32","shape":[2]}})", "missing \"data_offsets\""},
        {R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", "not a string"},
        {R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", "not an array"},
        {R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", "not a non-negative"},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", "[begin, end]"},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", "[begin, end]"},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":{"b":0}}})", "[begin, end]"},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", "non-negative"},
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-1,8]}})", "non-negative"},
    };
    int i = 0;
    for (const auto& [header, message] : cases) {
      const fs::path p = dir / ("field" + std::to_string(i++) + ".safetensors");
      write_raw(p, header, kData);
      CHECK_THAT(open_error(p),
                 Contains(p.filename().string()) && Contains("'a'") && Contains(message));
    }
  }
  SECTION("negative dimension") {
    const fs::path p = dir / "neg.safetensors";
    write_raw(p, R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", kData);
    CHECK_THAT(open_error(p),
               Contains("neg.safetensors") && Contains("'a'") && Contains("non-negative"));
  }
  SECTION("non-string metadata value") {
    const fs::path p = dir / "meta.safetensors";
    write_raw(p, R"({"__metadata__":{"k":"v","n":1},)" + kGood.substr(1), kData);
    CHECK_THAT(open_error(p),
               Contains("meta.safetensors") && Contains("'n'") && Contains("only strings"));
  }
  SECTION("metadata not an object") {
    const fs::path p = dir / "meta2.safetensors";
    write_raw(p, R"({"__metadata__":["k"],)" + kGood.substr(1), kData);
    CHECK_THAT(open_error(p), Contains("meta2.safetensors") && Contains("__metadata__"));
  }
  SECTION("begin after end") {
    const fs::path p = dir / "order.safetensors";
    write_raw(p, R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", kData);
    CHECK_THAT(open_error(p),
               Contains("order.safetensors") && Contains("'a'") && Contains("[8, 0]"));
  }
  SECTION("byte count does not match dtype and shape") {
    const fs::path p = dir / "model.safetensors";
    write_raw(p, R"({"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
              std::string(12, '\0'));
    CHECK_THAT(open_error(p),
               Contains("model.safetensors: tensor 'a.weight': data_offsets [0, 12] hold 12 "
                        "bytes but F32 [2, 2] needs 16"));
  }
  SECTION("size overflow") {
    const fs::path p = dir / "overflow.safetensors";
    write_raw(p, R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})");
    CHECK_THAT(open_error(p),
               Contains("overflow.safetensors") && Contains("'a'") && Contains("overflow"));
  }
  SECTION("gap between tensors") {
    const fs::path p = dir / "gap.safetensors";
    write_raw(p,
              R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
              kData);
    CHECK_THAT(open_error(p), Contains("gap.safetensors") && Contains("'b'") && Contains("gap"));
  }
  SECTION("gap before the first tensor") {
    const fs::path p = dir / "gap0.safetensors";
    write_raw(p, R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", kData);
    CHECK_THAT(open_error(p), Contains("gap0.safetensors") && Contains("'a'") && Contains("gap"));
  }
  SECTION("overlapping tensors") {
    const fs::path p = dir / "overlap.safetensors";
    write_raw(p,
              R"({"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},)"
              R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
              kData);
    CHECK_THAT(open_error(p), Contains("overlap.safetensors") && Contains("'a'") &&
                                  Contains("'b'") && Contains("overlap"));
  }
  SECTION("tensor data past the end of the file") {
    const fs::path p = dir / "trunc.safetensors";
    write_raw(p, kGood, kData.substr(0, 6));
    CHECK_THAT(open_error(p),
               Contains("trunc.safetensors") && Contains("'a'") && Contains("past the end"));
  }
  SECTION("trailing bytes after the last tensor") {
    const fs::path p = dir / "trailing.safetensors";
    write_raw(p, kGood, kData + "xyz");
    CHECK_THAT(open_error(p), Contains("trailing.safetensors") && Contains("3 trailing bytes"));
  }
  SECTION("trailing bytes without tensors") {
    const fs::path p = dir / "trailing0.safetensors";
    write_raw(p, "{}", "x");
    CHECK_THAT(open_error(p), Contains("trailing0.safetensors") && Contains("trailing"));
  }
  SECTION("duplicate tensor names") {
    const fs::path p = dir / "dup.safetensors";
    write_raw(p,
              R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
              kData);
    CHECK_THAT(open_error(p),
               Contains("dup.safetensors") && Contains("'a'") && Contains("appears twice"));
  }
  SECTION("duplicate key inside an entry") {
    const fs::path p = dir / "dupkey.safetensors";
    write_raw(p, R"({"a":{"dtype":"U8","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kData);
    CHECK_THAT(open_error(p), Contains("dupkey.safetensors") && Contains("duplicate key"));
  }
}

TEST_CASE("lookups name the file and tensor", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "look.safetensors";
  SafetensorsWriter w;
  w.add("c", DType::kC64, {1}, pattern(8, 1));
  w.add("e", DType::kF8_E8M0, {2}, pattern(2, 1));
  w.write(p);
  const SafetensorsFile f(p);
  CHECK_FALSE(f.contains("nope"));
  CHECK_THAT(error_of([&] { (void)f.info("nope"); }),
             Contains("look.safetensors") && Contains("'nope'"));
  CHECK_THAT(error_of([&] { (void)f.bytes("nope"); }), Contains("'nope'"));
  CHECK_THAT(error_of([&] { (void)f.to_float("c"); }),
             Contains("look.safetensors") && Contains("'c'") && Contains("C64"));
  CHECK_THAT(error_of([&] { (void)f.to_float("e"); }),
             Contains("look.safetensors") && Contains("'e'") && Contains("F8_E8M0"));
  moqe::TensorInfo foreign = f.info("c");
  foreign.begin = 100;
  foreign.end = 108;
  CHECK_THAT(error_of([&] { (void)f.bytes(foreign); }), Contains("look.safetensors"));
}

TEST_CASE("SafetensorsFile can be moved", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "m.safetensors";
  SafetensorsWriter w;
  w.add_values<float>("x", DType::kF32, {2}, std::vector<float>{1, 2});
  w.write(p);
  SafetensorsFile a(p);
  SafetensorsFile b(std::move(a));
  CHECK(b.to_float("x") == std::vector<float>{1, 2});
  SafetensorsFile c(p);
  c = std::move(b);
  CHECK(c.to_float("x") == std::vector<float>{1, 2});
}

TEST_CASE("writer validates tensors on add", "[io][safetensors]") {
  SafetensorsWriter w;
  w.add("a", DType::kF32, {2}, pattern(8, 0));
  CHECK_THAT(error_of([&] { w.add("a", DType::kF32, {2}, pattern(8, 0)); }),
             Contains("'a'") && Contains("already"));
  CHECK_THAT(
      error_of([&] {
        w.add("b", DType::kF16, {2, 3}, pattern(10, 0));
      }),
      Contains("'b'") && Contains("10 bytes") && Contains("F16 [2, 3]") && Contains("needs 12"));
  CHECK_THAT(error_of([&] {
               w.add_view("c", DType::kU8, {-1, 2}, {});
             }),
             Contains("'c'") && Contains("negative"));
  CHECK_THAT(error_of([&] { w.add("__metadata__", DType::kU8, {0}, {}); }),
             Contains("__metadata__"));
  CHECK_THAT(error_of([&] {
               w.add("d", DType::kU64, {int64_t{1} << 62, 8}, {});
             }),
             Contains("'d'") && Contains("overflow"));
  CHECK(w.size() == 1);
  CHECK_FALSE(w.contains("b"));
}

TEST_CASE("a failed write leaves the target untouched and no temporary file", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "keep.safetensors";
  SafetensorsWriter good;
  good.add_values<float>("x", DType::kF32, {3}, std::vector<float>{1, 2, 3});
  good.write(p);
  const auto size_before = fs::file_size(p);

  SECTION("directory does not exist") {
    const fs::path missing = dir / "no-such-dir" / "out.safetensors";
    CHECK_THAT(error_of([&] { good.write(missing); }), Contains(missing.string()));
    CHECK_FALSE(fs::exists(missing));
  }
  SECTION("target is a non-empty directory") {
    const fs::path target = dir / "isdir.safetensors";
    fs::create_directory(target);
    write_file(target / "inside", "x");
    CHECK_THAT(error_of([&] { good.write(target); }), Contains(target.string()));
    CHECK(fs::is_directory(target));
    CHECK(fs::exists(target / "inside"));
    fs::remove_all(target);
  }
  SECTION("header cannot be encoded") {
    SafetensorsWriter bad;
    bad.add("bad\xff", DType::kU8, {1}, pattern(1, 0));
    CHECK_THAT(error_of([&] { bad.write(p); }), Contains(p.string()));
  }
  SECTION("a write fails half-way over the existing target") {
    // A file size limit makes write() fail with EFBIG after the temporary file has been created.
    SafetensorsWriter big;
    big.add("y", DType::kU8, {4096}, pattern(4096, 3));
    struct rlimit old_limit {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
    struct rlimit limit = old_limit;
    limit.rlim_cur = 1024;
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
    const std::string message = error_of([&] { big.write(p); });
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    std::signal(SIGXFSZ, old_handler);
    CHECK_THAT(message, Contains(p.string()) && Contains("write"));
  }
  SECTION("rejected add before writing") {
    SafetensorsWriter bad;
    bad.add("y", DType::kU8, {1}, pattern(1, 0));
    CHECK_THROWS_AS(bad.add("y", DType::kU8, {1}, pattern(1, 0)), moqe::Error);
    CHECK_THROWS_AS(bad.add("z", DType::kF32, {2}, pattern(7, 0)), moqe::Error);
  }

  CHECK(fs::file_size(p) == size_before);
  const SafetensorsFile f(p);
  CHECK(f.to_float("x") == std::vector<float>{1, 2, 3});
  CHECK(dir_entries(dir.path) == std::vector<std::string>{"keep.safetensors"});
}

TEST_CASE("write replaces an existing file", "[io][safetensors]") {
  TempDir dir;
  const fs::path p = dir / "r.safetensors";
  SafetensorsWriter a;
  a.add_values<float>("x", DType::kF32, {1}, std::vector<float>{1});
  a.write(p);
  SafetensorsWriter b;
  b.add_values<int32_t>("y", DType::kI32, {2}, std::vector<int32_t>{-4, 5});
  b.write(p);
  const SafetensorsFile f(p);
  CHECK_FALSE(f.contains("x"));
  CHECK(f.to_float("y") == std::vector<float>{-4, 5});
  CHECK(dir_entries(dir.path) == std::vector<std::string>{"r.safetensors"});
}
