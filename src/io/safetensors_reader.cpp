#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "json_text.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/safetensors.hpp"

namespace moqe {
namespace {

using nlohmann::json;

std::string errno_text(int err) { return std::system_category().message(err); }

// Returns the offset of the first byte that breaks UTF-8 (overlong forms, surrogates and code
// points past U+10FFFF included), or npos. nlohmann checks strings only; this also gives a
// precise message.
size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // > U+10FFFF
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// nlohmann keeps the last of duplicate keys silently; the parse callback sees every key, so
// duplicates can be caught without a second pass.
struct DuplicateKeyFinder {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  bool at_top_level = false;

  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (duplicate.empty() && !open_objects.empty() && parsed.is_string()) {
          const auto& key = parsed.get_ref<const std::string&>();
          if (!open_objects.back().insert(key).second) {
            duplicate = key;
            at_top_level = open_objects.size() == 1;
          }
        }
        break;
      default:
        break;
    }
    return true;
  }
};

// A JSON integer in [0, max], or nullopt for anything else (floats, negatives, non-numbers).
std::optional<uint64_t> json_uint(const json& v, uint64_t max) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<uint64_t>();
    if (u <= max) return u;
  } else if (v.is_number_integer()) {
    const auto i = v.get<int64_t>();
    if (i >= 0 && static_cast<uint64_t>(i) <= max) return static_cast<uint64_t>(i);
  }
  return std::nullopt;
}

}  // namespace

int64_t TensorInfo::numel() const {
  // A TensorInfo read from a file was checked on open; one built by hand may hold anything.
  int64_t n = 1;
  for (int64_t d : shape) {
    MOQE_CHECK(d >= 0 && !__builtin_mul_overflow(n, d, &n),
               "tensor '{}': shape {} has a negative dimension or more than 2^63 elements", name,
               shape_to_string(shape));
  }
  return n;
}

std::string TensorInfo::describe() const {
  return fmt::format("{} {}", dtype_name(dtype), shape_to_string(shape));
}

