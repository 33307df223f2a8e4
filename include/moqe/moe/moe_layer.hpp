// MoELayer: router + experts (+ shared experts, + a PR-MoE residual MLP), run on a batch of
// tokens [T, H]. Plan, then run: make_workspace(max_tokens) sizes every buffer once; run() is
// const (thread-safe, one workspace per calling thread) and does not allocate.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moqe/moe/dispatch.hpp"
#include "moqe/moe/expert.hpp"
#include "moqe/moe/expert_group.hpp"
#include "moqe/moe/router.hpp"

namespace moqe {

// How a shared expert's output joins the routed experts' sum y.
enum class SharedCombine : uint8_t {
  kAdd,      // y + shared
  kAverage,  // (y + shared) / 2 (Cohere2-MoE's "average" strategy)
};

// An expert every token passes through. With a gate vector g [H] (Qwen2-MoE) its output is
// scaled by sigmoid(g . x); without one (DeepSeek) it is added as is.
struct SharedExpert {
  std::shared_ptr<const ExpertMLP> mlp;
  std::vector<float> gate;  // [H] or empty
  SharedCombine combine = SharedCombine::kAdd;
};

// PR-MoE (DeepSpeed-MoE): a fixed dense MLP beside the experts; the outputs are mixed by
// c = softmax(x . Wc^T) over 2: y = c0 * moe(x) + c1 * mlp(x).
struct ResidualMLP {
  std::shared_ptr<const ExpertMLP> mlp;
  std::vector<float> coefficient;  // Wc [2, H]
};

struct LayerStats {
  int64_t parameters = 0;    // expert, shared and residual weights (the router's too)
  int64_t weight_bytes = 0;  // as stored
  int64_t experts = 0;
};

// Buffers for running a layer on up to max_tokens tokens (MoELayer::make_workspace).
struct MoeWorkspace {
  int64_t max_tokens = 0;
  Routing routing;  // the routing of the last run (ids, weights, load statistics)
  DispatchPlan plan;
  std::vector<float> xe, ye;          // routed rows in expert order
  std::vector<float> scratch, extra;  // shared experts and the residual MLP
  std::vector<int32_t> active_tokens;
  ExpertGroupWorkspace experts;
  std::vector<float> x32, y32;  // fp16 / bf16 runs: x widened, y before rounding
};

struct MoeRunOptions {
  int num_threads = 0;
  std::span<const uint8_t> active;            // [T]; inactive tokens are skipped, y = 0
  std::span<const int64_t> sequence_lengths;  // Switch capacity per sequence
  int32_t task_id = 0;                        // task router
  std::span<const int32_t> task_ids;          // task router, per token
  // A routing computed elsewhere (another router, one routing shared by several layers, a
  // replay): the layer's own router does not run and ws.routing is left as it was. Its tokens
  // and experts must be the layer's; any number of slots (Routing::reset sizes it); every kept
  // slot names an expert with a finite weight (checked).
  const Routing* routing = nullptr;
};

// Anything that routes like moqe::Router: MoELayer::run(router, ...) runs a layer with it
// instead of the layer's own (a custom or learned router, without forking the layer).
template <class R>
concept RouterLike = requires(const R& r, MatrixView<const float> x, Routing& out,
                              const RouteOptions& o) {
  r.route(x, out, o);
};

class MoELayer {
 public:
  using Workspace = MoeWorkspace;
  using RunOptions = MoeRunOptions;

  MoELayer() = default;
  // output_bias [H] (JetMoE) is added to every active token's output; empty: none.
  MoELayer(Router router, std::vector<std::shared_ptr<const ExpertMLP>> experts,
           std::vector<SharedExpert> shared = {}, std::optional<ResidualMLP> residual = {},
           std::vector<float> output_bias = {});

  const Router& router() const { return router_; }
  int64_t hidden() const { return hidden_; }
  int64_t num_experts() const { return experts_.size(); }
  const ExpertMLP& expert(int64_t e) const { return experts_.expert(e); }
  const std::vector<std::shared_ptr<const ExpertMLP>>& experts() const {
    return experts_.experts();
  }
  const ExpertGroup& expert_group() const { return experts_; }
  const std::vector<SharedExpert>& shared_experts() const { return shared_; }
  const std::optional<ResidualMLP>& residual() const { return residual_; }
  const std::vector<float>& output_bias() const { return output_bias_; }
  LayerStats stats() const;

  Workspace make_workspace(int64_t max_tokens) const;
  // y [T, H] = layer(x [T, H]). T <= ws.max_tokens. ws.routing holds the routing afterwards. x
  // and y must not alias (shared experts read x after the routed experts wrote y).
  void run(MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
           const RunOptions& options = {}) const;
  // The same with `router` in place of the layer's own: it routes x into ws.routing (RouteOptions
  // from `options`), then the layer runs on that routing.
  template <RouterLike R>
  void run(const R& router, MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
           const RunOptions& options = {}) const {
    router.route(x, ws.routing,
                 RouteOptions{options.num_threads, options.active, options.sequence_lengths,
                              options.task_id, options.task_ids});
    RunOptions with = options;
    with.routing = &ws.routing;
    run(x, y, ws, with);
  }
  // The same on fp16 / bf16 hidden states: x is widened to fp32 once, the layer runs in fp32 and
  // y is rounded once, so the result is the fp32 run's on the widened x, rounded
  // (core/activations.hpp). No allocation: the workspace holds the fp32 copies.
  template <HalfActivation T>
  void run(MatrixView<const T> x, MatrixView<T> y, Workspace& ws,
           const RunOptions& options = {}) const;

  // Task-MoE deployment: a smaller layer holding only the experts the task routes to (in the
  // task's order), with a task router over them; shared experts and the residual MLP are kept.
  // The weights are shared with this layer, not copied.
  MoELayer extract_task(int32_t task_id) const;

 private:
  Router router_;
  ExpertGroup experts_;
  std::vector<SharedExpert> shared_;
  std::optional<ResidualMLP> residual_;
  std::vector<float> output_bias_;
  int64_t hidden_ = 0;
  int64_t max_dense_intermediate_ = 0;  // of the shared experts and the residual MLP
};

extern template void MoELayer::run<Half>(MatrixView<const Half>, MatrixView<Half>, MoeWorkspace&,
                                         const MoeRunOptions&) const;
extern template void MoELayer::run<BFloat16>(MatrixView<const BFloat16>, MatrixView<BFloat16>,
                                             MoeWorkspace&, const MoeRunOptions&) const;

}  // namespace moqe
