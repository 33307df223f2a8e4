// Element types of safetensors files, their names and sizes, and conversion of a tensor's bytes
// (possibly unaligned) to fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace moqe {

enum class DType : uint8_t {
  kBool,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};

// "F32", "BF16", ... as safetensors spells them.
std::string_view dtype_name(DType t);
std::optional<DType> parse_dtype(std::string_view name);
// Bytes per element.
size_t dtype_size(DType t);
// True for the types to_float accepts: F32, F16, BF16, F64, F8_E4M3, F8_E5M2, and integer types.
bool dtype_is_convertible(DType t);
bool dtype_is_float(DType t);

// Converts n elements stored little-endian at `bytes` (any alignment) to fp32 in `out`.
// Throws moqe::Error for a type that is not convertible.
void to_float(DType t, const std::byte* bytes, size_t n, float* out);

// The fp8 formats of OCP 8-bit floating point (E4M3 finite-only "fn" with NaN at 0x7f/0xff;
// E5M2 IEEE-like).
float fp8_e4m3_to_float(uint8_t v);
float fp8_e5m2_to_float(uint8_t v);

}  // namespace moqe
