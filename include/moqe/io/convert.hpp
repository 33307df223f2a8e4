// Whole-checkpoint conversion, shared by the `moqe` tool and applications: quantize the matching
// 2-D weights of a checkpoint into moqe's format (copying everything else through unchanged), or
// dequantize a moqe checkpoint back to F32.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/quant/adaptive.hpp"

namespace moqe {

// How each matrix's group size is chosen.
enum class GroupPolicy {
  kDefault,     // 128 where it divides K, else per-channel
  kFixed,       // ConvertOptions::group_size; a K it does not divide is an error naming the tensor
  kPerChannel,  // G = K
  kAdaptive,    // moqe's adaptive rule (quant/adaptive.hpp)
};

// Expert weights of every MoE family (docs/families.md): per-expert matrices (w1/w2/w3,
// gate/up/down_proj, Switch wi/wo) and fused expert tensors (experts.gate_up_proj/down_proj,
// input_linear/output_linear, DBRX's experts.mlp.w1/v1/w2). Routers, biases, norms, embeddings,
// attention and shared experts do not match.
std::string_view default_include_regex();

// How a fused expert tensor holds its experts (moe/loader.hpp's expert_stack for the checkpoint's
// family), or nullopt for a plain tensor.
using ExpertStackFn = std::function<std::optional<ExpertStack>(std::string_view name,
                                                               std::span<const int64_t> shape)>;

// The defaults that depend on the width (docs/design.md, "Quantization methods"): at 2 and 3 bits
// asym levels chosen by the search (sym's 3 or 7 levels and round-to-nearest lose too much
// there), at 4 and 8 bits sym with round-to-nearest (the reference numerics).
QuantMode default_mode(int bits);
QuantMethod default_method(int bits);

struct ConvertOptions {
  int bits = 4;
  std::optional<QuantMode> mode;      // unset: default_mode(bits)
  std::optional<QuantMethod> method;  // unset: default_method(bits)
  ScaleType scale_type = ScaleType::kF16;
  GroupPolicy group_policy = GroupPolicy::kDefault;
  int64_t group_size = 128;                            // for kFixed
  AdaptiveOptions adaptive;                            // for kAdaptive
  std::string include_regex{default_include_regex()};  // ECMAScript, searched in the name
  std::string exclude_regex;                           // empty: exclude nothing
  int num_threads = 0;
  // Fused expert tensors that match are quantized per expert; without this function (no
  // config.json says the family), a matching fused tensor is an error naming it.
  ExpertStackFn expert_stack;
};

struct TensorReport {
  std::string name;
  std::vector<int64_t> shape;
  std::string input_dtype;
  bool quantized = false;
  QuantScheme scheme;                      // when quantized
  QuantMethod method = QuantMethod::kRtn;  // when quantized (not kept)
  int64_t group_size = 0;                  // resolved, when quantized
  ErrorStats error;                        // when quantized
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  double bits_per_weight = 0;  // exact, from bytes_out
  std::string note;            // why a matching tensor was not quantized, or adaptive detail
  // Another tool's quantized weight (GPTQ, AWQ, compressed-tensors) rewritten in moqe's format
  // with its own codes, scales and zero points: lossless, whatever the options ask; `error` is
  // not measured (there is no original to compare with).
  bool kept = false;
};

struct ConvertReport {
  std::vector<TensorReport> tensors;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
  int64_t quantized_count = 0;
  int64_t quantized_bytes_in = 0;   // bytes of the quantized tensors before
  int64_t quantized_bytes_out = 0;  // and after
  double seconds = 0;
};

struct ConvertProgress {
  size_t index = 0;  // tensors done so far
  size_t total = 0;
  std::string_view name;  // the tensor being processed
};
using ProgressFn = std::function<void(const ConvertProgress&)>;

// Quantizes `input` into `output` (one safetensors file, written atomically). Throws moqe::Error
// (and leaves no output) on any failure: a bad regex, a NaN weight, a group size that does not
// divide K, an unreadable tensor, a fused expert tensor of unknown layout, no tensor matched.
ConvertReport quantize_checkpoint(const Checkpoint& input, const std::filesystem::path& output,
                                  const ConvertOptions& options, const ProgressFn& progress = {});

// Writes every moqe-quantized weight of `input` as an F32 tensor of its original name; other
// tensors are copied through unchanged and moqe's metadata keys are dropped.
ConvertReport dequantize_checkpoint(const Checkpoint& input, const std::filesystem::path& output,
                                    int num_threads = 0, const ProgressFn& progress = {});

// The report as JSON (what `moqe quantize --report` writes).
std::string report_to_json(const ConvertReport& report);

}  // namespace moqe
