#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/io/checkpoint.hpp"

namespace {

namespace fs = std::filesystem;
using Catch::Contains;
using moqe::Checkpoint;
using moqe::DType;
using moqe::SafetensorsWriter;

struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("moqe-ckpt-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
  REQUIRE(out.good());
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
  return error_of([&] { Checkpoint c(p); });
}

// One shard holding `names`, each a 2-element F32 tensor whose values encode the name's position.
void write_shard(const fs::path& p, const std::vector<std::string>& names, float base,
                 const std::map<std::string, std::string>& metadata = {}) {
  SafetensorsWriter w;
  float v = base;
  for (const std::string& n : names) {
    w.add_values<float>(n, DType::kF32, {2}, std::vector<float>{v, -v});
    v += 1;
  }
  for (const auto& [k, val] : metadata) w.set_metadata(k, val);
  w.write(p);
}

const char kIndex[] = R"({
  "metadata": {"total_size": 40},
  "weight_map": {
    "layer.0.w": "model-00001-of-00003.safetensors",
    "layer.0.b": "model-00001-of-00003.safetensors",
    "layer.1.w": "model-00002-of-00003.safetensors",
    "layer.2.w": "model-00003-of-00003.safetensors",
    "layer.2.b": "model-00003-of-00003.safetensors"
  }
})";

void write_sharded(const TempDir& dir) {
  write_shard(dir / "model-00001-of-00003.safetensors", {"layer.0.w", "layer.0.b"}, 1,
              {{"moqe.format", "1"}, {"shard", "one"}});
  write_shard(dir / "model-00002-of-00003.safetensors", {"layer.1.w", "unlisted"}, 10,
              {{"moqe.format", "1"}, {"shard", "two"}, {"only2", "x"}});
  write_shard(dir / "model-00003-of-00003.safetensors", {"layer.2.w", "layer.2.b"}, 20,
              {{"moqe.format", "1"}});
  write_text(dir / "model.safetensors.index.json", kIndex);
}

void check_sharded(const Checkpoint& c) {
  CHECK(c.files().size() == 3);
  CHECK(c.size() == 6);
  CHECK(c.tensor_names() == std::vector<std::string>{"layer.0.b", "layer.0.w", "layer.1.w",
                                                     "layer.2.b", "layer.2.w", "unlisted"});
  CHECK(c.contains("layer.1.w"));
  CHECK_FALSE(c.contains("layer.9.w"));
  CHECK(c.file_of("layer.2.b").path().filename() == "model-00003-of-00003.safetensors");
  CHECK(c.to_float("layer.0.b") == std::vector<float>{2, -2});
  CHECK(c.to_float("layer.2.w") == std::vector<float>{20, -20});
  CHECK(c.to_float("unlisted") == std::vector<float>{11, -11});
  CHECK(c.info("layer.1.w").describe() == "F32 [2]");
  CHECK(c.bytes("layer.1.w").size() == 8);
  // The first shard's value wins for a key that differs.
  CHECK(c.metadata() ==
        std::map<std::string, std::string>{{"moqe.format", "1"}, {"shard", "one"}, {"only2", "x"}});
}

}  // namespace

TEST_CASE("sharded checkpoint through its index", "[io][checkpoint]") {
  TempDir dir;
  write_sharded(dir);
  SECTION("index path") {
    const Checkpoint c(dir / "model.safetensors.index.json");
    CHECK(c.path() == dir / "model.safetensors.index.json");
    check_sharded(c);
  }
  SECTION("directory with an index (other .safetensors files are ignored)") {
    write_shard(dir / "consolidated.safetensors", {"layer.0.w"}, 99);
    const Checkpoint c(dir.path);
    check_sharded(c);
  }
  SECTION("lookups of an absent tensor name the checkpoint") {
    const Checkpoint c(dir.path);
    CHECK_THAT(error_of([&] { (void)c.file_of("layer.9.w"); }),
               Contains(dir.path.string()) && Contains("'layer.9.w'"));
    CHECK_THAT(error_of([&] { (void)c.to_float("layer.9.w"); }), Contains("'layer.9.w'"));
  }
}

TEST_CASE("shards in a subdirectory of the index", "[io][checkpoint]") {
  TempDir dir;
  fs::create_directory(dir / "shards");
  write_shard(dir / "shards" / "a.safetensors", {"x"}, 1);
  write_text(dir / "idx.json", R"({"weight_map": {"x": "shards/a.safetensors"}})");
  const Checkpoint c(dir / "idx.json");
  CHECK(c.to_float("x") == std::vector<float>{1, -1});
}

