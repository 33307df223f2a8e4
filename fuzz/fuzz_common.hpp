// Helpers shared by moqe's libFuzzer targets: inputs as files (memfd or a scratch directory on
// tmpfs) and the rule that only moqe::Error may escape the code under test.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "moqe/core/error.hpp"

namespace moqe::fuzz {

// An anonymous in-memory file holding the input, opened through /proc/self/fd like any path:
// the readers' whole path (open, fstat, mmap) runs without touching the disk.
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t size) {
    fd_ = ::memfd_create("moqe-fuzz", MFD_CLOEXEC);
    if (fd_ < 0) std::abort();
    size_t done = 0;
    while (done < size) {
      const ssize_t w = ::write(fd_, data + done, size - done);
      if (w <= 0) std::abort();
      done += static_cast<size_t>(w);
    }
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  std::filesystem::path path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_ = -1;
};

// A per-process scratch directory: under $MOQE_FUZZ_SCRATCH when set (fuzz/run.sh sets it and
// removes it afterwards: libFuzzer ends with _Exit, so atexit handlers do not always run), else
// on tmpfs where there is one.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path base = std::filesystem::temp_directory_path();
    std::error_code ec;
    if (const char* env = std::getenv("MOQE_FUZZ_SCRATCH"); env != nullptr && *env != '\0') {
      base = env;
    } else if (std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0) {
      base = "/dev/shm";
    }
    const auto d = base / ("moqe-fuzz-" + std::to_string(::getpid()));
    std::filesystem::remove_all(d, ec);
    std::filesystem::create_directories(d);
    std::atexit([] {
      std::error_code e;
      std::filesystem::remove_all(scratch_dir(), e);
    });
    return d;
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& p, const uint8_t* data, size_t size) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f) std::abort();
}

// Runs f; a moqe::Error is the documented way to reject input, anything else (another exception,
// a crash, a sanitizer report) is a finding.
template <class F>
bool rejects(F&& f) {
  try {
    f();
    return false;
  } catch (const moqe::Error&) {
    return true;
  }
}

}  // namespace moqe::fuzz
