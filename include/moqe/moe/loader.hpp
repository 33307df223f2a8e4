// Build an MoELayer from a Hugging Face checkpoint (original F32/F16/BF16/F8 weights or
// moqe-quantized ones, single or sharded) and its config.json, for the families mixtral,
// qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 and switch. Per-expert tensor names and
// the fused layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) are accepted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "moqe/io/checkpoint.hpp"
#include "moqe/moe/moe_layer.hpp"

namespace moqe {

enum class Family : uint8_t {
  kMixtral,
  kQwen2Moe,
  kQwen3Moe,
  kOlmoe,
  kDeepSeekV2,
  kDeepSeekV3,
  kSwitch,
};

std::string_view to_string(Family f);
std::optional<Family> parse_family(std::string_view s);
// "mixtral, qwen2_moe, ..." for messages.
std::string supported_families();

// What the loader reads from config.json (missing keys take the Hugging Face defaults of the
// family's configuration class).
struct MoeConfig {
  Family family = Family::kMixtral;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  bool norm_topk_prob = false;
  Activation activation = Activation::kSilu;
  TopkMethod topk_method = TopkMethod::kGreedy;  // deepseek_v2
  int64_t n_group = 1;
  int64_t topk_group = 1;
  float routed_scaling_factor = 1.0f;
  int64_t n_shared_experts = 0;  // deepseek
  int64_t expert_capacity = 0;   // switch
};

// Parses config.json for `family`. Errors name the file and the key.
MoeConfig read_moe_config(const std::filesystem::path& config_json, Family family);

struct LoadOptions {
  bool fuse_gate_up = true;  // fuse gate and up into one matrix where their storage allows
  int num_threads = 0;
  // Switch tokens over capacity: p_max * x (DESIGN.md; transformers 4.x) or 0 (transformers 5.x).
  bool switch_passthrough = true;
  // kFast: quantized experts take int8 activations (opt-in; see gemm/linear.hpp).
  Numerics numerics = Numerics::kExact;
};

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
  int64_t hidden = 0;
};
MoeLayerParts load_moe_parts(const Checkpoint& ckpt, std::string_view prefix,
                             const MoeConfig& config, const LoadOptions& options = {},
                             std::optional<std::span<const int64_t>> experts = std::nullopt);

// The config.json beside a checkpoint file or inside a checkpoint directory.
std::filesystem::path default_config_path(const std::filesystem::path& weights);

}  // namespace moqe
