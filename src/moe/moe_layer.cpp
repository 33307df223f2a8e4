#include "moqe/moe/moe_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "moqe/core/threading.hpp"
#include "moqe/gemm/reference.hpp"

namespace moqe {

MoELayer::MoELayer(Router router, std::vector<std::shared_ptr<const ExpertMLP>> experts,
                   std::vector<SharedExpert> shared, std::optional<ResidualMLP> residual)
    : router_(std::move(router)),
      experts_(std::move(experts)),
      shared_(std::move(shared)),
      residual_(std::move(residual)) {
  MOQE_CHECK(static_cast<int64_t>(experts_.size()) == router_.num_experts(),
             "MoELayer: {} experts for a router over {}", experts_.size(), router_.num_experts());
  MOQE_CHECK(!experts_.empty(), "MoELayer: no experts");
  hidden_ = experts_[0]->hidden();
  auto check_mlp = [&](const ExpertMLP& m, const std::string& what) {
    MOQE_CHECK(m.hidden() == hidden_, "MoELayer: {} has hidden size {}, expert 0 has {}", what,
               m.hidden(), hidden_);
    max_intermediate_ = std::max(max_intermediate_, m.intermediate());
  };
  grouped_ = true;
  for (size_t e = 0; e < experts_.size(); ++e) {
    MOQE_CHECK(experts_[e] != nullptr, "MoELayer: expert {} is missing", e);
    check_mlp(*experts_[e], fmt::format("expert {}", e));
    grouped_ = grouped_ && experts_[e]->single_first();
  }
  if (router_.kind() != RouterKind::kTask) {
    MOQE_CHECK(router_.hidden() == hidden_, "MoELayer: the router's hidden size {} is not {}",
               router_.hidden(), hidden_);
  }
  for (size_t s = 0; s < shared_.size(); ++s) {
    MOQE_CHECK(shared_[s].mlp != nullptr, "MoELayer: shared expert {} is missing", s);
    check_mlp(*shared_[s].mlp, fmt::format("shared expert {}", s));
    MOQE_CHECK(shared_[s].gate.empty() || static_cast<int64_t>(shared_[s].gate.size()) == hidden_,
               "MoELayer: the gate of shared expert {} has {} values, expected {}", s,
               shared_[s].gate.size(), hidden_);
  }
  if (residual_) {
    MOQE_CHECK(residual_->mlp != nullptr, "MoELayer: the residual MLP is missing");
    check_mlp(*residual_->mlp, "the residual MLP");
    MOQE_CHECK(static_cast<int64_t>(residual_->coefficient.size()) == 2 * hidden_,
               "MoELayer: the residual coefficient has {} values, expected [2, {}]",
               residual_->coefficient.size(), hidden_);
  }
}

LayerStats MoELayer::stats() const {
  LayerStats s;
  s.experts = num_experts();
  auto add = [&](const ExpertMLP& m) {
    s.parameters += m.parameters();
    s.weight_bytes += m.weight_bytes();
  };
  for (const auto& e : experts_) add(*e);
  for (const auto& sh : shared_) {
    add(*sh.mlp);
    s.parameters += static_cast<int64_t>(sh.gate.size());
    s.weight_bytes += static_cast<int64_t>(sh.gate.size()) * 4;
  }
  if (residual_) {
    add(*residual_->mlp);
    s.parameters += static_cast<int64_t>(residual_->coefficient.size());
    s.weight_bytes += static_cast<int64_t>(residual_->coefficient.size()) * 4;
  }
  s.parameters += static_cast<int64_t>(router_.gate_weight().size());
  s.weight_bytes += static_cast<int64_t>(router_.gate_weight().size()) * 4;
  return s;
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
  ws.active_tokens.reserve(static_cast<size_t>(max_tokens));
  ws.xe.resize(static_cast<size_t>(max_rows * hidden_));
  ws.ye.resize(ws.xe.size());
  // An expert sees each token at most once: T rows of scratch suffice for any MLP.
  ws.scratch.resize(static_cast<size_t>(max_tokens * 2 * max_intermediate_));
  if (!shared_.empty() || residual_) ws.extra.resize(static_cast<size_t>(2 * max_tokens * hidden_));
  if (grouped_) {
    ws.h.resize(static_cast<size_t>(max_rows * 2 * max_intermediate_));
    ws.first_scratch.resize(static_cast<size_t>(e));
    ws.down_scratch.resize(static_cast<size_t>(e));
    // At most one task per 16 rows of each projection, per expert.
    ws.tasks.reserve(static_cast<size_t>(e * (std::max(hidden_, max_intermediate_) / 16 + 2)));
  }
  return ws;
}

void MoELayer::run(MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
                   const RunOptions& o) const {
  const int64_t t_count = x.rows(), h = hidden_;
  MOQE_CHECK(x.cols() == h && y.rows() == t_count && y.cols() == h,
             "MoELayer (hidden {}): input {} and output {} do not fit", h, shape_string(x),
             shape_string(y));
  MOQE_CHECK(t_count <= ws.max_tokens, "MoELayer: {} tokens exceed the workspace's {}", t_count,
             ws.max_tokens);
  const int threads = o.num_threads;
  router_.route(x, ws.routing, {threads, o.active, o.sequence_lengths, o.task_id, o.task_ids});
  ws.plan.build(ws.routing);
  const int64_t rows = ws.plan.rows();
  MOQE_CHECK(rows * h <= static_cast<int64_t>(ws.xe.size()),
             "MoELayer: {} routed rows exceed the workspace", rows);
  MatrixView<float> xe(ws.xe.data(), rows, h), ye(ws.ye.data(), rows, h);
  gather_rows(ws.plan, x, xe, threads);
  if (grouped_) {
    run_experts_grouped(xe, ye, ws, threads);
  } else {
    for (int64_t e = 0; e < num_experts(); ++e) {
      const int64_t n = ws.plan.expert_rows(e), off = ws.plan.offset(e);
      if (n == 0) continue;  // an expert with no tokens costs nothing
      experts_[e]->forward(MatrixView<const float>(xe.block(off, 0, n, h)), ye.block(off, 0, n, h),
                           ws.scratch.data(), threads);
    }
  }
  combine_rows(ws.plan, ye, y, threads);
  const Routing& r = ws.routing;
  for (int64_t t = 0; t < t_count; ++t) {
    if (!r.passthrough[t]) continue;
    const float w = r.weights[t * r.slots];
    for (int64_t c = 0; c < h; ++c) y(t, c) = w * x(t, c);
  }
  if (shared_.empty() && !residual_) return;

  // Shared experts and the residual MLP run on the active tokens only, gathered.
  std::vector<int32_t>& idx = ws.active_tokens;  // capacity reserved: no allocation
  idx.clear();
  for (int64_t t = 0; t < t_count; ++t) {
    if (o.active.empty() || o.active[t]) idx.push_back(static_cast<int32_t>(t));
  }
  const auto n = static_cast<int64_t>(idx.size());
  MatrixView<float> xa(ws.extra.data(), n, h), out(ws.extra.data() + ws.max_tokens * h, n, h);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(xa.row(i), x.row(idx[i]), sizeof(float) * static_cast<size_t>(h));
  }
  for (const SharedExpert& s : shared_) {
    s.mlp->forward(MatrixView<const float>(xa), out, ws.scratch.data(), threads);
    for (int64_t i = 0; i < n; ++i) {
      const float g =
          s.gate.empty() ? 1.0f : 1.0f / (1.0f + std::exp(-dot_f32(s.gate.data(), xa.row(i), h)));
      float* dst = y.row(idx[i]);
      const float* src = out.row(i);
      for (int64_t c = 0; c < h; ++c) dst[c] += g * src[c];
    }
  }
  if (residual_) {
    residual_->mlp->forward(MatrixView<const float>(xa), out, ws.scratch.data(), threads);
    const float* wc = residual_->coefficient.data();
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

// One pass over all experts per projection: the (expert, row range) tasks of every expert with
// tokens go to the threads together, so two cores stay busy even when a single token routes to
// two experts, and the GLU activation runs in the same task that produced its gate and up rows
// (while they are in cache).
void MoELayer::run_experts_grouped(MatrixView<const float> xe, MatrixView<float> ye,
                                   MoeWorkspace& ws, int num_threads) const {
  const int64_t h = hidden_, e_count = num_experts();
  const int threads = num_threads > 0 ? num_threads : default_num_threads();
  auto make_tasks = [&](auto rows_of) {  // ~4 tasks per thread over all work, >= 16 rows each
    int64_t total = 0;
    for (int64_t e = 0; e < e_count; ++e) {
      if (ws.plan.expert_rows(e) > 0) total += rows_of(e);
    }
    const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));
    ws.tasks.clear();
    for (int64_t e = 0; e < e_count; ++e) {
      if (ws.plan.expert_rows(e) == 0) continue;
      for (int64_t r0 = 0; r0 < rows_of(e); r0 += chunk) {
        ws.tasks.push_back({static_cast<int32_t>(e), r0, std::min(rows_of(e), r0 + chunk)});
      }
    }
  };
  auto h_view = [&](int64_t e) {  // expert e's rows of h: [n, 2I] (I = the expert's intermediate)
    const int64_t i = experts_[e]->intermediate();
    return MatrixView<float>(ws.h.data() + ws.plan.offset(e) * 2 * max_intermediate_,
                             ws.plan.expert_rows(e), 2 * i, 2 * max_intermediate_);
  };
  auto x_view = [&](int64_t e) {
    return MatrixView<const float>(xe.block(ws.plan.offset(e), 0, ws.plan.expert_rows(e), h));
  };
  // Stage 1: gate and up (or up) rows, then the activation, per intermediate range.
  for (int64_t e = 0; e < e_count; ++e) {
    if (ws.plan.expert_rows(e) > 0) experts_[e]->first().prepare(x_view(e), ws.first_scratch[e]);
  }
  make_tasks([&](int64_t e) { return experts_[e]->intermediate(); });
  parallel_for(static_cast<int64_t>(ws.tasks.size()), threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const MoeWorkspace::Task& task = ws.tasks[t];
      const ExpertMLP& m = *experts_[task.expert];
      const MatrixView<float> hv = h_view(task.expert);
      const MatrixView<float> out =
          m.kind() == MlpKind::kGlu ? hv : hv.block(0, 0, hv.rows(), m.intermediate());
      m.first().forward_rows(x_view(task.expert), ws.first_scratch[task.expert], out, task.r0,
                             task.r1);
      if (m.kind() == MlpKind::kGlu) {
        const int64_t i = m.intermediate();
        m.first().forward_rows(x_view(task.expert), ws.first_scratch[task.expert], out, i + task.r0,
                               i + task.r1);
      }
      m.activate_columns(hv, task.r0, task.r1);
    }
  });
  // Stage 2: the down projection of every expert.
  auto a_view = [&](int64_t e) {
    const MatrixView<float> hv = h_view(e);
    return MatrixView<const float>(hv.block(0, 0, hv.rows(), experts_[e]->intermediate()));
  };
  for (int64_t e = 0; e < e_count; ++e) {
    if (ws.plan.expert_rows(e) > 0) experts_[e]->down().prepare(a_view(e), ws.down_scratch[e]);
  }
  make_tasks([&](int64_t) { return h; });
  parallel_for(static_cast<int64_t>(ws.tasks.size()), threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const MoeWorkspace::Task& task = ws.tasks[t];
      const int64_t e = task.expert;
      experts_[e]->down().forward_rows(a_view(e), ws.down_scratch[e],
                                       ye.block(ws.plan.offset(e), 0, ws.plan.expert_rows(e), h),
                                       task.r0, task.r1);
    }
  });
}

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
    experts.push_back(experts_[route.experts[j]]);
    local.experts.push_back(static_cast<int32_t>(j));
    local.weights.push_back(route.weights[j]);
  }
  sub.tasks.push_back(std::move(local));
  return MoELayer(Router(std::move(sub), {}, hidden_), std::move(experts), shared_, residual_);
}

}  // namespace moqe
