// Fuzzes the sharded-checkpoint index: any bytes as model.safetensors.index.json in a directory of
// small shards (valid, broken, nested, a directory and a FIFO posing as shards).
#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_common.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

void shard(const fs::path& p, std::initializer_list<const char*> names) {
  moqe::SafetensorsWriter w;
  float v = 1;
  for (const char* n : names) {
    const std::vector<float> values{v, -v};
    w.add_values<float>(n, moqe::DType::kF32, {2}, values);
    v += 1;
  }
  w.write(p);
}

// The directory the index lives in, made once: the seeds in fuzz/corpus/index name these files.
const fs::path& fixture() {
  static const fs::path dir = [] {
    const fs::path d = moqe::fuzz::scratch_dir() / "ckpt";
    fs::create_directories(d / "sub");
    fs::create_directories(d / "dir.safetensors");
    shard(d / "model-00001-of-00002.safetensors", {"a", "b"});
    shard(d / "model-00002-of-00002.safetensors", {"c"});
    shard(d / "sub" / "nested.safetensors", {"d"});
    shard(d / "dup.safetensors", {"a"});
    moqe::fuzz::write_file(d / "broken.safetensors",
                           reinterpret_cast<const uint8_t*>("\x10\0\0\0\0\0\0\0{\"x\":1}"), 15);
    // Opening a FIFO for reading blocks until a writer appears: the reader must not hang on one.
    ::mkfifo((d / "fifo.safetensors").c_str(), 0600);
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path& dir = fixture();
  const fs::path index = dir / "model.safetensors.index.json";
  moqe::fuzz::write_file(index, data, size);
  for (const fs::path& p : {dir, index}) {
    moqe::fuzz::rejects([&] {
      const moqe::Checkpoint ckpt(p);
      for (const std::string& name : ckpt.tensor_names()) {
        const std::vector<float> v = ckpt.to_float(name);
        if (v.size() != 2) __builtin_trap();
      }
      (void)ckpt.metadata();
    });
  }
  return 0;
}
