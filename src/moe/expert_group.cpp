#include "moqe/moe/expert_group.hpp"

#include <algorithm>

#include "moqe/core/error.hpp"
#include "moqe/core/threading.hpp"

namespace moqe {

ExpertGroup::ExpertGroup(std::vector<std::shared_ptr<const ExpertMLP>> experts, int64_t hidden)
    : experts_(std::move(experts)), hidden_(hidden) {
  MOQE_CHECK(hidden_ > 0, "ExpertGroup: hidden size {} is not positive", hidden_);
  grouped_ = true;
  for (size_t e = 0; e < experts_.size(); ++e) {
    MOQE_CHECK(experts_[e] != nullptr, "ExpertGroup: expert {} is missing", e);
    MOQE_CHECK(experts_[e]->hidden() == hidden_,
               "ExpertGroup: expert {} has hidden size {}, expected {}", e, experts_[e]->hidden(),
               hidden_);
    max_intermediate_ = std::max(max_intermediate_, experts_[e]->intermediate());
    grouped_ = grouped_ && experts_[e]->single_first();
  }
}

ExpertGroup::Workspace ExpertGroup::make_workspace(int64_t max_rows,
                                                   int64_t max_rows_per_expert) const {
  MOQE_CHECK(max_rows >= 0 && max_rows_per_expert >= 0,
             "ExpertGroup::make_workspace: negative sizes {} and {}", max_rows,
             max_rows_per_expert);
  Workspace ws;
  ws.max_rows = max_rows;
  ws.max_rows_per_expert = std::min(max_rows, max_rows_per_expert);
  const int64_t e = size();
  if (grouped_) {
    ws.h.resize(static_cast<size_t>(max_rows * 2 * max_intermediate_));
    ws.first_scratch.resize(static_cast<size_t>(e));
    ws.down_scratch.resize(static_cast<size_t>(e));
    // At most one task per 16 rows of each projection, per expert.
    ws.tasks.reserve(static_cast<size_t>(e * (std::max(hidden_, max_intermediate_) / 16 + 2)));
  } else {
    ws.scratch.resize(static_cast<size_t>(ws.max_rows_per_expert * 2 * max_intermediate_));
  }
  return ws;
}

void ExpertGroup::run(std::span<const int64_t> offsets, MatrixView<const float> xe,
                      MatrixView<float> ye, Workspace& ws, int num_threads) const {
  const int64_t e_count = size();
  MOQE_CHECK(static_cast<int64_t>(offsets.size()) == e_count + 1 && offsets[0] == 0,
             "ExpertGroup: {} offsets for {} experts (expected {} starting at 0)", offsets.size(),
             e_count, e_count + 1);
  const int64_t rows = offsets[e_count];
  MOQE_CHECK(xe.cols() == hidden_ && ye.cols() == hidden_ && xe.rows() >= rows &&
                 ye.rows() >= rows && rows <= ws.max_rows,
             "ExpertGroup (hidden {}): {} rows do not fit inputs {}, outputs {} and a workspace "
             "of {} rows",
             hidden_, rows, shape_string(xe), shape_string(ye), ws.max_rows);
  for (int64_t e = 0; e < e_count; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    MOQE_CHECK(n >= 0 && n <= ws.max_rows_per_expert,
               "ExpertGroup: expert {} has {} rows (offsets decrease, or more than the "
               "workspace's {} per expert)",
               e, n, ws.max_rows_per_expert);
  }
  if (grouped_) {
    run_grouped(offsets, xe, ye, ws, num_threads);
    return;
  }
  const int64_t h = hidden_;
  for (int64_t e = 0; e < e_count; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e], off = offsets[e];
    if (n == 0) continue;  // an expert with no rows costs nothing
    experts_[e]->forward(MatrixView<const float>(xe.block(off, 0, n, h)), ye.block(off, 0, n, h),
                         ws.scratch.data(), num_threads);
  }
}

// One pass over all experts per projection; the GLU activation runs in the same task that
// produced its gate and up rows (while they are in cache).
void ExpertGroup::run_grouped(std::span<const int64_t> offsets, MatrixView<const float> xe,
                              MatrixView<float> ye, Workspace& ws, int num_threads) const {
  const int64_t h = hidden_, e_count = size();
  const int threads = num_threads > 0 ? num_threads : default_num_threads();
  auto rows_of = [&](int64_t e) { return offsets[e + 1] - offsets[e]; };
  auto make_tasks = [&](auto columns_of) {  // ~4 tasks per thread over all work, >= 16 each
    int64_t total = 0;
    for (int64_t e = 0; e < e_count; ++e) {
      if (rows_of(e) > 0) total += columns_of(e);
    }
    const int64_t chunk = std::max<int64_t>(16, (total + 4 * threads - 1) / (4 * threads));
    ws.tasks.clear();
    for (int64_t e = 0; e < e_count; ++e) {
      if (rows_of(e) == 0) continue;
      for (int64_t c0 = 0; c0 < columns_of(e); c0 += chunk) {
        ws.tasks.push_back({static_cast<int32_t>(e), c0, std::min(columns_of(e), c0 + chunk)});
      }
    }
  };
  auto h_view = [&](int64_t e) {  // expert e's rows of h: [n, 2I] (I = the expert's intermediate)
    const int64_t i = experts_[e]->intermediate();
    return MatrixView<float>(ws.h.data() + offsets[e] * 2 * max_intermediate_, rows_of(e), 2 * i,
                             2 * max_intermediate_);
  };
  auto x_view = [&](int64_t e) {
    return MatrixView<const float>(xe.block(offsets[e], 0, rows_of(e), h));
  };
  // Stage 1: gate and up (or up) rows, then the activation, per intermediate range.
  for (int64_t e = 0; e < e_count; ++e) {
    if (rows_of(e) > 0) experts_[e]->first().prepare(x_view(e), ws.first_scratch[e]);
  }
  make_tasks([&](int64_t e) { return experts_[e]->intermediate(); });
  parallel_for(static_cast<int64_t>(ws.tasks.size()), threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Workspace::Task& task = ws.tasks[t];
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
    if (rows_of(e) > 0) experts_[e]->down().prepare(a_view(e), ws.down_scratch[e]);
  }
  make_tasks([&](int64_t) { return h; });
  parallel_for(static_cast<int64_t>(ws.tasks.size()), threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Workspace::Task& task = ws.tasks[t];
      const int64_t e = task.expert;
      const MatrixView<float> out = ye.block(offsets[e], 0, rows_of(e), h);
      experts_[e]->down().forward_rows(a_view(e), ws.down_scratch[e], out, task.r0, task.r1);
      experts_[e]->add_down_bias(out, task.r0, task.r1);
    }
  });
}

}  // namespace moqe
