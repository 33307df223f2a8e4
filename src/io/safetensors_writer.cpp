#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/io/safetensors.hpp"

namespace moqe {
namespace {

std::string errno_text(int err) { return std::system_category().message(err); }

// Bytes a tensor of this dtype and shape needs; throws on negative dims or 64-bit overflow.
uint64_t required_bytes(std::string_view name, DType dtype, std::span<const int64_t> shape) {
  uint64_t n = 1;
  bool overflow = false;
  for (int64_t d : shape) {
    MOQE_CHECK(d >= 0, "cannot add tensor '{}': shape {} has a negative dimension", name,
               shape_to_string(shape));
    overflow |= __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n);
  }
  overflow |= n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t bytes = 0;
  overflow |= __builtin_mul_overflow(n, dtype_size(dtype), &bytes);
  MOQE_CHECK(!overflow, "cannot add tensor '{}': {} {} is too large (size overflows 64 bits)", name,
             dtype_name(dtype), shape_to_string(shape));
  return bytes;
}

// Temporary files being written, readable from a signal handler: fixed slots (no allocation) and
// lock-free atomics only. A slot goes free -> claimed (path being copied) -> live -> free; the
// remover unlinks live paths only, and announces itself in `readers` first so that a slot is not
// reclaimed (its path overwritten) while a remover may still read it. A path too long for a slot,
// or a 65th concurrent write, is not registered (the ordinary error paths still remove it).
struct TempSlot {
  std::atomic<int> state{0};
  std::atomic<int> readers{0};
  char path[4096];
};
static_assert(std::atomic<int>::is_always_lock_free);
constexpr int kFree = 0, kClaimed = 1, kLive = 2;
TempSlot g_temp_slots[64];

int register_temp(const std::filesystem::path& p) {
  const std::string& s = p.native();
  if (s.size() >= sizeof(TempSlot::path)) return -1;
  for (int i = 0; i < static_cast<int>(std::size(g_temp_slots)); ++i) {
    TempSlot& slot = g_temp_slots[i];
    int expected = kFree;
    if (!slot.state.compare_exchange_strong(expected, kClaimed)) continue;
    if (slot.readers.load() != 0) {  // a remover may be reading the previous path
      slot.state.store(kFree);
      continue;
    }
    std::memcpy(slot.path, s.c_str(), s.size() + 1);
    slot.state.store(kLive);
    return i;
  }
  return -1;
}

void unregister_temp(int slot) {
  if (slot >= 0) g_temp_slots[slot].state.store(kFree);
}

// Removes the temporary file unless the rename went through, so no failure leaves it behind.
class TempFile {
 public:
  TempFile(std::filesystem::path p, int fd, int slot) : path_(std::move(p)), fd_(fd), slot_(slot) {}
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) {
      std::error_code ec;
      std::filesystem::remove(path_, ec);
    }
    unregister_temp(slot_);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  int fd() const { return fd_; }
  const std::filesystem::path& path() const { return path_; }
  // Returns the errno of a failed close, 0 on success.
  int close() {
    const int fd = std::exchange(fd_, -1);
    return ::close(fd) == 0 ? 0 : errno;
  }
  // After the rename: the name is gone, so a signal handler unlinking it is harmless.
  void commit() { committed_ = true; }

 private:
  std::filesystem::path path_;
  int fd_;
  int slot_;
  bool committed_ = false;
};

