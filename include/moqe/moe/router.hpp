// Top-k gating routers for every MoE family of transformers (docs/routing.md): softmax top-k,
// Mixtral, DeepSeek-V2 (greedy / group-limited), DeepSeek-V3-style sigmoid routing (correction
// bias, group top-2), top-k of the logits with a softmax or sigmoid over the chosen (gpt-oss,
// Granite-MoE, Llama 4, ...), Phi-3.5-MoE's sparsemixer, Switch (top-1, per-sequence capacity),
// task routing (Task-MoE) and expert choice. Logits are computed in fp32; ties go to the lower
// expert index.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moqe/core/view.hpp"

namespace moqe {

class QuantizedLinear;

enum class RouterKind : uint8_t {
  kSoftmaxTopK,   // p = softmax(logits); top-k of p (+ correction_bias when given); weights p,
                  // renormalized iff norm_topk_prob
  kMixtral,       // softmax_topk with renormalization always on
  kDeepSeekV2,    // softmax; greedy or group-limited greedy; times routed_scaling_factor (never
                  // renormalized, as transformers does: norm_topk_prob is ignored)
  kDeepSeekV3,    // s = sigmoid(logits); top-k of s + correction bias within the topk_group best
                  // groups (scored by their top 2); weights s, renormalized iff norm_topk_prob,
                  // times routed_scaling_factor (n_group = 1: no group limit)
  kSwitch,        // softmax top-1, per-sequence expert capacity, dropped tokens output 0 or pass
  kTask,          // a task id selects fixed experts and weights (Task-MoE)
  kExpertChoice,  // each expert takes its top tokens
  kTopKSoftmax,   // top-k of the logits; weights = softmax over the chosen logits
  kTopKSigmoid,   // top-k of the logits; weights = sigmoid of each, renormalized iff norm_topk_prob
  kSparseMixer,   // Phi-3.5-MoE's sparsemixer (inference): two experts, each weighted by its
                  // share of a softmax over the logits within jitter_eps of it (top_k is 2)
};

std::string_view to_string(RouterKind kind);
std::optional<RouterKind> parse_router_kind(std::string_view s);

enum class TopkMethod : uint8_t { kGreedy, kGroupLimitedGreedy };

// The experts and weights a task routes every token to.
struct TaskRoute {
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

struct RouterConfig {
  RouterKind kind = RouterKind::kSoftmaxTopK;
  int64_t num_experts = 0;
  int64_t top_k = 1;
  bool norm_topk_prob = false;  // softmax_topk, deepseek_v2/v3
  // DeepSeek
  TopkMethod topk_method = TopkMethod::kGreedy;  // deepseek_v2 (v3 is always group-limited)
  int64_t n_group = 1;
  int64_t topk_group = 1;
  float routed_scaling_factor = 1.0f;
  std::vector<float> correction_bias;  // [E], added for selection only (deepseek_v3, softmax_topk)
  // Added to every logit (gpt-oss, Switch with router_bias); empty: none.
  std::vector<float> router_bias;
  // Renormalization (norm_topk_prob, and kMixtral): w /= max(sum + norm_epsilon, norm_min), or by
  // the norm_p-norm of the chosen weights when norm_p != 1 (DBRX's moe_normalize_expert_weights).
  // 1e-20 is DeepSeek-V3's epsilon; it cannot change a sum above 1e-12 (the families without one).
  float norm_epsilon = 1e-20f;
  float norm_min = 0.0f;  // ERNIE 4.5's moe_norm_min
  float norm_p = 1.0f;
  // kSparseMixer: a logit l is masked when (max - l) / max(|l|, max) > 2 jitter_eps.
  float jitter_eps = 0.01f;
  // Llama 4: the routing weight scales the expert's input instead of its output.
  bool scale_input = false;
  // Capacity. Switch: expert_capacity tokens per expert per sequence (0: unlimited). Expert
  // choice: tokens per expert (0: ceil(T * top_k / E)). Any other router: capacity_factor > 0
  // admits ceil(capacity_factor * T * top_k / E) slots per expert, in token order.
  int64_t expert_capacity = 0;
  double capacity_factor = 0;
  // Switch: a token over capacity outputs 0 (transformers 5.x, where only the model's residual
  // carries it) by default, or p_max * x (transformers 4.x) when true.
  bool switch_passthrough = false;
  // Task routing: tasks[id].
  std::vector<TaskRoute> tasks;
};

// Empty when the configuration is usable, else the reason (names the value).
std::string check_router_config(const RouterConfig& config);

// The result of routing T tokens: `slots` entries per token (top_k; E for expert choice).
struct Routing {
  int64_t tokens = 0;
  int64_t slots = 0;
  int64_t num_experts = 0;
  std::vector<int32_t> ids;             // [T, slots]; -1 for an unused slot
  std::vector<float> weights;           // [T, slots]; the routing weight of each slot
  std::vector<uint8_t> kept;            // [T, slots]; 1 when the slot is computed (not dropped)
  std::vector<uint8_t> passthrough;     // [T]; Switch tokens over capacity: output weight * x
  std::vector<int64_t> expert_load;     // [E] kept slots per expert
  std::vector<int64_t> expert_dropped;  // [E] slots dropped for capacity
  std::vector<float> scratch;           // [T, E] scores, reused between calls

  int32_t id(int64_t t, int64_t j) const { return ids[t * slots + j]; }
  float weight(int64_t t, int64_t j) const { return weights[t * slots + j]; }
  // Sizes the buffers (no reallocation when they are large enough) and clears them.
  void reset(int64_t tokens, int64_t slots, int64_t num_experts);
};

struct RouteOptions {
  int num_threads = 0;
  std::span<const uint8_t> active;            // [T]; 0 = inactive token (no slots). Empty: all
  std::span<const int64_t> sequence_lengths;  // Switch capacity per sequence. Empty: one
  int32_t task_id = 0;                        // task router: the task of every token...
  std::span<const int32_t> task_ids;          // ...or one per token [T]
};

class Router {
 public:
  Router() = default;
  // gate_weight is Wg [E, H] (empty for the task router). Throws moqe::Error for a bad config or
  // a weight of the wrong size.
  Router(RouterConfig config, std::vector<float> gate_weight, int64_t hidden);

  const RouterConfig& config() const { return config_; }
  RouterKind kind() const { return config_.kind; }
  int64_t hidden() const { return hidden_; }
  int64_t num_experts() const { return config_.num_experts; }
  int64_t slots_per_token() const;
  std::span<const float> gate_weight() const { return {gate_.data(), gate_.size()}; }

  // logits [T, E] = x [T, H] . Wg^T in fp32, through moqe's dense fp32 kernels (the CPU's best
  // level; gemm/linear.hpp), plus the router bias when there is one.
  void logits(MatrixView<const float> x, MatrixView<float> out, int num_threads = 0) const;
  // Routes x [T, H] into `out` (reusing its buffers).
  void route(MatrixView<const float> x, Routing& out, const RouteOptions& options = {}) const;

 private:
  RouterConfig config_;
  std::vector<float> gate_;                             // [E, H]
  std::shared_ptr<const QuantizedLinear> gate_linear_;  // gate_ as a dense fp32 layer
  int64_t hidden_ = 0;
};

// Indices of the k largest values of v[0..n), largest first; ties go to the lower index, NaN ranks
// below every number (and NaNs among themselves by index). `excluded` (optional, n flags) marks
// entries that cannot be chosen. Writes k indices to out.
void topk_indices(const float* v, int64_t n, int64_t k, int32_t* out,
                  const uint8_t* excluded = nullptr);

}  // namespace moqe
