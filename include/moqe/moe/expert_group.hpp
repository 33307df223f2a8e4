// ExpertGroup: the experts of a layer (or of one rank of an expert-parallel layer) run over rows
// already grouped by expert. When every expert's first projection is one matrix (fused gate+up,
// or an mlp's up), one parallel region per projection covers all (expert, row range) tasks
// together, so two cores stay busy even when a single token routes to two experts; otherwise the
// experts run one after another.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "moqe/moe/expert.hpp"

namespace moqe {

// Buffers for ExpertGroup::run (ExpertGroup::make_workspace); run() does not allocate.
struct ExpertGroupWorkspace {
  int64_t max_rows = 0;
  int64_t max_rows_per_expert = 0;
  std::vector<float> scratch;  // one expert's forward(): max_rows_per_expert x 2I_max
  // The grouped pass: activations per expert (h, rows x 2I_max), the per-input scratch of each
  // expert's two projections, and the list of (expert, row range) tasks.
  std::vector<float> h;
  std::vector<LinearScratch> first_scratch, down_scratch;
  struct Task {
    int32_t expert;
    int64_t r0, r1;
  };
  std::vector<Task> tasks;
};

class ExpertGroup {
 public:
  using Workspace = ExpertGroupWorkspace;

  ExpertGroup() = default;
  // Every expert must have hidden size `hidden`. An empty group is allowed (a rank that holds no
  // experts): run() then does nothing.
  ExpertGroup(std::vector<std::shared_ptr<const ExpertMLP>> experts, int64_t hidden);

  int64_t size() const { return static_cast<int64_t>(experts_.size()); }
  int64_t hidden() const { return hidden_; }
  int64_t max_intermediate() const { return max_intermediate_; }
  bool grouped() const { return grouped_; }
  const ExpertMLP& expert(int64_t e) const { return *experts_[e]; }
  const std::vector<std::shared_ptr<const ExpertMLP>>& experts() const { return experts_; }

  // Sizes the buffers for up to max_rows rows in all, at most max_rows_per_expert of them for any
  // one expert.
  Workspace make_workspace(int64_t max_rows, int64_t max_rows_per_expert) const;
  // ye[r] = expert e (xe[r]) for the rows [offsets[e], offsets[e + 1]) of every expert e;
  // offsets has size() + 1 entries, starts at 0 and does not decrease.
  void run(std::span<const int64_t> offsets, MatrixView<const float> xe, MatrixView<float> ye,
           Workspace& ws, int num_threads = 0) const;

 private:
  std::vector<std::shared_ptr<const ExpertMLP>> experts_;
  int64_t hidden_ = 0;
  int64_t max_intermediate_ = 0;
  bool grouped_ = false;
  void run_grouped(std::span<const int64_t> offsets, MatrixView<const float> xe,
                   MatrixView<float> ye, Workspace& ws, int num_threads) const;
};

}  // namespace moqe
