#include "moqe/moe/dispatch.hpp"

#include <algorithm>
#include <cstring>

#include "moqe/core/threading.hpp"

namespace moqe {

void DispatchPlan::reserve(int64_t max_tokens, int64_t slots, int64_t num_experts) {
  offsets_.reserve(static_cast<size_t>(num_experts + 1));
  cursor_.reserve(static_cast<size_t>(num_experts));
  const auto n = static_cast<size_t>(max_tokens * slots);
  row_token_.reserve(n);
  row_slot_.reserve(n);
  row_weight_.reserve(n);
  slot_row_.reserve(n);
}

void DispatchPlan::build(const Routing& r) { build(r, {}); }

void DispatchPlan::build(const Routing& r, std::span<const int32_t> bucket) {
  MOQE_CHECK(bucket.empty() || static_cast<int64_t>(bucket.size()) == r.num_experts,
             "DispatchPlan: {} buckets for {} experts", bucket.size(), r.num_experts);
  auto bucket_of = [&](int32_t e) { return bucket.empty() ? e : bucket[e]; };
  tokens_ = r.tokens;
  slots_ = r.slots;
  num_experts_ = r.num_experts;
  const int64_t n = tokens_ * slots_;
  offsets_.assign(static_cast<size_t>(num_experts_ + 1), 0);
  for (int64_t s = 0; s < n; ++s) {  // histogram
    if (!r.kept[s]) continue;
    MOQE_CHECK(r.ids[s] >= 0 && r.ids[s] < num_experts_,
               "DispatchPlan: kept slot {} of token {} names expert {} of {}", s % slots_,
               s / slots_, r.ids[s], num_experts_);
    const int32_t b = bucket_of(r.ids[s]);
    MOQE_CHECK(b >= 0 && b < num_experts_, "DispatchPlan: expert {} has bucket {} of {}", r.ids[s],
               b, num_experts_);
    offsets_[b + 1]++;
  }
  for (int64_t e = 0; e < num_experts_; ++e) offsets_[e + 1] += offsets_[e];  // scan
  cursor_.assign(offsets_.begin(), offsets_.end() - 1);
  const auto rows = static_cast<size_t>(offsets_[num_experts_]);
  row_token_.resize(rows);
  row_slot_.resize(rows);
  row_weight_.resize(rows);
  slot_row_.assign(static_cast<size_t>(n), -1);
  for (int64_t s = 0; s < n; ++s) {  // scatter, in (token, slot) order: stable
    if (!r.kept[s]) continue;
    const int64_t row = cursor_[bucket_of(r.ids[s])]++;
    row_token_[row] = static_cast<int32_t>(s / slots_);
    row_slot_[row] = s;
    row_weight_[row] = r.weights[s];
    slot_row_[s] = row;
  }
}

void gather_rows(const DispatchPlan& plan, MatrixView<const float> x, MatrixView<float> xe,
                 int num_threads, WeightPlacement placement) {
  MOQE_CHECK(xe.rows() >= plan.rows() && xe.cols() == x.cols() && x.rows() == plan.tokens(),
             "gather_rows: x {} and buffer {} do not fit a plan of {} tokens and {} rows",
             shape_string(x), shape_string(xe), plan.tokens(), plan.rows());
  const auto tok = plan.row_token();
  const auto weight = plan.row_weight();
  const bool scale = placement == WeightPlacement::kInput;
  parallel_for(plan.rows(), num_threads, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (scale) {
        const float w = weight[r];
        const float* src = x.row(tok[r]);
        float* dst = xe.row(r);
        for (int64_t c = 0; c < x.cols(); ++c) dst[c] = src[c] * w;
      } else {
        std::memcpy(xe.row(r), x.row(tok[r]), sizeof(float) * static_cast<size_t>(x.cols()));
      }
    }
  });
}

void combine_rows(const DispatchPlan& plan, MatrixView<const float> ye, MatrixView<float> y,
                  int num_threads, WeightPlacement placement) {
  MOQE_CHECK(ye.rows() >= plan.rows() && ye.cols() == y.cols() && y.rows() == plan.tokens(),
             "combine_rows: expert outputs {} and y {} do not fit a plan of {} tokens and {} rows",
             shape_string(ye), shape_string(y), plan.tokens(), plan.rows());
  const auto slot_row = plan.slot_row();
  const auto weight = plan.row_weight();
  const int64_t h = y.cols(), slots = plan.slots();
  parallel_for(plan.tokens(), num_threads, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* out = y.row(t);
      std::fill_n(out, h, 0.0f);
      for (int64_t j = 0; j < slots; ++j) {
        const int64_t row = slot_row[t * slots + j];
        if (row < 0) continue;
        const float* src = ye.row(row);
        if (placement == WeightPlacement::kInput) {
          for (int64_t c = 0; c < h; ++c) out[c] += src[c];
        } else {
          const float w = weight[row];
          for (int64_t c = 0; c < h; ++c) out[c] += w * src[c];
        }
      }
    }
  });
}

}  // namespace moqe
