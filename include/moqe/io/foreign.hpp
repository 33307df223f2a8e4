// Other tools' quantized checkpoints, read in place (docs/formats.md): GPTQ (v1 and v2 zero
// points, act-order g_idx), AWQ (GEMM packing) and compressed-tensors (pack-quantized and 8-bit
// naive/int-quantized). Their integer codes, scales and zero points map exactly onto moqe's
// numeric core, so a loaded weight is a QuantizedMatrix that moqe's kernels run unchanged.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace moqe {

class Checkpoint;
class QuantizedMatrix;

enum class ForeignFormat : uint8_t { kNone, kGptq, kAwq, kCompressedTensors };

std::string_view to_string(ForeignFormat f);

// One compressed-tensors config group: which modules it quantizes and how.
struct CompressedTensorsGroup {
  std::vector<std::string> targets;  // "Linear", a module name, or "re:<regex>"
  int bits = 0;
  bool symmetric = true;
  std::string strategy;    // group | channel | tensor
  int64_t group_size = 0;  // strategy group
  std::string format;      // pack-quantized | naive-quantized | int-quantized; "": from the tensors
};

// config.json's quantization_config (or compression_config), as far as the readers need it.
struct QuantizationConfig {
  ForeignFormat format = ForeignFormat::kNone;
  std::string method;            // quant_method as written ("" without a quantization_config)
  std::filesystem::path source;  // the config.json it came from
  int bits = 0;                  // GPTQ, AWQ
  int64_t group_size = 0;        // GPTQ, AWQ (-1: one group per row)
  bool gptq_v2 = false;          // GPTQ: zero points stored as they are (not minus one)
  // GPTQ v1 at 3 bits written by GPTQModel before 7.0 (meta.quantizer "gptqmodel:<7"): its zero
  // points were offset by three per-word constants rather than by one per field.
  bool gptq_int3_word_offsets = false;
  bool ct_padded = false;  // compressed-tensors before 0.18: 32 / b codes per int32
  std::vector<CompressedTensorsGroup> groups;  // compressed-tensors, in config order
  std::vector<std::string> ignore;             // compressed-tensors
};

// The quantization_config of a config.json (format kNone, method "" when it has none). A format
// moqe does not read (fp8, mxfp4, bitsandbytes, gptq's marlin or planar layouts, AWQ's gemv...)
// gives kNone with `method` naming it; a malformed one is an error naming the file and key.
QuantizationConfig read_quantization_config(const std::filesystem::path& config_json);

// Weight `name` ("X.weight") is stored in the checkpoint's foreign format (its tensors exist).
bool is_foreign_quantized(const Checkpoint& ckpt, std::string_view name);
// Its shape [N, K].
std::vector<int64_t> foreign_shape(const Checkpoint& ckpt, std::string_view name);
// Reads it as a QuantizedMatrix with the same dequantized values (exactly), checking every part:
// packing shapes, zero points, scales, g_idx. Errors name the file and tensor.
QuantizedMatrix load_foreign(const Checkpoint& ckpt, std::string_view name);
// `tensor` is one of the parts of a foreign-quantized weight (X.qweight, X.weight_packed, ...).
bool is_foreign_part(const Checkpoint& ckpt, std::string_view tensor);
// The weight ("X.weight") such a part belongs to, "" for any other tensor.
std::string foreign_part_weight(const Checkpoint& ckpt, std::string_view tensor);
// Names of every foreign-quantized weight ("X.weight"), sorted.
std::vector<std::string> foreign_weight_names(const Checkpoint& ckpt);

}  // namespace moqe
