// Launchers of the MoE layer's element-wise kernels (cuda/moe_dispatch.cu), used by
// cuda/moe_layer.cu. Row counts that only the device knows are read from offsets[E] there; the
// host passes upper bounds.
#pragma once

#include <cstdint>

#include "moqe/core/dtypes.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/moe/expert.hpp"

namespace moqe::cuda::detail {

// xe[r] = TIn(x[row_slot[r] / slots]) for r < rows, rows = *rows_at (device); max_rows bounds it.
template <class TIn>
void launch_gather(const float* x, int64_t h, const int32_t* row_slot, int64_t slots,
                   const int64_t* rows_at, int64_t max_rows, TIn* xe, Stream stream);
// x converted to TIn, all t rows.
template <class TIn>
void launch_convert(const float* x, int64_t n, TIn* out, Stream stream);
// y[t] = sum over kept slots j of t, in slot order, of ye[slot_row[t, j]] (rows already scaled
// by their routing weights); pass-through tokens output w[t, 0] * x[t]; others with no kept slot
// output 0.
void launch_combine(const float* x, const float* ye, const int32_t* slot_row, const float* weights,
                    const uint8_t* passthrough, int64_t tokens, int64_t slots, int64_t h, float* y,
                    Stream stream);
// y[t] += g_t * ys[t] for active tokens (active null: all), g_t = sigmoid(gate . x[t]) when gate
// is not null, else 1.
void launch_add_shared(const float* x, const float* ys, const float* gate, const uint8_t* active,
                       int64_t tokens, int64_t h, float* y, Stream stream);

}  // namespace moqe::cuda::detail
