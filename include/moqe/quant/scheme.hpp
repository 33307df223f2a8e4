// Quantization schemes (docs/design.md): bit width, mode (sym | sym_full | asym), group size
// along K (or per channel) and the scale storage type, with the one table of supported values.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moqe {

enum class QuantMode : uint8_t {
  kSym,      // s = max|w| / (2^(b-1) - 1), codes in [-(2^(b-1)-1), 2^(b-1)-1]
  kSymFull,  // s = v / -(2^(b-1)), v the value of largest magnitude; all 2^b levels
  kAsym,     // s = (hi - lo) / (2^b - 1), zero point z, codes in [0, 2^b - 1]
};

enum class ScaleType : uint8_t { kF16, kF32 };

// group_size value meaning one group per row (G = K).
inline constexpr int64_t kPerChannel = 0;

// The supported configurations, in one place: everything else (argument parsing, validation,
// messages) is derived from these lists.
inline constexpr std::array<int, 4> kSupportedBits = {2, 3, 4, 8};
inline constexpr std::array<QuantMode, 3> kSupportedModes = {QuantMode::kSym, QuantMode::kSymFull,
                                                             QuantMode::kAsym};
// Group sizes must be multiples of this (or the whole row).
inline constexpr int64_t kGroupQuantum = 32;

struct QuantScheme {
  int bits = 4;
  QuantMode mode = QuantMode::kSym;
  int64_t group_size = 128;  // kPerChannel for one group per row
  ScaleType scale_type = ScaleType::kF16;

  int64_t resolved_group_size(int64_t k) const {
    return group_size == kPerChannel ? k : group_size;
  }
  bool has_zeros() const { return mode == QuantMode::kAsym; }
  int scale_bits() const { return scale_type == ScaleType::kF16 ? 16 : 32; }
  // docs/design.md: b + (bits of s [+ bits of z]) / G, for a row of k weights.
  double bits_per_weight(int64_t k) const;
  // Offset between the stored (unsigned) code and the signed level for sym modes: 2^(b-1).
  int code_offset() const { return mode == QuantMode::kAsym ? 0 : 1 << (bits - 1); }
  // "int4 sym g128 f16" (or "... channel ...").
  std::string to_string() const;
  friend bool operator==(const QuantScheme&, const QuantScheme&) = default;
};

std::string_view to_string(QuantMode mode);
std::string_view to_string(ScaleType type);
std::optional<QuantMode> parse_quant_mode(std::string_view s);
std::optional<ScaleType> parse_scale_type(std::string_view s);

// Empty when the scheme can quantize rows of k weights, else the reason, naming the value and
// what is supported ("unsupported group_size 96 for K = 4096: use a multiple of 32 that divides
// K, or channel").
std::string check_scheme(const QuantScheme& scheme, int64_t k);
// Throws moqe::Error with check_scheme's reason, prefixed by `what` (a tensor name).
void validate_scheme(const QuantScheme& scheme, int64_t k, std::string_view what);

}  // namespace moqe
