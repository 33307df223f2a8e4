// moqe's quantized checkpoint format (DESIGN.md section 4), plain safetensors: for a weight X,
// X.qweight (U8 [N, packed bytes per row]), X.scales (F16/F32 [N, K/G]), X.zeros (U8, asym only),
// and metadata "moqe.format" = "1" and "moqe.scheme.X" = {"bits", "mode", "group_size", "shape",
// "scale_dtype", "code_offset"}.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe {

inline constexpr std::string_view kFormatKey = "moqe.format";
inline constexpr std::string_view kFormatVersion = "1";
inline constexpr std::string_view kSchemeKeyPrefix = "moqe.scheme.";

struct StoredScheme {
  QuantScheme scheme;  // group_size as stored (resolved: K for per-channel)
  int64_t rows = 0;
  int64_t cols = 0;
};

// The JSON recorded for a quantized matrix.
std::string scheme_to_json(const QuantizedMatrix& q);
// Parses and validates a scheme JSON; `what` names the file and tensor in errors.
StoredScheme parse_scheme_json(std::string_view json, std::string_view what);

// Adds X.qweight, X.scales, [X.zeros] and the metadata for X.
void add_quantized(SafetensorsWriter& writer, const std::string& name, const QuantizedMatrix& q);

// True when the checkpoint records weight `name` as moqe-quantized.
bool is_quantized(const Checkpoint& ckpt, std::string_view name);
// Names of all quantized weights, sorted.
std::vector<std::string> quantized_weight_names(const Checkpoint& ckpt);
// Loads quantized weight `name`, checking every part's dtype and shape against its scheme.
QuantizedMatrix load_quantized(const Checkpoint& ckpt, std::string_view name);

// True for the companion tensors of a quantized weight or of an fp8 block-scaled weight
// (X.qweight, X.scales, X.zeros, X_scale_inv) that load_weight_f32 folds into X.
bool is_companion_tensor(const Checkpoint& ckpt, std::string_view name);

// A 2-D weight as fp32, whatever its storage: F32/F16/BF16, moqe-quantized (dequantized), or
// F8_E4M3 with a "<name>_scale_inv" F32 tensor of 128x128 block scales (DeepSeek-V3).
struct DenseWeight {
  std::vector<float> values;
  int64_t rows = 0;
  int64_t cols = 0;
};
DenseWeight load_weight_f32(const Checkpoint& ckpt, std::string_view name, int num_threads = 0);
// Shape [rows, cols] of a 2-D weight in any of those storages.
std::vector<int64_t> weight_shape(const Checkpoint& ckpt, std::string_view name);

}  // namespace moqe
