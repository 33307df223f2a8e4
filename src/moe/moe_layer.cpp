#include "moqe/moe/moe_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "layer_tail.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/gemm/reference.hpp"

namespace moqe {

MoELayer::MoELayer(Router router, std::vector<std::shared_ptr<const ExpertMLP>> experts,
                   std::vector<SharedExpert> shared, std::optional<ResidualMLP> residual,
                   std::vector<float> output_bias)
    : router_(std::move(router)),
      shared_(std::move(shared)),
      residual_(std::move(residual)),
      output_bias_(std::move(output_bias)) {
  MOQE_CHECK(static_cast<int64_t>(experts.size()) == router_.num_experts(),
             "MoELayer: {} experts for a router over {}", experts.size(), router_.num_experts());
  MOQE_CHECK(!experts.empty(), "MoELayer: no experts");
  MOQE_CHECK(experts[0] != nullptr, "MoELayer: expert 0 is missing");
  hidden_ = experts[0]->hidden();
  experts_ = ExpertGroup(std::move(experts), hidden_);
  if (router_.kind() != RouterKind::kTask) {
    MOQE_CHECK(router_.hidden() == hidden_, "MoELayer: the router's hidden size {} is not {}",
               router_.hidden(), hidden_);
  }
  max_dense_intermediate_ = detail::check_layer_tail(shared_, residual_, hidden_, "MoELayer");
  MOQE_CHECK(output_bias_.empty() || static_cast<int64_t>(output_bias_.size()) == hidden_,
             "MoELayer: the output bias has {} values, expected {}", output_bias_.size(), hidden_);
}

LayerStats MoELayer::stats() const {
  return detail::layer_stats(experts_, shared_, residual_, router_);
}

MoELayer::Workspace MoELayer::make_workspace(int64_t max_tokens) const {
  MOQE_CHECK(max_tokens >= 0, "make_workspace: negative max_tokens {}", max_tokens);
  const RouterConfig& c = router_.config();
  const int64_t slots = router_.slots_per_token(), e = num_experts();
  int64_t max_rows = max_tokens * slots;
  if (c.kind == RouterKind::kExpertChoice) {
    const int64_t cap = c.expert_capacity > 0 ? std::min(c.expert_capacity, max_tokens)
                                              : (max_tokens * c.top_k + e - 1) / e;
    max_rows = std::min(max_rows, e * cap);
  }
  Workspace ws;
  ws.max_tokens = max_tokens;
  ws.routing.reset(max_tokens, slots, e);
  ws.routing.scratch.resize(static_cast<size_t>(max_tokens * e));
  ws.plan.reserve(max_tokens, slots, e);
  ws.xe.resize(static_cast<size_t>(max_rows * hidden_));
  ws.ye.resize(ws.xe.size());
  // An expert sees each token at most once.
  ws.experts = experts_.make_workspace(max_rows, max_tokens);
  detail::reserve_layer_tail(!shared_.empty() || residual_.has_value(), max_tokens, hidden_,
                             max_dense_intermediate_, ws.scratch, ws.extra, ws.active_tokens);
  ws.x32.resize(static_cast<size_t>(max_tokens * hidden_));
  ws.y32.resize(ws.x32.size());
  return ws;
}

template <HalfActivation T>
void MoELayer::run(MatrixView<const T> x, MatrixView<T> y, Workspace& ws,
                   const RunOptions& o) const {
  const int64_t t_count = x.rows(), h = hidden_;
  MOQE_CHECK(x.cols() == h && y.rows() == t_count && y.cols() == h,
             "MoELayer (hidden {}): input {} and output {} do not fit", h, shape_string(x),
             shape_string(y));
  MOQE_CHECK(t_count <= ws.max_tokens && static_cast<int64_t>(ws.x32.size()) >= t_count * h &&
                 static_cast<int64_t>(ws.y32.size()) >= t_count * h,
             "MoELayer: {} tokens exceed the workspace's {}", t_count, ws.max_tokens);
  const MatrixView<float> x32(ws.x32.data(), t_count, h), y32(ws.y32.data(), t_count, h);
  widen_rows(x, x32);
  run(MatrixView<const float>(x32), y32, ws, o);
  round_rows(MatrixView<const float>(y32), y);
}

template void MoELayer::run<Half>(MatrixView<const Half>, MatrixView<Half>, MoeWorkspace&,
                                  const MoeRunOptions&) const;
template void MoELayer::run<BFloat16>(MatrixView<const BFloat16>, MatrixView<BFloat16>,
                                      MoeWorkspace&, const MoeRunOptions&) const;

void MoELayer::run(MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
                   const RunOptions& o) const {
  const int64_t t_count = x.rows(), h = hidden_;
  MOQE_CHECK(x.cols() == h && y.rows() == t_count && y.cols() == h,
             "MoELayer (hidden {}): input {} and output {} do not fit", h, shape_string(x),
             shape_string(y));
  MOQE_CHECK(t_count <= ws.max_tokens, "MoELayer: {} tokens exceed the workspace's {}", t_count,
             ws.max_tokens);
  const int threads = o.num_threads;
  const Routing* routing = &ws.routing;
  if (o.routing != nullptr) {
    detail::check_given_routing(*o.routing, t_count, num_experts(), "MoELayer");
    routing = o.routing;
  } else {
    router_.route(x, ws.routing, {threads, o.active, o.sequence_lengths, o.task_id, o.task_ids});
  }
  ws.plan.build(*routing);
  const int64_t rows = ws.plan.rows();
  MOQE_CHECK(rows * h <= static_cast<int64_t>(ws.xe.size()),
             "MoELayer: {} routed rows exceed the workspace", rows);
  MatrixView<float> xe(ws.xe.data(), rows, h), ye(ws.ye.data(), rows, h);
  const WeightPlacement placement =
      router_.config().scale_input ? WeightPlacement::kInput : WeightPlacement::kOutput;
  gather_rows(ws.plan, x, xe, threads, placement);
  experts_.run(ws.plan.offsets(), MatrixView<const float>(xe), ye, ws.experts, threads);
  combine_rows(ws.plan, ye, y, threads, placement);
  detail::finish_layer(x, y, *routing, shared_, residual_, output_bias_, o.active,
                       {ws.max_tokens, &ws.scratch, &ws.extra, &ws.active_tokens}, threads);
}

namespace detail {

void check_given_routing(const Routing& r, int64_t tokens, int64_t num_experts,
                         std::string_view who) {
  const auto n =
      static_cast<size_t>(std::max<int64_t>(r.tokens, 0) * std::max<int64_t>(r.slots, 0));
  MOQE_CHECK(r.tokens == tokens && r.num_experts == num_experts && r.slots > 0,
             "{}: the given routing is for {} tokens over {} experts with {} slots, the layer "
             "runs {} tokens over {} experts",
             who, r.tokens, r.num_experts, r.slots, tokens, num_experts);
  MOQE_CHECK(r.ids.size() >= n && r.weights.size() >= n && r.kept.size() >= n &&
                 r.passthrough.size() >= static_cast<size_t>(tokens),
             "{}: the given routing's buffers are smaller than [{}, {}] (make it with "
             "Routing::reset)",
             who, tokens, r.slots);
  for (size_t s = 0; s < n; ++s) {
    if (!r.kept[s]) continue;
    MOQE_CHECK(r.ids[s] >= 0 && r.ids[s] < num_experts && std::isfinite(r.weights[s]),
               "{}: slot {} of token {} of the given routing keeps expert {} (of {}) with weight "
               "{}",
               who, s % static_cast<size_t>(r.slots), s / static_cast<size_t>(r.slots), r.ids[s],
               num_experts, r.weights[s]);
  }
}

int64_t check_layer_tail(std::span<const SharedExpert> shared,
                         const std::optional<ResidualMLP>& residual, int64_t hidden,
                         std::string_view who) {
  int64_t max_inter = 0;
  auto check_mlp = [&](const ExpertMLP& m, const std::string& what) {
    MOQE_CHECK(m.hidden() == hidden, "{}: {} has hidden size {}, expected {}", who, what,
               m.hidden(), hidden);
    max_inter = std::max(max_inter, m.intermediate());
  };
  for (size_t s = 0; s < shared.size(); ++s) {
    MOQE_CHECK(shared[s].mlp != nullptr, "{}: shared expert {} is missing", who, s);
    check_mlp(*shared[s].mlp, fmt::format("shared expert {}", s));
    MOQE_CHECK(shared[s].gate.empty() || static_cast<int64_t>(shared[s].gate.size()) == hidden,
               "{}: the gate of shared expert {} has {} values, expected {}", who, s,
               shared[s].gate.size(), hidden);
  }
  if (residual) {
    MOQE_CHECK(residual->mlp != nullptr, "{}: the residual MLP is missing", who);
    check_mlp(*residual->mlp, "the residual MLP");
    MOQE_CHECK(static_cast<int64_t>(residual->coefficient.size()) == 2 * hidden,
               "{}: the residual coefficient has {} values, expected [2, {}]", who,
               residual->coefficient.size(), hidden);
  }
  return max_inter;
}

LayerStats layer_stats(const ExpertGroup& experts, std::span<const SharedExpert> shared,
                       const std::optional<ResidualMLP>& residual, const Router& router) {
  LayerStats s;
  s.experts = experts.size();
  auto add = [&](const ExpertMLP& m) {
    s.parameters += m.parameters();
    s.weight_bytes += m.weight_bytes();
  };
  auto add_floats = [&](size_t n) {
    s.parameters += static_cast<int64_t>(n);
    s.weight_bytes += static_cast<int64_t>(n) * 4;
  };
  for (const auto& e : experts.experts()) add(*e);
  for (const auto& sh : shared) {
    add(*sh.mlp);
    add_floats(sh.gate.size());
  }
  if (residual) {
    add(*residual->mlp);
    add_floats(residual->coefficient.size());
  }
  add_floats(router.gate_weight().size());
  return s;
}

void reserve_layer_tail(bool has_tail, int64_t max_tokens, int64_t hidden, int64_t max_intermediate,
                        std::vector<float>& scratch, std::vector<float>& extra,
                        std::vector<int32_t>& active_tokens) {
  if (!has_tail) return;
  active_tokens.reserve(static_cast<size_t>(max_tokens));
  scratch.resize(static_cast<size_t>(max_tokens * 2 * max_intermediate));
  extra.resize(static_cast<size_t>(2 * max_tokens * hidden));
}

void finish_layer(MatrixView<const float> x, MatrixView<float> y, const Routing& r,
                  std::span<const SharedExpert> shared, const std::optional<ResidualMLP>& residual,
                  std::span<const float> output_bias, std::span<const uint8_t> active,
                  const LayerTailBuffers& buffers, int threads) {
  const int64_t t_count = x.rows(), h = x.cols();
  for (int64_t t = 0; t < t_count; ++t) {
    if (!r.passthrough[t]) continue;
    const float w = r.weights[t * r.slots];
    for (int64_t c = 0; c < h; ++c) y(t, c) = w * x(t, c);
  }
  if (!output_bias.empty()) {
    for (int64_t t = 0; t < t_count; ++t) {
      if (!active.empty() && !active[t]) continue;
      for (int64_t c = 0; c < h; ++c) y(t, c) += output_bias[c];
    }
  }
  if (shared.empty() && !residual) return;

  // Shared experts and the residual MLP run on the active tokens only, gathered.
  std::vector<int32_t>& idx = *buffers.active_tokens;  // capacity reserved: no allocation
  idx.clear();
  for (int64_t t = 0; t < t_count; ++t) {
    if (active.empty() || active[t]) idx.push_back(static_cast<int32_t>(t));
  }
  const auto n = static_cast<int64_t>(idx.size());
  float* extra = buffers.extra->data();
  float* scratch = buffers.scratch->data();
  MatrixView<float> xa(extra, n, h), out(extra + buffers.max_tokens * h, n, h);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(xa.row(i), x.row(idx[i]), sizeof(float) * static_cast<size_t>(h));
  }
  for (const SharedExpert& s : shared) {
    s.mlp->forward(MatrixView<const float>(xa), out, scratch, threads);
    for (int64_t i = 0; i < n; ++i) {
      const float g =
          s.gate.empty() ? 1.0f : 1.0f / (1.0f + std::exp(-dot_f32(s.gate.data(), xa.row(i), h)));
      float* dst = y.row(idx[i]);
      const float* src = out.row(i);
      if (s.combine == SharedCombine::kAverage) {
        for (int64_t c = 0; c < h; ++c) dst[c] = (dst[c] + g * src[c]) / 2;
      } else {
        for (int64_t c = 0; c < h; ++c) dst[c] += g * src[c];
      }
    }
  }
  if (residual) {
    residual->mlp->forward(MatrixView<const float>(xa), out, scratch, threads);
    const float* wc = residual->coefficient.data();
    for (int64_t i = 0; i < n; ++i) {
      const float l0 = dot_f32(wc, xa.row(i), h), l1 = dot_f32(wc + h, xa.row(i), h);
      const float m = std::max(l0, l1), e0 = std::exp(l0 - m), e1 = std::exp(l1 - m);
      const float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
      float* dst = y.row(idx[i]);
      const float* src = out.row(i);
      for (int64_t c = 0; c < h; ++c) dst[c] = dst[c] * c0 + src[c] * c1;
    }
  }
}

}  // namespace detail

MoELayer MoELayer::extract_task(int32_t task_id) const {
  const RouterConfig& c = router_.config();
  MOQE_CHECK(c.kind == RouterKind::kTask,
             "extract_task: the layer's router is {}, not a task router", to_string(c.kind));
  MOQE_CHECK(task_id >= 0 && task_id < static_cast<int32_t>(c.tasks.size()),
             "extract_task: task {} is not one of the {} tasks", task_id, c.tasks.size());
  const TaskRoute& route = c.tasks[task_id];
  std::vector<std::shared_ptr<const ExpertMLP>> experts;
  RouterConfig sub;
  sub.kind = RouterKind::kTask;
  sub.num_experts = static_cast<int64_t>(route.experts.size());
  sub.top_k = sub.num_experts;
  TaskRoute local;
  for (size_t j = 0; j < route.experts.size(); ++j) {
    experts.push_back(experts_.experts()[route.experts[j]]);
    local.experts.push_back(static_cast<int32_t>(j));
    local.weights.push_back(route.weights[j]);
  }
  sub.tasks.push_back(std::move(local));
  return MoELayer(Router(std::move(sub), {}, hidden_), std::move(experts), shared_, residual_,
                  output_bias_);
}

}  // namespace moqe