TempFile create_temp_beside(const std::filesystem::path& target, const std::string& where) {
  std::filesystem::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  const uint64_t seed =
      (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  int last_err = 0;
  for (int attempt = 0; attempt < 16; ++attempt) {
    const uint64_t tag = seed + counter.fetch_add(1) * 0x9e3779b97f4a7c15ull;
    const std::filesystem::path tmp =
        dir / fmt::format(".{}.tmp.{}.{:016x}", target.filename().string(), ::getpid(), tag);
    // Registered before it exists, so that no signal can arrive between creation and
    // registration (unlinking a name not yet created is harmless).
    const int slot = register_temp(tmp);
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return TempFile(tmp, fd, slot);
    last_err = errno;
    unregister_temp(slot);
    if (last_err != EEXIST) break;
  }
  MOQE_FAIL("{}: cannot create a temporary file in {}: {}", where, dir.string(),
            errno_text(last_err));
}

void write_all(const TempFile& f, const std::byte* p, size_t n, const std::string& where) {
  while (n > 0) {
    // Linux writes at most ~2 GiB per call; keep each request below that.
    const size_t chunk = std::min<size_t>(n, size_t{1} << 30);
    const ssize_t w = ::write(f.fd(), p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      MOQE_FAIL("{}: write to {} failed: {}", where, f.path().string(), errno_text(errno));
    }
    MOQE_CHECK(w > 0, "{}: write to {} made no progress", where, f.path().string());
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Makes the temporary file durable and renames it over `path`.
void commit_temp(TempFile& tmp, const std::filesystem::path& path, const std::string& where) {
  if (::fsync(tmp.fd()) != 0) {
    MOQE_FAIL("{}: fsync of {} failed: {}", where, tmp.path().string(), errno_text(errno));
  }
  if (const int err = tmp.close(); err != 0) {
    MOQE_FAIL("{}: close of {} failed: {}", where, tmp.path().string(), errno_text(err));
  }
  std::error_code ec;
  std::filesystem::rename(tmp.path(), path, ec);
  MOQE_CHECK(!ec, "{}: cannot rename {} into place: {}", where, tmp.path().string(), ec.message());
  tmp.commit();

  // Makes the rename itself durable; the file is complete either way, so failure is not fatal.
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape,
                            std::vector<std::byte> data) {
  add_view(std::move(name), dtype, std::move(shape), data);
  entries_.back().owned = std::move(data);
  entries_.back().view = entries_.back().owned;
}

void SafetensorsWriter::add_view(std::string name, DType dtype, std::vector<int64_t> shape,
                                 std::span<const std::byte> data) {
  MOQE_CHECK(name != "__metadata__", "cannot add a tensor named '__metadata__' (reserved)");
  MOQE_CHECK(!names_.contains(name),
             "cannot add tensor '{}': a tensor of that name was added already", name);
  const uint64_t needed = required_bytes(name, dtype, shape);
  MOQE_CHECK(data.size() == needed, "cannot add tensor '{}': {} bytes given but {} {} needs {}",
             name, data.size(), dtype_name(dtype), shape_to_string(shape), needed);
  names_.insert(name);
  entries_.push_back(Entry{std::move(name), dtype, std::move(shape), {}, data});
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_.insert_or_assign(std::move(key), std::move(value));
}

bool SafetensorsWriter::contains(std::string_view name) const { return names_.contains(name); }

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  const std::string where = path.string();
  MOQE_CHECK(path.has_filename(), "{}: not a file name", where);

  // Decreasing element size keeps every tensor aligned to its element size, given an 8-aligned
  // buffer start (all sizes are powers of two).
  std::vector<const Entry*> order;
  order.reserve(entries_.size());
  for (const Entry& e : entries_) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
    const size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    if (sa != sb) return sa > sb;
    return a->name < b->name;
  });

  std::string header;
  try {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    uint64_t offset = 0;
    for (const Entry* e : order) {
      const uint64_t end = offset + e->view.size();
      h[e->name] = {
          {"dtype", dtype_name(e->dtype)}, {"shape", e->shape}, {"data_offsets", {offset, end}}};
      offset = end;
    }
    header = h.dump();
  } catch (const nlohmann::json::exception& e) {
    MOQE_FAIL("{}: cannot encode the header (names and metadata must be UTF-8): {}", where,
              e.what());
  }
  // Padding so that the data buffer starts 8-aligned in the file.
  header.append((8 - (8 + header.size()) % 8) % 8, ' ');
  MOQE_CHECK(header.size() <= SafetensorsFile::kMaxHeaderBytes,
             "{}: header of {} bytes exceeds the limit of {} bytes", where, header.size(),
             SafetensorsFile::kMaxHeaderBytes);

  TempFile tmp = create_temp_beside(path, where);
  std::byte len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::byte>((header.size() >> (8 * i)) & 0xff);
  write_all(tmp, len, sizeof len, where);
  write_all(tmp, reinterpret_cast<const std::byte*>(header.data()), header.size(), where);
  for (const Entry* e : order) write_all(tmp, e->view.data(), e->view.size(), where);

  commit_temp(tmp, path, where);
}

void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  const std::string where = path.string();
  MOQE_CHECK(path.has_filename(), "{}: not a file name", where);
  TempFile tmp = create_temp_beside(path, where);
  write_all(tmp, bytes.data(), bytes.size(), where);
  commit_temp(tmp, path, where);
}

void remove_temporary_files() noexcept {
  for (TempSlot& slot : g_temp_slots) {
    slot.readers.fetch_add(1);
    if (slot.state.load() == kLive) ::unlink(slot.path);
    slot.readers.fetch_sub(1);
  }
}

}  // namespace moqe
