// Router kernels on the GPU: fused fp32 logits -> softmax / sigmoid -> (group-limited) top-k ->
// weights, switch and capacity-factor admission in token order, and expert choice, with the
// semantics of moqe::Router (docs/routing.md) for the kinds device_router_unsupported accepts.
//
// Same rules as the host: ties to the lower index, NaN last, inactive tokens without slots,
// capacities as Router::route computes them. Not bit-identical: the logits are summed in another
// order (each within gamma_H * sum |x w| of the exact value, as the host's), exp is the device's
// expf (2 ulp), and up to 2048 experts the softmax sum is added across a warp, so weights differ
// by rounding and a near-tie (within that error) may resolve the other way.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "moqe/cuda/runtime.hpp"
#include "moqe/moe/router.hpp"

namespace moqe::cuda {

// The routing of up to max_tokens tokens, on the device (DeviceRouter::make_routing sizes it).
// route() writes every slot of its `tokens` tokens: nothing needs clearing between calls.
struct DeviceRouting {
  int64_t max_tokens = 0, slots = 0, num_experts = 0;
  int64_t tokens = 0;        // of the last route()
  DeviceBuffer ids;          // int32 [max_tokens * slots]; -1 in unchosen slots
  DeviceBuffer weights;      // float [max_tokens * slots]; 0 in unchosen slots
  DeviceBuffer kept;         // uint8 [max_tokens * slots]
  DeviceBuffer passthrough;  // uint8 [max_tokens] (switch tokens over capacity)
  // A control block (the first out-of-range task id, the active-token count), switch sequence
  // ends [max_tokens + 1], scores [max_tokens, E] and the group scores of grouped routers.
  DeviceBuffer scratch;
};

struct DeviceRouteOptions {
  const uint8_t* active = nullptr;            // device [T]; nullptr: all active
  int32_t task_id = 0;                        // task router
  const int32_t* task_ids = nullptr;          // device [T]; task router, per token
  std::span<const int64_t> sequence_lengths;  // host; switch capacity per sequence (empty: one)
};

// Empty when the device router computes `config`'s routing, else what it lacks (the host router
// runs every kind; DeviceRouter's constructor throws with this reason).
std::string device_router_unsupported(const RouterConfig& config);

class DeviceRouter {
 public:
  DeviceRouter() = default;
  // Uploads the gate weight [E, H] (fp32), the correction bias and the task tables.
  explicit DeviceRouter(const Router& router);

  const RouterConfig& config() const { return config_; }
  int64_t hidden() const { return hidden_; }
  int64_t num_experts() const { return config_.num_experts; }
  int64_t slots_per_token() const;
  // Allocates the outputs and the scratch of routing up to max_tokens tokens.
  DeviceRouting make_routing(int64_t max_tokens) const;

  // x: device fp32 [tokens, hidden] with row stride ldx (elements); unused by the task router.
  // tokens <= out.max_tokens (checked). Asynchronous on `stream`; allocates nothing. Two host
  // checks throw moqe::Error with Router::route's messages: a task_id out of range when task_ids
  // is nullptr (whenever tokens > 0: the active mask is on the device), and sequence lengths
  // that are negative or do not sum to `tokens`. Switch sequence boundaries (only with
  // expert_capacity > 0 and sequence_lengths given) are copied with cudaMemcpyAsync from pageable
  // host memory, which the driver stages before returning, so the span need not outlive the call.
  // Per-token task ids out of range: that token gets no slots (ids -1, weights 0, kept 0) and the
  // first such token is flagged on the device; download() throws for it.
  void route(const float* x, int64_t tokens, int64_t ldx, DeviceRouting& out,
             const DeviceRouteOptions& options = {}, Stream stream = nullptr) const;

 private:
  RouterConfig config_;
  int64_t hidden_ = 0;
  DeviceBuffer gate_;          // float [E, H]
  DeviceBuffer bias_;          // float [E] (deepseek_v3 with a correction bias)
  DeviceBuffer task_experts_;  // int32 [tasks, top_k]
  DeviceBuffer task_weights_;  // float [tasks, top_k]
};

// Synchronizes `stream` and copies the last routing into a host Routing (reset to its size;
// ids, weights, kept, passthrough, expert_load, expert_dropped filled like Router::route does).
// When the last route() met a per-token task id out of range, throws moqe::Error with
// Router::route's message for the first such token, after filling `out`.
void download(const DeviceRouting& routing, Routing& out, Stream stream = nullptr);

}  // namespace moqe::cuda
