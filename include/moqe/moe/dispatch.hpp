// Dispatch plan: the kept (token, slot) pairs of a Routing grouped by expert with a stable
// counting sort (histogram -> exclusive scan -> scatter), as DeepSpeed-MoE and FasterTransformer
// group tokens instead of running sparse einsums. Rows of one expert are contiguous and in token
// order; gather/combine move activations between token order and expert order.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moqe/core/view.hpp"
#include "moqe/moe/router.hpp"

namespace moqe {

class DispatchPlan {
 public:
  // Sizes the buffers for up to max_tokens tokens (build() then never allocates).
  void reserve(int64_t max_tokens, int64_t slots, int64_t num_experts);
  // Groups the kept slots of `routing` by expert.
  void build(const Routing& routing);
  // Groups them by bucket[expert] instead (a permutation of 0..E-1): offsets and expert_rows are
  // then indexed by bucket. The expert-parallel layer orders experts rank by rank this way.
  void build(const Routing& routing, std::span<const int32_t> bucket);

  int64_t tokens() const { return tokens_; }
  int64_t slots() const { return slots_; }
  int64_t num_experts() const { return num_experts_; }
  int64_t rows() const { return offsets_.empty() ? 0 : offsets_[num_experts_]; }
  // Rows [offset(e), offset(e + 1)) belong to expert e.
  int64_t offset(int64_t e) const { return offsets_[e]; }
  int64_t expert_rows(int64_t e) const { return offsets_[e + 1] - offsets_[e]; }
  std::span<const int64_t> offsets() const { return {offsets_.data(), size_t(num_experts_ + 1)}; }
  std::span<const int32_t> row_token() const { return {row_token_.data(), size_t(rows())}; }
  std::span<const int64_t> row_slot() const { return {row_slot_.data(), size_t(rows())}; }
  std::span<const float> row_weight() const { return {row_weight_.data(), size_t(rows())}; }
  // The row of flat slot t * slots + j, or -1 when the slot is not kept.
  std::span<const int64_t> slot_row() const { return {slot_row_.data(), size_t(tokens_ * slots_)}; }

 private:
  int64_t tokens_ = 0, slots_ = 0, num_experts_ = 0;
  std::vector<int64_t> offsets_;    // [E + 1]
  std::vector<int64_t> cursor_;     // [E] scatter positions
  std::vector<int32_t> row_token_;  // [rows]
  std::vector<int64_t> row_slot_;   // [rows]
  std::vector<float> row_weight_;   // [rows]
  std::vector<int64_t> slot_row_;   // [T * slots]
};

// Where a slot's routing weight applies: to the expert's output (every family but one) or to its
// input (Llama 4: the expert sees weight * x, and its output is summed unweighted).
enum class WeightPlacement : uint8_t { kOutput, kInput };

// xe[row] = x[row_token[row]] for every row of the plan (times the row's weight for kInput).
void gather_rows(const DispatchPlan& plan, MatrixView<const float> x, MatrixView<float> xe,
                 int num_threads = 0, WeightPlacement placement = WeightPlacement::kOutput);
// y[t] = sum over the kept slots j of t, in slot order, of weight * ye[row(t, j)] (kInput: of
// ye[row(t, j)]); rows of tokens with no kept slot are set to 0. Deterministic whatever the thread
// count.
void combine_rows(const DispatchPlan& plan, MatrixView<const float> ye, MatrixView<float> y,
                  int num_threads = 0, WeightPlacement placement = WeightPlacement::kOutput);

}  // namespace moqe
