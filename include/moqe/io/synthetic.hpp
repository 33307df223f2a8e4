// Synthetic MoE checkpoints with realistic weight statistics (Gaussian with a few outlier input
// channels, as trained weights have), for demos, tests and benchmarks without a download.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "moqe/io/dtype.hpp"

namespace moqe {

struct SyntheticMoeSpec {
  std::string family = "mixtral";  // tensor naming: mixtral (w1/w2/w3) for now
  int64_t hidden = 1024;
  int64_t intermediate = 3584;
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t layers = 1;
  DType dtype = DType::kBF16;       // F32, F16 or BF16
  double outlier_fraction = 0.005;  // input channels scaled by outlier_scale
  float outlier_scale = 10.0f;
  uint32_t seed = 0;
  int shards = 1;  // > 1 writes model-0000i-of-0000n + index
};

// Fills w [n, k] with N(0, 1/sqrt(k)) weights whose outlier input channels are scaled.
std::vector<float> synthetic_weights(int64_t n, int64_t k, uint32_t seed,
                                     double outlier_fraction = 0.005, float outlier_scale = 10.0f);

// Writes the checkpoint (router, experts, a norm and an attention projection per layer) and a
// config.json into `dir` (created if needed). Returns the paths written.
std::vector<std::filesystem::path> write_synthetic_moe(const std::filesystem::path& dir,
                                                       const SyntheticMoeSpec& spec);

}  // namespace moqe
