#include "moqe/core/cpu.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace moqe {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  // F16C and AVX-VNNI have no __builtin_cpu_supports name in GCC 12: read CPUID directly.
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
  f.f16c = (c >> 29) & 1;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
  f.avxvnni = (a >> 4) & 1;
#endif
  return f;
}

constexpr int kUnread = -1;  // MOQE_CPU_ISA not read yet
constexpr int kNoCap = -2;   // no cap: measured defaults
std::atomic<int> g_cap{kUnread};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

CpuIsa best_cpu_isa() {
#if defined(MOQE_HAVE_AVX2_KERNELS)
  const CpuFeatures& f = cpu_features();
  if (!(f.avx2 && f.fma && f.f16c)) return CpuIsa::kReference;
#if defined(MOQE_HAVE_AVX512_KERNELS)
  // __builtin_cpu_supports reports AVX-512 only when the OS saves the ZMM state (XCR0).
  if (f.avx512f && f.avx512bw) return f.avx512vnni ? CpuIsa::kAvx512Vnni : CpuIsa::kAvx512;
#endif
  return CpuIsa::kAvx2;
#else
  return CpuIsa::kReference;
#endif
}

std::optional<CpuIsa> cpu_isa_cap() {
  int cap = g_cap.load(std::memory_order_relaxed);
  if (cap == kUnread) {
    cap = kNoCap;
    if (const char* env = std::getenv("MOQE_CPU_ISA")) {
      if (auto isa = parse_cpu_isa(env)) {
        cap = static_cast<int>(*isa);
      } else {
        std::fprintf(stderr,
                     "moqe: MOQE_CPU_ISA=%s is not one of reference, avx2, avx512, avx512vnni; "
                     "ignored\n",
                     env);
      }
    }
    g_cap.store(cap, std::memory_order_relaxed);
  }
  if (cap == kNoCap) return std::nullopt;
  return static_cast<CpuIsa>(cap);
}

CpuIsa active_cpu_isa() {
  const std::optional<CpuIsa> cap = cpu_isa_cap();
  const CpuIsa best = best_cpu_isa();
  return cap && *cap < best ? *cap : best;
}

void set_cpu_isa_cap(std::optional<CpuIsa> cap) {
  g_cap.store(cap ? static_cast<int>(*cap) : kNoCap, std::memory_order_relaxed);
}

std::string_view to_string(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kReference:
      return "reference";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Vnni:
      return "avx512vnni";
  }
  return "?";
}

std::optional<CpuIsa> parse_cpu_isa(std::string_view s) {
  if (s == "reference" || s == "scalar") return CpuIsa::kReference;
  if (s == "avx2") return CpuIsa::kAvx2;
  if (s == "avx512") return CpuIsa::kAvx512;
  if (s == "avx512vnni") return CpuIsa::kAvx512Vnni;
  return std::nullopt;
}

}  // namespace moqe
