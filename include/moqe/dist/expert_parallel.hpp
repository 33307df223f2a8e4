// Expert parallelism (DeepSpeed-MoE style): the routed experts of a layer are sharded across the
// ranks of a Communicator; the router, shared experts and the PR-MoE residual MLP are replicated.
// Each rank routes its own tokens, exchanges per-expert row counts and then the token rows with
// all-to-all-v, runs the experts it holds with the grouped expert pass, sends the results back
// and combines them with its routing weights. Inactive and dropped tokens are never sent.
//
// For every router, a rank's output equals MoELayer::run on the same tokens: bit for bit with the
// reference kernels (and on one rank with any kernels); with the SIMD kernels, which tile rows by
// four, a row's rounding depends on how many rows share its expert, so they agree to fp32
// rounding, as two batch compositions do in one process.
//
// Failures: anything that can fail on one rank alone (shapes, workspace size, routing options)
// is checked before the first exchange and announced through it, so every rank throws (the
// failing one with its own message). x and y must not alias.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "moqe/dist/communicator.hpp"
#include "moqe/moe/loader.hpp"
#include "moqe/moe/moe_layer.hpp"

namespace moqe {

// Which rank holds each routed expert.
class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  // Contiguous blocks: rank r holds experts [r * E / P, (r + 1) * E / P) (sizes differ by at most
  // one, the larger blocks first). Ranks beyond E hold none.
  static ExpertPlacement contiguous(int64_t num_experts, int ranks);
  // An explicit map for load balancing: owner[e] is the rank holding expert e (0 <= owner[e] <
  // ranks). A rank may hold no experts.
  static ExpertPlacement from_owners(std::vector<int32_t> owner, int ranks);

  int ranks() const { return ranks_; }
  int64_t num_experts() const { return static_cast<int64_t>(owner_.size()); }
  int32_t owner(int64_t expert) const { return owner_[expert]; }
  // The experts rank r holds, ascending; local expert l of rank r is experts_of(r)[l].
  std::span<const int64_t> experts_of(int rank) const;
  int64_t max_local_experts() const { return max_local_; }

 private:
  int ranks_ = 0;
  int64_t max_local_ = 0;
  std::vector<int32_t> owner_;
  std::vector<int64_t> order_;       // experts rank by rank, ascending within a rank
  std::vector<int64_t> rank_start_;  // [ranks + 1] into order_
};

// What one step moved, for watching imbalance. Bytes count rows that left or reached this rank
// over the transport in both exchanges (rows a rank sends to itself are not counted).
struct ExpertParallelStats {
  int64_t tokens = 0;                // this rank's tokens in the step
  int64_t routed_rows = 0;           // kept (token, expert) pairs of this rank's tokens
  std::vector<int64_t> rows_to;      // [P] rows sent to each rank (self included)
  std::vector<int64_t> rows_from;    // [P] rows received from each rank (self included)
  std::vector<int64_t> expert_rows;  // [local experts] rows each local expert ran
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

// Every rank's statistics of a step, gathered (ExpertParallelMoELayer::gather_stats).
struct RankLoad {
  int64_t tokens = 0;
  int64_t rows_computed = 0;  // rows this rank's experts ran
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
};

struct ExpertParallelWorkspace {
  int64_t max_tokens = 0;     // per step on this rank
  Routing routing;            // the routing of this rank's tokens in the last step
  DispatchPlan plan;          // rows grouped by (destination rank, local expert)
  std::vector<float> xe, ye;  // this rank's routed rows in plan order: sent, and returned
  std::vector<float> xr;      // received rows in (source, local expert) order; results go back
  std::vector<float> xl, yl;  // received rows in (local expert, source) order
  std::vector<int64_t> send_counts, recv_counts;  // [P x max local experts]
  std::vector<int64_t> send_rows, recv_rows;      // [P]
  std::vector<int64_t> local_offsets;             // [local experts + 1]
  std::vector<int64_t> local_row;                 // received row -> row in xl
  ExpertGroupWorkspace experts;
  std::vector<float> scratch, extra;  // shared experts, residual MLP
  std::vector<int32_t> active_tokens;
  std::vector<float> x32, y32;  // fp16 / bf16 steps: x widened, y before rounding
  ExpertParallelStats stats;
};

class ExpertParallelMoELayer {
 public:
  using Workspace = ExpertParallelWorkspace;
  using RunOptions = MoeRunOptions;

