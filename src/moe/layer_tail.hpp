// The parts of an MoE layer after the routed experts, shared by MoELayer and the expert-parallel
// layer (which keeps them replicated on every rank): Switch pass-through tokens, the output bias,
// shared experts and the PR-MoE residual MLP.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "moqe/moe/moe_layer.hpp"

namespace moqe::detail {

struct LayerTailBuffers {
  int64_t max_tokens = 0;
  std::vector<float>* scratch = nullptr;          // max_tokens x 2 I (the largest dense MLP)
  std::vector<float>* extra = nullptr;            // 2 x max_tokens x H
  std::vector<int32_t>* active_tokens = nullptr;  // capacity max_tokens
};

// Checks a routing the caller computed (MoeRunOptions::routing) for a run of `tokens` tokens over
// `num_experts` experts: sizes, kept slots naming experts in range with finite weights.
void check_given_routing(const Routing& r, int64_t tokens, int64_t num_experts,
                         std::string_view who);

// Checks the shared experts and the residual MLP of a layer of hidden size `hidden` (messages
// begin with `who`); returns the largest intermediate size among them (0 when there are none).
int64_t check_layer_tail(std::span<const SharedExpert> shared,
                         const std::optional<ResidualMLP>& residual, int64_t hidden,
                         std::string_view who);
// The weights a layer holds: its (local) experts, shared experts, residual MLP and router.
LayerStats layer_stats(const ExpertGroup& experts, std::span<const SharedExpert> shared,
                       const std::optional<ResidualMLP>& residual, const Router& router);
// Sizes the tail's buffers for max_tokens tokens (nothing when there is no tail).
void reserve_layer_tail(bool has_tail, int64_t max_tokens, int64_t hidden, int64_t max_intermediate,
                        std::vector<float>& scratch, std::vector<float>& extra,
                        std::vector<int32_t>& active_tokens);

// y holds the combined routed experts' outputs for x; adds the rest of the layer.
void finish_layer(MatrixView<const float> x, MatrixView<float> y, const Routing& routing,
                  std::span<const SharedExpert> shared, const std::optional<ResidualMLP>& residual,
                  std::span<const float> output_bias, std::span<const uint8_t> active,
                  const LayerTailBuffers& buffers, int num_threads);

}  // namespace moqe::detail
