// Adaptive granularity: choose the quantization group size of each matrix from its weights alone.
// This is moqe's own rule, in the spirit of FineQuant (whose exact heuristic is not public):
// among G in {K, 1024, 512, 256, 128, 64, 32} that divide K, take the largest G whose relative
// Frobenius error is within (1 + tau) of the finest group's error, or within an absolute budget.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "moqe/quant/quantized_matrix.hpp"

namespace moqe {

struct AdaptiveOptions {
  double tau = 0.10;                   // relative slack over the finest group's error
  std::optional<double> error_budget;  // if set: largest G with e(G) <= budget
  // Candidate group sizes; kPerChannel stands for K. Those that do not divide K are skipped.
  std::vector<int64_t> candidates = {kPerChannel, 1024, 512, 256, 128, 64, 32};
};

struct AdaptiveCandidate {
  int64_t group_size = 0;  // resolved (K for per-channel)
  double rel_error = 0;
  double bits_per_weight = 0;
};

struct AdaptiveResult {
  QuantizedMatrix matrix;                     // quantized with the chosen group size
  int64_t chosen_group_size = 0;              // resolved
  std::vector<AdaptiveCandidate> candidates;  // every candidate tried, largest G first
  double threshold = 0;                       // the error bound the choice was held to
  bool budget_met = true;                     // false when no candidate met error_budget
};

// `base` gives bits, mode and scale type; its group_size is ignored.
AdaptiveResult quantize_adaptive(MatrixView<const float> w, const QuantScheme& base,
                                 const AdaptiveOptions& adaptive = {},
                                 const QuantizeOptions& options = {});

// Relative Frobenius error e(G) of quantizing w with `scheme`, without keeping the result.
double relative_error(MatrixView<const float> w, const QuantScheme& scheme, int num_threads = 0,
                      QuantMethod method = QuantMethod::kRtn);

}  // namespace moqe
