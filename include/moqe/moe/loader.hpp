// Build an MoELayer from a Hugging Face checkpoint (original F32/F16/BF16/F8 weights or
// moqe-quantized ones, single or sharded) and its config.json, for every family of
// moe/family.hpp: the family comes from config.json's model_type, and each family is computed as
// transformers' modeling code computes it (docs/families.md).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/io/checkpoint.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/moe/family.hpp"
#include "moqe/moe/moe_layer.hpp"

namespace moqe {

// What the loader reads from config.json: keys that are missing take the defaults of the
// family's configuration class in transformers; a key the family needs that has no default there
// is an error naming it.
struct MoeConfig {
  Family family = Family::kMixtral;
  std::string model_type;  // as config.json names it ("" when it has none)
  // Kind, experts, top-k and the family's routing options; the gate weight and the biases come
  // from the checkpoint.
  RouterConfig router;
  Activation activation = Activation::kSilu;
  std::optional<ClampedSwiglu> swiglu;  // gpt-oss
  bool shared = false;                  // the layer has a shared expert
  SharedCombine shared_combine = SharedCombine::kAdd;
  bool shared_biases = false;  // DeepSeek-V2 mlp_bias, ERNIE use_bias: the shared expert's linears
  bool correction_bias = false;  // the family's selection bias is present (and required)
  bool router_bias = false;      // the router has a bias (gpt-oss; Switch with router_bias)
  // HunYuan: num_experts / moe_topk given per layer (empty: the router's values hold for every
  // layer); the loader picks the layer's entry from the prefix.
  std::vector<int64_t> layer_num_experts, layer_top_k;

  int64_t num_experts() const { return router.num_experts; }
  int64_t top_k() const { return router.top_k; }
  // The configuration of the layer at `prefix` (resolves per-layer lists; errors name the key).
  MoeConfig for_layer(std::string_view prefix) const;
};

// The family config.json describes: its model_type (or, when that is absent, its architectures).
// An unknown or missing model_type is an error naming the file, the value and the supported ones.
Family detect_family(const std::filesystem::path& config_json);

// Parses config.json for the family it names.
MoeConfig read_moe_config(const std::filesystem::path& config_json);
// Parses config.json as `family`. A model_type that names another family is an error naming
// both, unless allow_other_model_type (custom models that reuse a family's layer).
MoeConfig read_moe_config(const std::filesystem::path& config_json, Family family,
                          bool allow_other_model_type = false);

struct LoadOptions {
  bool fuse_gate_up = true;  // fuse gate and up into one matrix where their storage allows
  int num_threads = 0;
  // Switch tokens over capacity: 0 (transformers 5.x, the default) or p_max * x (transformers 4.x).
  bool switch_passthrough = false;
  // kFast: quantized experts take int8 activations (opt-in; see gemm/linear.hpp).
  Numerics numerics = Numerics::kExact;
  // A tensor under the layer's prefix that the family does not use is an error listing it,
  // unless this is set.
  bool allow_unused_tensors = false;
};

// One 2-D weight of a checkpoint as a layer, whatever its storage: moqe-quantized or another
// tool's (GPTQ, AWQ, compressed-tensors: docs/formats.md) with `numerics`, F16/BF16 kept at 16
// bits, F32 or FP8 as fp32. For the projections around the MoE layers (attention, dense MLPs).
QuantizedLinear load_linear(const Checkpoint& ckpt, std::string_view name,
                            Numerics numerics = Numerics::kExact);

// The layer at `prefix` (e.g. "model.layers.0.block_sparse_moe" or "model.layers.1.mlp").
// A missing or mis-shaped tensor is an error naming it and both shapes. Quantized weights are
// checked (a non-finite scale is an error naming row and group); unquantized ones are loaded as
// they are, not scanned for NaN or Inf: a NaN weight gives NaN outputs for the tokens routed to
// its expert only.
MoELayer load_moe_layer(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& config,
                        const LoadOptions& options = {});

// The parts of that layer, with only the routed experts listed in `experts` (all when absent), in
// that order: the expert-parallel loader reads one rank's experts this way and never touches the
// others' tensors.
struct MoeLayerParts {
  Router router;
  std::vector<std::shared_ptr<const ExpertMLP>> experts;
  std::vector<SharedExpert> shared;
  std::vector<float> output_bias;  // JetMoE
  int64_t hidden = 0;
};
MoeLayerParts load_moe_parts(const Checkpoint& ckpt, std::string_view prefix,
                             const MoeConfig& config, const LoadOptions& options = {},
                             std::optional<std::span<const int64_t>> experts = std::nullopt);

// A layer's experts as moqe-quantized matrices, for backends that upload codes (the CUDA layer):
// gate (empty for MLP experts), up and down per expert, in expert order. Loading one is an error
// naming the tensor when a weight is not moqe-quantized, or when the experts have biases.
struct QuantizedExperts {
  std::vector<QuantizedMatrix> gate, up, down;
};
struct QuantizedLayer {
  Router router;
  QuantizedExperts experts;
  std::optional<QuantizedExperts> shared;  // one shared expert
  std::vector<float> shared_gate;          // [H] or empty
  std::vector<float> output_bias;          // [H] or empty
  int64_t hidden = 0;
};
QuantizedLayer load_quantized_layer(const Checkpoint& ckpt, std::string_view prefix,
                                    const MoeConfig& config, const LoadOptions& options = {});

// How tensor `name` (of shape `shape`) of a checkpoint of config's family holds several experts'
// matrices (transformers' fused expert tensors), or nullopt when it is not one. `moqe quantize`
// quantizes such a tensor per expert.
std::optional<ExpertStack> expert_stack(const MoeConfig& config, std::string_view name,
                                        std::span<const int64_t> shape);

// The config.json beside a checkpoint file or inside a checkpoint directory.
std::filesystem::path default_config_path(const std::filesystem::path& weights);

}  // namespace moqe
