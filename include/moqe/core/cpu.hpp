// Runtime CPU feature detection and the instruction-set level moqe's CPU kernels use. Kernels are
// chosen once, when a layer is built, from active_cpu_isa() and what was measured fastest
// (docs/kernels.md); tests and benchmarks cap or force a level with set_cpu_isa_cap() or the
// environment variable MOQE_CPU_ISA (reference | avx2 | avx512 | avx512vnni).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace moqe {

// Ordered: a higher level implies the lower ones are usable too.
enum class CpuIsa : uint8_t {
  kReference,   // portable C++: the scalar oracle's own loops
  kAvx2,        // AVX2 + FMA + F16C
  kAvx512,      // + AVX-512 F and BW: exact mode's decode kernels, 16 lanes
  kAvx512Vnni,  // + AVX-512 VNNI: fast mode's integer dot products
};

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false, avxvnni = false;
};

const CpuFeatures& cpu_features();
// The best level this CPU (and this build) supports.
CpuIsa best_cpu_isa();
// min(best_cpu_isa(), the cap from set_cpu_isa_cap or MOQE_CPU_ISA): the highest level layers
// may use.
CpuIsa active_cpu_isa();
// The cap set by set_cpu_isa_cap or MOQE_CPU_ISA; nullopt when none is: each kernel family then
// takes the level measured fastest for it among those this CPU has (docs/kernels.md: AVX-512's
// decode kernels are selected only under an explicit cap, having measured slower than AVX2's).
// A cap applies to layers built from now on (not thread-safe against concurrent builds).
void set_cpu_isa_cap(std::optional<CpuIsa> cap);
std::optional<CpuIsa> cpu_isa_cap();
std::string_view to_string(CpuIsa isa);
std::optional<CpuIsa> parse_cpu_isa(std::string_view s);

}  // namespace moqe
