// moqe's quantized checkpoint format (docs/formats.md), plain safetensors: for a weight X,
// X.qweight (U8 [N, packed bytes per row]), X.scales (F16/F32 [N, K/G]), X.zeros (U8, asym only),
// and metadata "moqe.format" = "1" and "moqe.scheme.X" = {"bits", "mode", "group_size", "shape",
// "scale_dtype", "code_offset"}. A fused expert tensor X (E experts' matrices in one tensor) is
// stored per expert: X.qweight [E, N, packed bytes], X.scales [E, N, K/G], X.zeros [E, N, K/G],
// its scheme adding "experts", "transposed" and "source_shape".
#pragma once

#include <cstdint>
#include <span>
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

// How a fused tensor holds E experts' weight matrices W_e [N, K]: E consecutive blocks (the
// leading dimension of a 3-D [E, A, B] tensor, or E row blocks of a 2-D [E * A, B] one), each
// W_e itself ([A, B] = [N, K]) or, transposed, its transpose ([A, B] = [K, N]).
struct ExpertStack {
  int64_t experts = 0;
  bool transposed = false;
};

struct StoredScheme {
  QuantScheme scheme;  // group_size as stored (resolved: K for per-channel)
  int64_t rows = 0;    // of one expert's matrix, for a fused expert tensor
  int64_t cols = 0;
  ExpertStack stack;                  // experts == 0: a plain matrix
  bool input_order = false;           // X.input_order I32 [K] holds the stored column order
  std::vector<int64_t> source_shape;  // a fused tensor's shape before quantization
};

// The JSON recorded for a quantized matrix.
std::string scheme_to_json(const QuantizedMatrix& q);
// Parses and validates a scheme JSON; `what` names the file and tensor in errors.
StoredScheme parse_scheme_json(std::string_view json, std::string_view what);

// Adds X.qweight, X.scales, [X.zeros] and the metadata for X.
void add_quantized(SafetensorsWriter& writer, const std::string& name, const QuantizedMatrix& q);
// The same for a fused expert tensor of shape source_shape: every expert's matrix, one scheme.
void add_quantized_experts(SafetensorsWriter& writer, const std::string& name,
                           std::span<const QuantizedMatrix> experts, const ExpertStack& stack,
                           std::vector<int64_t> source_shape);

// True when the checkpoint records weight `name` as moqe-quantized.
bool is_quantized(const Checkpoint& ckpt, std::string_view name);
// Names of all quantized weights, sorted.
std::vector<std::string> quantized_weight_names(const Checkpoint& ckpt);
// The parsed scheme of quantized weight `name` (an error naming it when there is none).
StoredScheme stored_scheme(const Checkpoint& ckpt, std::string_view name);
// Loads quantized weight `name`, checking every part's dtype and shape against its scheme. For a
// fused expert tensor, load_quantized_expert reads expert e's matrix.
QuantizedMatrix load_quantized(const Checkpoint& ckpt, std::string_view name);
QuantizedMatrix load_quantized_expert(const Checkpoint& ckpt, std::string_view name, int64_t e);

// True for the companion tensors of a quantized weight or of an fp8 block-scaled weight
// (X.qweight, X.scales, X.zeros, X_scale_inv) that load_weight_f32 folds into X.
bool is_companion_tensor(const Checkpoint& ckpt, std::string_view name);
// The weight X a companion tensor belongs to ("" for any other tensor).
std::string companion_weight(const Checkpoint& ckpt, std::string_view name);

// A 2-D weight as fp32, whatever its storage: F32/F16/BF16, moqe-quantized (dequantized), or
// F8_E4M3 with a "<name>_scale_inv" F32 tensor of 128x128 block scales (DeepSeek-V3).
struct DenseWeight {
  std::vector<float> values;
  int64_t rows = 0;
  int64_t cols = 0;
};
DenseWeight load_weight_f32(const Checkpoint& ckpt, std::string_view name, int num_threads = 0);
// Expert e's matrix W_e [N, K] of an unquantized fused expert tensor (F32, F16 or BF16), transposed
// as `stack` says; errors name the tensor.
DenseWeight load_expert_f32(const Checkpoint& ckpt, std::string_view name, const ExpertStack& stack,
                            int64_t e);
// A whole tensor as fp32 in its original layout: the shape of the tensor as stored, or for a
// quantized weight the shape it had before quantization (a fused one's source_shape).
struct DenseTensor {
  std::vector<float> values;
  std::vector<int64_t> shape;
};
DenseTensor load_tensor_f32(const Checkpoint& ckpt, std::string_view name, int num_threads = 0);
// Shape [rows, cols] of a 2-D weight in any of those storages; a fused expert tensor's shape as
// stored before quantization.
std::vector<int64_t> weight_shape(const Checkpoint& ckpt, std::string_view name);

}  // namespace moqe