TEST_CASE("index errors name the index and the shard", "[io][checkpoint]") {
  TempDir dir;
  write_sharded(dir);
  const fs::path index = dir / "model.safetensors.index.json";

  SECTION("missing shard") {
    fs::remove(dir / "model-00002-of-00003.safetensors");
    CHECK_THAT(open_error(index), Contains("model.safetensors.index.json") &&
                                      Contains("model-00002-of-00003.safetensors") &&
                                      Contains("missing"));
    CHECK_THAT(open_error(dir.path), Contains("model-00002-of-00003.safetensors"));
  }
  SECTION("tensor missing from its shard") {
    write_shard(dir / "model-00003-of-00003.safetensors", {"layer.2.w"}, 20);
    CHECK_THAT(open_error(index), Contains("model.safetensors.index.json") &&
                                      Contains("'layer.2.b'") &&
                                      Contains("model-00003-of-00003.safetensors"));
  }
  SECTION("malformed shard") {
    write_text(dir / "model-00001-of-00003.safetensors", "junk");
    CHECK_THAT(open_error(index), Contains("model.safetensors.index.json") &&
                                      Contains("model-00001-of-00003.safetensors") &&
                                      Contains("too small"));
  }
  SECTION("tensor in two shards") {
    write_shard(dir / "model-00002-of-00003.safetensors", {"layer.1.w", "layer.0.w"}, 10);
    CHECK_THAT(open_error(index), Contains("'layer.0.w'") &&
                                      Contains("model-00001-of-00003.safetensors") &&
                                      Contains("model-00002-of-00003.safetensors"));
  }
  SECTION("absolute shard path") {
    write_text(index, R"({"weight_map": {"x": "/etc/passwd"}})");
    CHECK_THAT(open_error(index), Contains("model.safetensors.index.json") &&
                                      Contains("/etc/passwd") && Contains("absolute"));
  }
  SECTION("shard path leaving the directory") {
    write_text(index, R"({"weight_map": {"x": "sub/../../a.safetensors"}})");
    CHECK_THAT(open_error(index),
               Contains("model.safetensors.index.json") && Contains("sub/../../a.safetensors"));
  }
  SECTION("invalid JSON") {
    write_text(index, R"({"weight_map": )");
    CHECK_THAT(open_error(index),
               Contains("model.safetensors.index.json") && Contains("not valid JSON"));
  }
  SECTION("no weight_map") {
    write_text(index, R"({"metadata": {}})");
    CHECK_THAT(open_error(index),
               Contains("model.safetensors.index.json") && Contains("weight_map"));
  }
  SECTION("shard name not a string") {
    write_text(index, R"({"weight_map": {"x": 3}})");
    CHECK_THAT(open_error(index), Contains("model.safetensors.index.json") && Contains("'x'"));
  }
}

TEST_CASE("a directory reads model.safetensors or its index, nothing else", "[io][checkpoint]") {
  TempDir dir;
  write_shard(dir / "b.safetensors", {"b1", "b2"}, 5, {{"k", "from-b"}});
  write_shard(dir / "a.safetensors", {"a1"}, 1, {{"k", "from-a"}, {"ka", "1"}});
  write_text(dir / "config.json", "{}");
  write_text(dir / "notes.txt", "hello");

  SECTION("neither model.safetensors nor an index: an error listing the files") {
    CHECK_THAT(open_error(dir.path),
               Contains("no model.safetensors or model.safetensors.index.json") &&
                   Contains("a.safetensors, b.safetensors") && Contains(dir.path.string()));
  }
  SECTION("model.safetensors is read; the other files are listed as ignored") {
    write_shard(dir / "model.safetensors", {"m1"}, 3, {{"k", "from-m"}});
    const Checkpoint c(dir.path);
    REQUIRE(c.files().size() == 1);
    CHECK(c.files()[0]->path().filename() == "model.safetensors");
    CHECK(c.tensor_names() == std::vector<std::string>{"m1"});
    REQUIRE(c.ignored().size() == 2);
    CHECK(c.ignored()[0].filename() == "a.safetensors");
    CHECK(c.ignored()[1].filename() == "b.safetensors");
  }
  SECTION("an index: its shards are read, the rest ignored") {
    write_text(dir / "model.safetensors.index.json", R"({"weight_map": {"b1": "b.safetensors"}})");
    const Checkpoint c(dir.path);
    REQUIRE(c.files().size() == 1);
    CHECK(c.tensor_names() == std::vector<std::string>{"b1", "b2"});
    REQUIRE(c.ignored().size() == 1);
    CHECK(c.ignored()[0].filename() == "a.safetensors");
  }
  SECTION("a tensor in two shards") {
    write_shard(dir / "c.safetensors", {"b2"}, 7);
    write_text(dir / "model.safetensors.index.json",
               R"({"weight_map": {"b1": "b.safetensors", "x": "c.safetensors"}})");
    CHECK_THAT(open_error(dir.path),
               Contains("'b2'") && Contains("b.safetensors") && Contains("c.safetensors"));
  }
  SECTION("a single file") {
    const Checkpoint c(dir / "b.safetensors");
    CHECK(c.files().size() == 1);
    CHECK(c.tensor_names() == std::vector<std::string>{"b1", "b2"});
    CHECK(c.metadata().at("k") == "from-b");
    CHECK(c.ignored().empty());
  }
}

TEST_CASE("checkpoint paths that hold nothing", "[io][checkpoint]") {
  TempDir dir;
  CHECK_THAT(open_error(dir.path),
             Contains("no model.safetensors or model.safetensors.index.json") &&
                 Contains(dir.path.string()));
  CHECK_THAT(open_error(dir / "absent.safetensors"), Contains("absent.safetensors"));
  write_text(dir / "x.safetensors", "not a safetensors file at all");
  CHECK_THAT(open_error(dir / "x.safetensors"), Contains("x.safetensors"));
  // Other formats are named for what they are.
  write_text(dir / "model.gguf", std::string("GGUF\x03\0\0\0", 8) + std::string(64, '\0'));
  CHECK_THAT(open_error(dir / "model.gguf"), Contains("model.gguf") && Contains("GGUF file"));
  write_text(dir / "pytorch_model.bin", std::string("PK\x03\x04", 4) + std::string(64, '\0'));
  CHECK_THAT(open_error(dir / "pytorch_model.bin"), Contains("zip archive"));
}