  // local_experts[l] is expert placement.experts_of(comm->rank())[l]. The router, shared experts
  // and residual are the full layer's (replicated). comm->size() must equal placement.ranks().
  ExpertParallelMoELayer(std::shared_ptr<Communicator> comm, ExpertPlacement placement,
                         Router router, std::vector<std::shared_ptr<const ExpertMLP>> local_experts,
                         int64_t hidden, std::vector<SharedExpert> shared = {},
                         std::optional<ResidualMLP> residual = {},
                         std::vector<float> output_bias = {});
  // This rank's part of a layer built in memory (the weights are shared with it, not copied).
  static ExpertParallelMoELayer from_layer(const MoELayer& layer,
                                           std::shared_ptr<Communicator> comm,
                                           ExpertPlacement placement);

  Communicator& communicator() const { return *comm_; }
  const ExpertPlacement& placement() const { return placement_; }
  const Router& router() const { return router_; }
  int64_t hidden() const { return hidden_; }
  int64_t num_experts() const { return placement_.num_experts(); }
  const ExpertGroup& local_experts() const { return experts_; }
  // The global ids of the experts this rank holds.
  std::span<const int64_t> local_expert_ids() const { return placement_.experts_of(comm_->rank()); }
  // The weights this rank holds (local experts, router, shared experts, residual).
  LayerStats stats() const;

  // Buffers for steps of up to max_tokens tokens on this rank. The rows this rank receives are
  // planned for ranks x max_tokens x min(top-k, local experts); when other ranks send more (their
  // max_tokens is larger), the receive buffers grow once, in that step.
  Workspace make_workspace(int64_t max_tokens) const;
  // y [T, H] = layer(x [T, H]) for this rank's T tokens (T may be 0). Collective: every rank
  // calls run() for the same step. ws.stats describes the step afterwards.
  void run(MatrixView<const float> x, MatrixView<float> y, Workspace& ws,
           const RunOptions& options = {});
  // The same on fp16 / bf16 hidden states (as MoELayer::run: fp32 inside, y rounded once).
  template <HalfActivation T>
  void run(MatrixView<const T> x, MatrixView<T> y, Workspace& ws, const RunOptions& options = {});
  // Every rank's load in the last step (collective); entry p is rank p's.
  std::vector<RankLoad> gather_stats(const Workspace& ws);

 private:
  std::shared_ptr<Communicator> comm_;
  ExpertPlacement placement_;
  Router router_;
  ExpertGroup experts_;
  WeightPlacement weight_placement() const {
    return router_.config().scale_input ? WeightPlacement::kInput : WeightPlacement::kOutput;
  }
  std::vector<SharedExpert> shared_;
  std::optional<ResidualMLP> residual_;
  std::vector<float> output_bias_;
  int64_t hidden_ = 0;
  int64_t max_dense_intermediate_ = 0;
  std::vector<int32_t> bucket_;  // expert -> position in rank-by-rank order
};

// Loads this rank's part of the layer at `prefix`: the router, shared experts and the experts
// placement.experts_of(comm->rank()); the other experts' tensors are never read (a rank maps the
// checkpoint but touches only its own experts' bytes).
ExpertParallelMoELayer load_expert_parallel_layer(const Checkpoint& ckpt, std::string_view prefix,
                                                  const MoeConfig& config,
                                                  std::shared_ptr<Communicator> comm,
                                                  ExpertPlacement placement,
                                                  const LoadOptions& options = {});

extern template void ExpertParallelMoELayer::run<Half>(MatrixView<const Half>, MatrixView<Half>,
                                                       ExpertParallelWorkspace&,
                                                       const MoeRunOptions&);
extern template void ExpertParallelMoELayer::run<BFloat16>(MatrixView<const BFloat16>,
                                                           MatrixView<BFloat16>,
                                                           ExpertParallelWorkspace&,
                                                           const MoeRunOptions&);

}  // namespace moqe
