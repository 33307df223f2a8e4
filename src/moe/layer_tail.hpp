// The parts of an MoE layer after the routed experts, shared by MoELayer and the expert-parallel
// layer (which keeps them replicated on every rank): Switch pass-through tokens, shared experts
// and the PR-MoE residual MLP.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "moqe/moe/moe_layer.hpp"

namespace moqe::detail {

struct LayerTailBuffers {
  int64_t max_tokens = 0;
  std::vector<float>* scratch = nullptr;          // max_tokens x 2 I (the largest dense MLP)
  std::vector<float>* extra = nullptr;            // 2 x max_tokens x H
  std::vector<int32_t>* active_tokens = nullptr;  // capacity max_tokens
};

// y holds the combined routed experts' outputs for x; adds the rest of the layer.
void finish_layer(MatrixView<const float> x, MatrixView<float> y, const Routing& routing,
                  std::span<const SharedExpert> shared, const std::optional<ResidualMLP>& residual,
                  std::span<const uint8_t> active, const LayerTailBuffers& buffers,
                  int num_threads);

}  // namespace moqe::detail
