// A checkpoint: one safetensors file, or a set of shards tied by model.safetensors.index.json
// (Hugging Face sharding). Tensors are looked up by name across shards.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/io/foreign.hpp"
#include "moqe/io/safetensors.hpp"

namespace moqe {

class Checkpoint {
 public:
  // model.safetensors.index.json files larger than this are refused (real ones hold ~10 MB).
  static constexpr uint64_t kMaxIndexBytes = 100'000'000;

  // `path` is a .safetensors file, a model.safetensors.index.json, or a directory holding one of
  // them: the index and its shards (sharded), else model.safetensors. Other .safetensors files in
  // the directory are not read (ignored() lists them); a directory with neither is an error
  // listing what it holds. A tensor name present in two shards is an error naming both; so is a
  // shard named by the index but missing, and a tensor the index places in a shard that does not
  // hold it. Shard paths must be relative and stay inside the index's directory. Tensors a shard
  // holds but the index does not list are still accessible.
  explicit Checkpoint(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  // The .safetensors files of a directory input that are not part of the checkpoint.
  const std::vector<std::filesystem::path>& ignored() const { return ignored_; }
  // All tensor names, sorted.
  std::vector<std::string> tensor_names() const;
  size_t size() const { return where_.size(); }
  bool contains(std::string_view name) const;
  // Throws moqe::Error naming the tensor and the checkpoint when absent.
  const SafetensorsFile& file_of(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const { return file_of(name).info(name); }
  std::span<const std::byte> bytes(std::string_view name) const {
    return file_of(name).bytes(name);
  }
  std::vector<float> to_float(std::string_view name) const { return file_of(name).to_float(name); }
  // The __metadata__ of all files merged. A key with different values in two files keeps the
  // value of the first file in files() order (shards of one checkpoint repeat the same keys).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The quantization_config of the config.json beside the checkpoint (kNone when there is none),
  // read on first use: other tools' quantized weights are read in place through it
  // (io/foreign.hpp). set_quantization names another config (a --config elsewhere).
  const QuantizationConfig& quantization() const;
  void set_quantization(QuantizationConfig q);

 private:
  void add_file(const std::filesystem::path& file);
  std::filesystem::path path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::filesystem::path> ignored_;
  struct LazyQuantization {
    std::once_flag once;
    std::optional<QuantizationConfig> config;
  };
  std::unique_ptr<LazyQuantization> quantization_ = std::make_unique<LazyQuantization>();
  std::map<std::string, size_t, std::less<>> where_;  // tensor name -> index in files_
  std::map<std::string, std::string> metadata_;
};

}  // namespace moqe
