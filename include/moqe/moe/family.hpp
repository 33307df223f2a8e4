// The MoE families of transformers that moqe loads, in one table: names, the config.json
// model_type values that select each, where its tensors live and how it routes. The table drives
// family detection, the loader, the tool's help and docs/families.md (docs/families.md).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace moqe {

enum class Family : uint8_t {
  kMixtral,
  kMiniMax,
  kQwen2Moe,
  kQwen3Moe,
  kQwen3Next,
  kQwen3_5Moe,
  kOlmoe,
  kFlexOlmo,
  kDeepSeekV2,
  kDeepSeekV3,
  kGlm4Moe,
  kGlm4MoeLite,
  kDots1,
  kCohere2Moe,
  kSwitch,
  kPhimoe,
  kMiniMaxM2,
  kExaoneMoe,
  kErnie4_5Moe,
  kLfm2Moe,
  kHunYuanV1Moe,
  kAfmoe,
  kGptOss,
  kLlama4Text,
  kGraniteMoe,
  kGraniteMoeShared,
  kJetMoe,
  kDbrx,
};

// How a family stores its routed experts (names relative to the layer's prefix).
enum class ExpertLayout : uint8_t {
  // experts.{e}.<gate>.weight [I, H], experts.{e}.<up>.weight [I, H], experts.{e}.<down>.weight
  // [H, I]; transformers 5's fused experts.gate_up_proj [E, 2I, H] (gate rows first) with
  // experts.down_proj [E, H, I] is read too.
  kPerExpert,
  // experts.expert_{e}.wi.weight [I, H] and .wo.weight [H, I]: an MLP (Switch).
  kSwitch,
  // experts.gate_up_proj [E, H, 2I] with gate and up interleaved column by column and its bias
  // experts.gate_up_proj_bias [E, 2I]; experts.down_proj [E, I, H], experts.down_proj_bias [E, H].
  kGptOss,
  // experts.gate_up_proj [E, H, 2I] (gate columns first), experts.down_proj [E, I, H].
  kLlama4,
  // input_linear.weight [E, 2I, H] (gate rows first), output_linear.weight [E, H, I].
  kInputOutputLinear,
  // experts.mlp.w1, .v1, .w2 [E * I, H]: rows [e I, (e + 1) I) hold expert e's gate, up and the
  // transpose of its down projection.
  kDbrx,
};

// How a family stores its shared expert.
enum class SharedLayout : uint8_t {
  kNone,
  kGateUpDown,   // <shared>.gate_proj.weight, .up_proj.weight [Is, H], .down_proj.weight [H, Is]
  kInputOutput,  // <shared>.input_linear.weight [2 Is, H] (gate rows first), .output_linear.weight
};

struct FamilyInfo {
  Family family;
  std::string_view name;  // the --family value: transformers' model_type of the family
  // config.json model_type values (the first is `name`) and architectures that select it.
  std::span<const std::string_view> model_types;
  std::span<const std::string_view> architectures;
  std::string_view layer;  // the MoE layer's prefix in a checkpoint, for layer N
  std::string_view router;
  std::string_view router_bias;      // "" when the family has none
  std::string_view correction_bias;  // the selection bias [E] ([1, E] for ERNIE); "" when none
  ExpertLayout layout;
  std::string_view gate, up, down;  // kPerExpert: the projections' names (w1, w3, w2, ...)
  SharedLayout shared_layout;
  // The shared expert's module; "../x" names a sibling of the layer (GraniteMoeShared's
  // shared_mlp lives beside block_sparse_moe).
  std::string_view shared;
  std::string_view shared_gate;  // sigmoid gate [1, H] of the shared expert; "" when none
  std::string_view output_bias;  // [H] added to the layer's output; "" when none
  std::string_view routing;      // how it routes, in one line
  std::string_view experts;      // what its experts compute, in one line
  std::string_view config_keys;  // the config.json keys read, with transformers' defaults
};

// Every family, in the order of the table.
std::span<const FamilyInfo> families();
const FamilyInfo& family_info(Family f);

std::string_view to_string(Family f);
// A family's name or one of its model_type values.
std::optional<Family> parse_family(std::string_view s);
// "mixtral, minimax, ..." for messages.
std::string supported_families();

// The table as Markdown (docs/families.md and `moqe families`).
std::string families_markdown();

}  // namespace moqe
