// Helpers shared by the tests: temporary directories and synthetic weights.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moqe/core/cpu.hpp"

namespace moqe::test {

// Caps the CPU kernels for layers built in this scope (e.g. kReference for bit-exact checks,
// whose summation order is the reference's).
class ScopedCpuIsa {
 public:
  // nullopt: no cap (each kernel family's measured default).
  explicit ScopedCpuIsa(std::optional<CpuIsa> cap) : previous_(cpu_isa_cap()) {
    set_cpu_isa_cap(cap);
  }
  ~ScopedCpuIsa() { set_cpu_isa_cap(previous_); }
  ScopedCpuIsa(const ScopedCpuIsa&) = delete;
  ScopedCpuIsa& operator=(const ScopedCpuIsa&) = delete;

 private:
  std::optional<CpuIsa> previous_;
};

// n values from N(0, 1), the same for the same seed.
inline std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

// A fresh directory under the system temp dir, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("moqe-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
  // Names of the entries in the directory, sorted.
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path_)) {
      out.push_back(e.path().filename().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  std::filesystem::path path_;
};

// Gaussian weights with a few outlier input channels (every 37th column, 8x).
inline std::vector<float> gaussian_weights(int64_t n, int64_t k, uint32_t seed,
                                           float sigma = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, sigma);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (auto& x : w) x = g(rng);
  for (int64_t c = 0; c < k; c += 37) {
    for (int64_t r = 0; r < n; ++r) w[r * k + c] *= 8.0f;
  }
  return w;
}

}  // namespace moqe::test
