// Synthetic MoE checkpoints with realistic weight statistics (Gaussian with a few outlier input
// channels, as trained weights have) in the tensor layout and config.json of each supported
// family, for demos, tests and benchmarks without a download.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "moqe/io/dtype.hpp"

namespace moqe {

struct SyntheticMoeSpec {
  // mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | deepseek_v3 | switch (or
  // switch_transformers)
  std::string family = "mixtral";
  int64_t hidden = 1024;
  int64_t intermediate = 3584;  // per expert
  int64_t experts = 8;
  int64_t top_k = 2;  // switch: always 1
  int64_t layers = 1;
  // qwen2_moe: the shared expert's intermediate size; deepseek: n_shared_experts * intermediate.
  // 0: no shared expert.
  int64_t shared_intermediate = 0;
  bool norm_topk_prob = false;         // qwen2/3-moe, olmoe, deepseek (mixtral always renormalizes)
  std::string topk_method = "greedy";  // deepseek_v2: greedy | group_limited_greedy
  int64_t n_group = 1;                 // deepseek
  int64_t topk_group = 1;              // deepseek
  float routed_scaling_factor = 1.0f;  // deepseek
  int64_t expert_capacity = 64;        // switch, per sequence
  bool fused_experts = false;       // experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]
  DType dtype = DType::kBF16;       // F32, F16 or BF16 (the router and biases too)
  double outlier_fraction = 0.005;  // input channels scaled by outlier_scale
  float outlier_scale = 4.0f;
  uint32_t seed = 0;
  int shards = 1;  // > 1 writes model-0000i-of-0000n + index
};

// Fills w [n, k] with N(0, 1/sqrt(k)) weights whose outlier input channels are scaled.
std::vector<float> synthetic_weights(int64_t n, int64_t k, uint32_t seed,
                                     double outlier_fraction = 0.005, float outlier_scale = 4.0f);

// The tensor prefix of MoE layer `layer` ("model.layers.0.block_sparse_moe", ...).
std::string synthetic_moe_prefix(const SyntheticMoeSpec& spec, int64_t layer = 0);

// Writes the checkpoint (router, experts, shared experts, a norm and an attention projection per
// layer) and config.json into `dir` (created if needed). Returns the paths written.
std::vector<std::filesystem::path> write_synthetic_moe(const std::filesystem::path& dir,
                                                       const SyntheticMoeSpec& spec);

}  // namespace moqe
