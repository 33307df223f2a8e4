// safetensors files: a memory-mapped reader that applies every validation rule of the reference
// implementation, and a writer that never leaves a partial file, even when a signal strikes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/io/dtype.hpp"

namespace moqe {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data buffer, end exclusive
  uint64_t end = 0;

  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
  // "F32 [14336, 4096]"
  std::string describe() const;
};

// "[14336, 4096]"
std::string shape_to_string(std::span<const int64_t> shape);

// A read-only, memory-mapped safetensors file. Opening validates the whole header: every error
// names the file. Tensor data stays in the mapping (files larger than memory are fine).
class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Tensors in file order (sorted by offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(std::string_view name) const;
  // Throws moqe::Error naming the file and the tensor when absent.
  const TensorInfo& info(std::string_view name) const;
  // The raw little-endian bytes (not necessarily aligned for the element type).
  std::span<const std::byte> bytes(std::string_view name) const;
  std::span<const std::byte> bytes(const TensorInfo& t) const;
  // The tensor converted to fp32 (F32/F16/BF16/F64/F8/integers). Throws naming the file, tensor
  // and dtype otherwise.
  std::vector<float> to_float(std::string_view name) const;
  void to_float(const TensorInfo& t, std::span<float> out) const;

 private:
  std::filesystem::path path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  const std::byte* data_ = nullptr;  // start of the data buffer within the mapping
};

// Builds a safetensors file. Data is either owned by the writer or borrowed (a span that must
// outlive write()), so copying tensors through from a mapped input costs no memory.
class SafetensorsWriter {
 public:
  // Takes ownership of the bytes.
  void add(std::string name, DType dtype, std::vector<int64_t> shape, std::vector<std::byte> data);
  // Borrows the bytes.
  void add_view(std::string name, DType dtype, std::vector<int64_t> shape,
                std::span<const std::byte> data);
  template <class T>
  void add_values(std::string name, DType dtype, std::vector<int64_t> shape,
                  std::span<const T> values) {
    std::vector<std::byte> b(values.size_bytes());
    if (!b.empty()) std::memcpy(b.data(), values.data(), b.size());
    add(std::move(name), dtype, std::move(shape), std::move(b));
  }
  void set_metadata(std::string key, std::string value);
  size_t size() const { return entries_.size(); }
  bool contains(std::string_view name) const;

  // Writes to `path` through a temporary file in the same directory, then renames it over
  // `path`. On any failure the temporary file is removed, `path` is untouched, and moqe::Error
  // names the file. Tensors are laid out by decreasing alignment, then by name.
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> owned;
    std::span<const std::byte> view;
  };
  std::vector<Entry> entries_;
  std::set<std::string, std::less<>> names_;  // keeps add() and contains() O(log n)
  std::map<std::string, std::string> metadata_;
};

// Writes `bytes` to `path` as SafetensorsWriter::write does: a temporary file in the same
// directory, fsync'd, then renamed over `path`. On failure `path` is untouched, no temporary file
// remains, and moqe::Error names the file.
void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes);

// Unlinks the temporary files of every write in progress in this process (any thread), so that a
// process ended by a signal leaves no partial file. Async-signal-safe: meant for a SIGINT/SIGTERM
// handler that then calls _exit, as the moqe tool does. The targets of those writes are untouched.
void remove_temporary_files() noexcept;

}  // namespace moqe
