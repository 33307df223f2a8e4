#include "moqe/io/dtype.hpp"

#include <array>
#include <bit>
#include <cstring>
#include <type_traits>

#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"

namespace moqe {
namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};

// Indexed by the enum's value; the static_assert below keeps the two in step.
constexpr std::array<DTypeInfo, 17> kDTypes = {{
    {DType::kBool, "BOOL", 1},
    {DType::kU8, "U8", 1},
    {DType::kI8, "I8", 1},
    {DType::kF8_E5M2, "F8_E5M2", 1},
    {DType::kF8_E4M3, "F8_E4M3", 1},
    {DType::kF8_E8M0, "F8_E8M0", 1},
    {DType::kI16, "I16", 2},
    {DType::kU16, "U16", 2},
    {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},
    {DType::kI32, "I32", 4},
    {DType::kU32, "U32", 4},
    {DType::kF32, "F32", 4},
    {DType::kC64, "C64", 8},
    {DType::kF64, "F64", 8},
    {DType::kI64, "I64", 8},
    {DType::kU64, "U64", 8},
}};

constexpr bool table_matches_enum() {
  for (size_t i = 0; i < kDTypes.size(); ++i) {
    if (static_cast<size_t>(kDTypes[i].type) != i) return false;
  }
  return static_cast<size_t>(DType::kU64) + 1 == kDTypes.size();
}
static_assert(table_matches_enum());

const DTypeInfo& info_of(DType t) {
  const auto i = static_cast<size_t>(t);
  MOQE_CHECK(i < kDTypes.size(), "invalid DType value {}", i);
  return kDTypes[i];
}

template <class U>
constexpr U byte_swap(U v) {
  U r = 0;
  for (size_t i = 0; i < sizeof(U); ++i) {
    r = static_cast<U>((r << 8) | (v & 0xff));
    v = static_cast<U>(v >> 8);
  }
  return r;
}

// Loads a little-endian T from any address: the data of a mapped file carries no alignment
// guarantee, so a typed pointer would be undefined behaviour.
template <class T>
T load_le(const std::byte* p) {
  using U = std::conditional_t<
      sizeof(T) == 1, uint8_t,
      std::conditional_t<sizeof(T) == 2, uint16_t,
                         std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;
  static_assert(sizeof(T) == sizeof(U));
  U u;
  std::memcpy(&u, p, sizeof u);
  if constexpr (std::endian::native == std::endian::big) u = byte_swap(u);
  return std::bit_cast<T>(u);
}

template <class T, class F>
void convert(const std::byte* bytes, size_t n, float* out, F&& f) {
  for (size_t i = 0; i < n; ++i) out[i] = f(load_le<T>(bytes + i * sizeof(T)));
}

template <class T>
void convert_value(const std::byte* bytes, size_t n, float* out) {
  convert<T>(bytes, n, out, [](T v) { return static_cast<float>(v); });
}

constexpr float e4m3_value(uint8_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t e = (v >> 3) & 0xfu;
  const uint32_t m = v & 0x7u;
  if (e == 0xf && m == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);  // the only NaN
  if (e == 0) {
    // Subnormal: m * 2^-9, exact in fp32.
    const float mag = static_cast<float>(m) * (1.0f / 512.0f);
    return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | sign);
  }
  return std::bit_cast<float>(sign | ((e - 7 + 127) << 23) | (m << 20));
}

constexpr std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) t[i] = e4m3_value(static_cast<uint8_t>(i));
  return t;
}
constexpr std::array<float, 256> kE4M3 = make_e4m3_table();

}  // namespace

std::string_view dtype_name(DType t) { return info_of(t).name; }

std::optional<DType> parse_dtype(std::string_view name) {
  for (const DTypeInfo& d : kDTypes) {
    if (d.name == name) return d.type;
  }
  return std::nullopt;
}

size_t dtype_size(DType t) { return info_of(t).size; }

bool dtype_is_convertible(DType t) {
  return t != DType::kC64 && t != DType::kF8_E8M0 && static_cast<size_t>(t) < kDTypes.size();
}

// Real floating types that to_float accepts: code that gates on this may convert right after.
bool dtype_is_float(DType t) {
  switch (t) {
    case DType::kF8_E5M2:
    case DType::kF8_E4M3:
    case DType::kF16:
    case DType::kBF16:
    case DType::kF32:
    case DType::kF64:
      return true;
    default:
      return false;
  }
}

float fp8_e4m3_to_float(uint8_t v) { return kE4M3[v]; }

// E5M2 is the top byte of an IEEE binary16.
float fp8_e5m2_to_float(uint8_t v) { return half_bits_to_float(static_cast<uint16_t>(v << 8)); }

void to_float(DType t, const std::byte* bytes, size_t n, float* out) {
  switch (t) {
    case DType::kF32:
      convert<float>(bytes, n, out, [](float v) { return v; });
      return;
    case DType::kF16:
      convert<uint16_t>(bytes, n, out, [](uint16_t v) { return half_bits_to_float(v); });
      return;
    case DType::kBF16:
      convert<uint16_t>(bytes, n, out, [](uint16_t v) { return bf16_bits_to_float(v); });
      return;
    case DType::kF64:
      convert_value<double>(bytes, n, out);
      return;
    case DType::kF8_E4M3:
      convert<uint8_t>(bytes, n, out, [](uint8_t v) { return kE4M3[v]; });
      return;
    case DType::kF8_E5M2:
      convert<uint8_t>(bytes, n, out, [](uint8_t v) { return fp8_e5m2_to_float(v); });
      return;
    case DType::kBool:
      convert<uint8_t>(bytes, n, out, [](uint8_t v) { return v != 0 ? 1.0f : 0.0f; });
      return;
    case DType::kU8:
      convert_value<uint8_t>(bytes, n, out);
      return;
    case DType::kI8:
      convert_value<int8_t>(bytes, n, out);
      return;
    case DType::kI16:
      convert_value<int16_t>(bytes, n, out);
      return;
    case DType::kU16:
      convert_value<uint16_t>(bytes, n, out);
      return;
    case DType::kI32:
      convert_value<int32_t>(bytes, n, out);
      return;
    case DType::kU32:
      convert_value<uint32_t>(bytes, n, out);
      return;
    case DType::kI64:
      convert_value<int64_t>(bytes, n, out);
      return;
    case DType::kU64:
      convert_value<uint64_t>(bytes, n, out);
      return;
    case DType::kC64:
    case DType::kF8_E8M0:
      break;
  }
  MOQE_FAIL("dtype {} cannot be converted to float", dtype_name(t));
}

}  // namespace moqe
