#include "moqe/quant/scheme.hpp"

#include <fmt/core.h>

#include <algorithm>

#include "moqe/core/error.hpp"

namespace moqe {

double QuantScheme::bits_per_weight(int64_t k) const {
  const int64_t g = resolved_group_size(k);
  if (g <= 0) return bits;
  return bits + static_cast<double>(scale_bits() + (has_zeros() ? 8 : 0)) / static_cast<double>(g);
}

std::string QuantScheme::to_string() const {
  const std::string g = group_size == kPerChannel ? "channel" : fmt::format("g{}", group_size);
  return fmt::format("int{} {} {} {}", bits, moqe::to_string(mode), g, moqe::to_string(scale_type));
}

std::string_view to_string(QuantMode mode) {
  switch (mode) {
    case QuantMode::kSym:
      return "sym";
    case QuantMode::kSymFull:
      return "sym_full";
    case QuantMode::kAsym:
      return "asym";
  }
  return "?";
}

std::string_view to_string(ScaleType type) { return type == ScaleType::kF16 ? "f16" : "f32"; }

std::optional<QuantMode> parse_quant_mode(std::string_view s) {
  for (QuantMode m : kSupportedModes) {
    if (to_string(m) == s) return m;
  }
  return std::nullopt;
}

std::optional<ScaleType> parse_scale_type(std::string_view s) {
  if (s == "f16" || s == "F16") return ScaleType::kF16;
  if (s == "f32" || s == "F32") return ScaleType::kF32;
  return std::nullopt;
}

std::string check_scheme(const QuantScheme& scheme, int64_t k) {
  if (std::find(kSupportedBits.begin(), kSupportedBits.end(), scheme.bits) ==
      kSupportedBits.end()) {
    return fmt::format("unsupported bits {}; supported: 2, 3, 4, 8", scheme.bits);
  }
  if (std::find(kSupportedModes.begin(), kSupportedModes.end(), scheme.mode) ==
      kSupportedModes.end()) {
    return fmt::format("unsupported mode {}; supported: sym, sym_full, asym",
                       static_cast<int>(scheme.mode));
  }
  if (scheme.scale_type != ScaleType::kF16 && scheme.scale_type != ScaleType::kF32) {
    return "unsupported scale type; supported: f16, f32";
  }
  if (k <= 0) return fmt::format("unsupported K = {}: rows must hold at least one weight", k);
  const int64_t g = scheme.group_size;
  if (g == kPerChannel || g == k) return {};
  if (g < 0 || g % kGroupQuantum != 0 || k % g != 0) {
    return fmt::format(
        "unsupported group_size {} for K = {}: use a multiple of {} that divides K, or channel", g,
        k, kGroupQuantum);
  }
  return {};
}

void validate_scheme(const QuantScheme& scheme, int64_t k, std::string_view what) {
  const std::string reason = check_scheme(scheme, k);
  MOQE_CHECK(reason.empty(), "{}: {}", what, reason);
}

}  // namespace moqe