std::string shape_to_string(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += "]";
  return s;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string where = path_.string();
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; it is then
  // rejected below as not a regular file. (It has no effect on regular files.)
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  MOQE_CHECK(fd >= 0, "{}: cannot open: {}", where, errno_text(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    MOQE_FAIL("{}: cannot stat: {}", where, errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    MOQE_FAIL("{}: not a regular file", where);
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  // Also keeps mmap away from empty files, which it cannot map.
  if (file_size < 8) {
    ::close(fd);
    MOQE_FAIL("{}: file too small for a safetensors header ({} bytes, need at least 8)", where,
              file_size);
  }
  if (file_size > std::numeric_limits<size_t>::max()) {
    ::close(fd);
    MOQE_FAIL("{}: file too large to map ({} bytes)", where, file_size);
  }
  void* m = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  MOQE_CHECK(m != MAP_FAILED, "{}: cannot mmap: {}", where, errno_text(map_err));
  map_ = static_cast<const std::byte*>(m);
  map_size_ = static_cast<size_t>(file_size);

  // The destructor does not run when the constructor throws.
  try {
    // Other formats users bring, named rather than reported as a bad safetensors header.
    const std::string_view magic(reinterpret_cast<const char*>(map_), 4);
    MOQE_CHECK(magic != "GGUF",
               "{}: a GGUF file (llama.cpp's format), not safetensors; moqe reads safetensors "
               "checkpoints (the original Hugging Face weights, or `moqe quantize` output)",
               where);
    MOQE_CHECK(magic != std::string_view("PK\x03\x04", 4),
               "{}: a zip archive (PyTorch's torch.save / pytorch_model.bin format), not "
               "safetensors; convert it with safetensors' save_file or use the model's "
               ".safetensors files",
               where);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<uint64_t>(map_[i]);
    MOQE_CHECK(n <= kMaxHeaderBytes, "{}: header length {} exceeds the limit of {} bytes", where, n,
               kMaxHeaderBytes);
    MOQE_CHECK(8 + n <= file_size,
               "{}: header length {} runs past the end of the file ({} bytes; truncated?)", where,
               n, file_size);
    MOQE_CHECK(n > 0, "{}: header length is 0 (the header must be a JSON object)", where);
    const std::string_view header(reinterpret_cast<const char*>(map_ + 8), n);
    if (const size_t nul = header.find('\0'); nul != std::string_view::npos) {
      MOQE_FAIL("{}: header contains a NUL byte at offset {}", where, 8 + nul);
    }
    if (const size_t bad = find_invalid_utf8(header); bad != std::string_view::npos) {
      MOQE_FAIL("{}: header is not valid UTF-8 (byte 0x{:02x} at offset {})", where,
                static_cast<unsigned>(static_cast<unsigned char>(header[bad])), 8 + bad);
    }

    DuplicateKeyFinder dup;
    json doc;
    try {
      doc = json::parse(header.begin(), header.end(), std::ref(dup));
    } catch (const json::exception& e) {
      MOQE_FAIL("{}: header is not valid JSON: {}", where, e.what());
    }
    if (!dup.duplicate.empty()) {
      if (dup.at_top_level) {
        MOQE_FAIL("{}: tensor '{}' appears twice in the header", where, dup.duplicate);
      }
      MOQE_FAIL("{}: header has a duplicate key '{}'", where, dup.duplicate);
    }
    MOQE_CHECK(doc.is_object(), "{}: header is a JSON {}, not an object", where, doc.type_name());

    const uint64_t buffer_size = file_size - 8 - n;
    data_ = map_ + 8 + n;

    for (const auto& [name, entry] : doc.items()) {
      if (name == "__metadata__") {
        MOQE_CHECK(entry.is_object(), "{}: __metadata__ is a JSON {}, not an object", where,
                   entry.type_name());
        for (const auto& [key, value] : entry.items()) {
          MOQE_CHECK(value.is_string(),
                     "{}: __metadata__ value of '{}' is a JSON {}; only strings are allowed", where,
                     key, value.type_name());
          metadata_.emplace(key, value.get<std::string>());
        }
        continue;
      }
      MOQE_CHECK(entry.is_object(), "{}: tensor '{}': entry is a JSON {}, not an object", where,
                 name, entry.type_name());
      TensorInfo t;
      t.name = name;

      const auto dt = entry.find("dtype");
      MOQE_CHECK(dt != entry.end(), "{}: tensor '{}': missing \"dtype\"", where, name);
      MOQE_CHECK(dt->is_string(), "{}: tensor '{}': \"dtype\" is a JSON {}, not a string", where,
                 name, dt->type_name());
      const auto parsed = parse_dtype(dt->get_ref<const std::string&>());
      MOQE_CHECK(parsed.has_value(), "{}: tensor '{}': unknown dtype '{}'", where, name,
                 dt->get_ref<const std::string&>());
      t.dtype = *parsed;

      const auto sh = entry.find("shape");
      MOQE_CHECK(sh != entry.end(), "{}: tensor '{}': missing \"shape\"", where, name);
      MOQE_CHECK(sh->is_array(), "{}: tensor '{}': \"shape\" is a JSON {}, not an array", where,
                 name, sh->type_name());
      uint64_t numel = 1;
      bool overflow = false;
      for (const json& d : *sh) {
        const auto dim = json_uint(d, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
        MOQE_CHECK(dim.has_value(),
                   "{}: tensor '{}': shape {} has a dimension that is not a non-negative integer",
                   where, name, detail::json_brief(*sh));
        t.shape.push_back(static_cast<int64_t>(*dim));
        overflow |= __builtin_mul_overflow(numel, *dim, &numel);
      }
      uint64_t needed = 0;
      overflow |= numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      overflow |= __builtin_mul_overflow(numel, dtype_size(t.dtype), &needed);
      MOQE_CHECK(!overflow, "{}: tensor '{}': {} is too large (size overflows 64 bits)", where,
                 name, t.describe());

      const auto off = entry.find("data_offsets");
      MOQE_CHECK(off != entry.end(), "{}: tensor '{}': missing \"data_offsets\"", where, name);
      MOQE_CHECK(off->is_array() && off->size() == 2,
                 "{}: tensor '{}': \"data_offsets\" must be an array [begin, end], found {}", where,
                 name, detail::json_brief(*off));
      const auto begin = json_uint((*off)[0], std::numeric_limits<uint64_t>::max());
      const auto end = json_uint((*off)[1], std::numeric_limits<uint64_t>::max());
      MOQE_CHECK(begin && end,
                 "{}: tensor '{}': data_offsets {} must hold two non-negative integers", where,
                 name, detail::json_brief(*off));
      t.begin = *begin;
      t.end = *end;
      MOQE_CHECK(t.begin <= t.end, "{}: tensor '{}': data_offsets [{}, {}] end before they begin",
                 where, name, t.begin, t.end);
      MOQE_CHECK(t.end - t.begin == needed,
                 "{}: tensor '{}': data_offsets [{}, {}] hold {} bytes but {} needs {}", where,
                 name, t.begin, t.end, t.end - t.begin, t.describe(), needed);
      tensors_.push_back(std::move(t));
    }

    // Zero-size tensors sort before a tensor starting at the same offset, so they tile too.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      if (a.begin != b.begin) return a.begin < b.begin;
      if (a.end != b.end) return a.end < b.end;
      return a.name < b.name;
    });
    uint64_t pos = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo& t : tensors_) {
      if (t.begin < pos) {
        MOQE_FAIL("{}: tensor '{}': data_offsets [{}, {}] overlap tensor '{}' ([{}, {}])", where,
                  t.name, t.begin, t.end, prev->name, prev->begin, prev->end);
      }
      if (t.begin > pos) {
        MOQE_FAIL("{}: tensor '{}': data_offsets [{}, {}] leave a gap of {} bytes after {}", where,
                  t.name, t.begin, t.end, t.begin - pos,
                  prev ? fmt::format("tensor '{}'", prev->name) : "the start of the data buffer");
      }
      MOQE_CHECK(t.end <= buffer_size,
                 "{}: tensor '{}': data_offsets [{}, {}] run past the end of the file (the data "
                 "buffer holds {} bytes; truncated?)",
                 where, t.name, t.begin, t.end, buffer_size);
      pos = t.end;
      prev = &t;
    }
    MOQE_CHECK(pos == buffer_size,
               "{}: {} trailing bytes after the last tensor (tensors end at byte {} of a {}-byte "
               "data buffer)",
               where, buffer_size - pos, pos, buffer_size);

    for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  } catch (...) {
    ::munmap(const_cast<std::byte*>(map_), map_size_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      tensors_(std::move(o.tensors_)),
      index_(std::move(o.index_)),
      metadata_(std::move(o.metadata_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)),
      data_(std::exchange(o.data_, nullptr)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) ::munmap(const_cast<std::byte*>(map_), map_size_);
    path_ = std::move(o.path_);
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    data_ = std::exchange(o.data_, nullptr);
  }
  return *this;
}

bool SafetensorsFile::contains(std::string_view name) const { return index_.contains(name); }

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  const auto it = index_.find(name);
  MOQE_CHECK(it != index_.end(), "{}: no tensor named '{}'", path_.string(), name);
  return tensors_[it->second];
}

std::span<const std::byte> SafetensorsFile::bytes(std::string_view name) const {
  return bytes(info(name));
}

std::span<const std::byte> SafetensorsFile::bytes(const TensorInfo& t) const {
  // Guards against a TensorInfo that came from another file.
  const size_t buffer_size = map_ == nullptr ? 0 : map_size_ - static_cast<size_t>(data_ - map_);
  MOQE_CHECK(t.begin <= t.end && t.end <= buffer_size,
             "{}: tensor '{}': data_offsets [{}, {}] lie outside this file's {}-byte data buffer",
             path_.string(), t.name, t.begin, t.end, buffer_size);
  if (t.begin == t.end) return {};
  return {data_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

std::vector<float> SafetensorsFile::to_float(std::string_view name) const {
  const TensorInfo& t = info(name);
  MOQE_CHECK(dtype_is_convertible(t.dtype),
             "{}: tensor '{}': dtype {} cannot be converted to float", path_.string(), t.name,
             dtype_name(t.dtype));
  std::vector<float> out(static_cast<size_t>(t.numel()));
  to_float(t, out);
  return out;
}

void SafetensorsFile::to_float(const TensorInfo& t, std::span<float> out) const {
  MOQE_CHECK(dtype_is_convertible(t.dtype),
             "{}: tensor '{}': dtype {} cannot be converted to float", path_.string(), t.name,
             dtype_name(t.dtype));
  const std::span<const std::byte> b = bytes(t);
  const size_t n = b.size() / dtype_size(t.dtype);
  MOQE_CHECK(out.size() == n, "{}: tensor '{}': output holds {} floats but {} has {} elements",
             path_.string(), t.name, out.size(), t.describe(), n);
  moqe::to_float(t.dtype, b.data(), n, out.data());
}

}  // namespace moqe
