// Dispatch and combine on the device: the kept slots sorted by expert with CUB's stable radix
// sort (rows of one expert stay in token order, as the CPU's counting sort leaves them), expert
// offsets by binary search in the sorted keys, and the element-wise kernels of the layer
// (gather, combine, shared-expert add; the activation and the routing weights are GEMM
// epilogues).
#include <thrust/iterator/counting_iterator.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include "check.cuh"
#include "moe_kernels.cuh"
#include "moqe/cuda/moe.hpp"

namespace moqe::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  MOQE_CHECK(b <= 0x7fffffff, "cuda: {} elements need too many blocks", n);
  return static_cast<unsigned>(b > 0 ? b : 1);
}

int key_bits(int64_t num_experts) {  // keys are 0..E (E marks a dropped slot)
  int bits = 1;
  while ((int64_t{1} << bits) <= num_experts) ++bits;
  return bits;
}

__global__ void make_keys(const int32_t* __restrict__ ids, const uint8_t* __restrict__ kept,
                          int64_t n, uint32_t e, uint32_t* __restrict__ keys,
                          int32_t* __restrict__ slot, int32_t* __restrict__ slot_row) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  keys[i] = kept[i] ? static_cast<uint32_t>(ids[i]) : e;
  slot[i] = static_cast<int32_t>(i);
  slot_row[i] = -1;
}

// offsets[j] = the first sorted position whose key is >= j, j = 0..E.
__global__ void find_offsets(const uint32_t* __restrict__ keys, int64_t n, int64_t e,
                             int64_t* __restrict__ offsets) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j > e) return;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < static_cast<uint32_t>(j)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[j] = lo;
}

__global__ void scatter_slot_row(const int32_t* __restrict__ row_slot,
                                 const int64_t* __restrict__ rows_at, int64_t n,
                                 int32_t* __restrict__ slot_row) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n || r >= *rows_at) return;
  slot_row[row_slot[r]] = static_cast<int32_t>(r);
}

template <class T>
__device__ __forceinline__ T to_act(float v) {
  return T(v);
}

// One block per row; threads over the hidden size.
template <class TIn>
__global__ void gather_rows(const float* __restrict__ x, int64_t h,
                            const int32_t* __restrict__ row_slot, int64_t slots,
                            const int64_t* __restrict__ rows_at, TIn* __restrict__ xe) {
  const int64_t r = blockIdx.x;
  if (r >= *rows_at) return;
  const float* src = x + static_cast<int64_t>(row_slot[r] / slots) * h;
  TIn* dst = xe + r * h;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = to_act<TIn>(src[c]);
}

template <class TIn>
__global__ void convert(const float* __restrict__ x, int64_t n, TIn* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = to_act<TIn>(x[i]);
}

// One block per token; threads over the hidden size; the rows of its kept slots (already scaled
// by their routing weights in the down projection's epilogue) summed in slot order.
__global__ void combine(const float* __restrict__ x, const float* __restrict__ ye,
                        const int32_t* __restrict__ slot_row, const float* __restrict__ weights,
                        const uint8_t* __restrict__ passthrough, int64_t slots, int64_t h,
                        float* __restrict__ y) {
  const int64_t t = blockIdx.x;
  const bool pass = passthrough[t] != 0;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < slots; ++j) {
      const int32_t r = slot_row[t * slots + j];
      if (r >= 0) acc += ye[static_cast<int64_t>(r) * h + c];
    }
    if (pass) acc = weights[t * slots] * x[t * h + c];
    y[t * h + c] = acc;
  }
}

// One block per token: the gate's dot product (block reduction), then the scaled add.
__global__ void add_shared(const float* __restrict__ x, const float* __restrict__ ys,
                           const float* __restrict__ gate, const uint8_t* __restrict__ active,
                           int64_t h, float* __restrict__ y) {
  const int64_t t = blockIdx.x;
  if (active != nullptr && !active[t]) return;
  __shared__ float partial[kThreads / 32];
  __shared__ float g_shared;
  if (gate != nullptr) {
    float s = 0.0f;
    for (int64_t c = threadIdx.x; c < h; c += blockDim.x) s += gate[c] * x[t * h + c];
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float d = 0.0f;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) d += partial[w];
      g_shared = 1.0f / (1.0f + expf(-d));
    }
    __syncthreads();
  } else if (threadIdx.x == 0) {
    g_shared = 1.0f;
  }
  __syncthreads();
  const float g = g_shared;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) y[t * h + c] += g * ys[t * h + c];
}

// Expert e has rows (the predicate of the active-expert selection).
struct HasRows {
  const int64_t* offsets;
  __device__ bool operator()(int32_t e) const { return offsets[e + 1] > offsets[e]; }
};

// The active experts' length: at most one per kept slot.
int64_t active_entries(int64_t max_slots, int64_t num_experts) {
  return std::max<int64_t>(std::min(num_experts, max_slots), 1);
}

}  // namespace

DeviceDispatch make_dispatch(int64_t max_slots, int64_t num_experts) {
  MOQE_CHECK(max_slots >= 0 && max_slots <= 0x7fffffff && num_experts > 0,
             "cuda::make_dispatch: {} slots over {} experts", max_slots, num_experts);
  DeviceDispatch d;
  d.max_slots = max_slots;
  d.num_experts = num_experts;
  const auto n = static_cast<size_t>(std::max<int64_t>(max_slots, 1));
  d.keys = DeviceBuffer(n * sizeof(uint32_t));
  d.keys_sorted = DeviceBuffer(n * sizeof(uint32_t));
  d.slot = DeviceBuffer(n * sizeof(int32_t));
  d.row_slot = DeviceBuffer(n * sizeof(int32_t));
  d.slot_row = DeviceBuffer(n * sizeof(int32_t));
  d.offsets = DeviceBuffer(static_cast<size_t>(num_experts + 1) * sizeof(int64_t));
  size_t temp = 0;
  MOQE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp, d.keys.as<uint32_t>(), d.keys_sorted.as<uint32_t>(), d.slot.as<int32_t>(),
      d.row_slot.as<int32_t>(), static_cast<int>(n), 0, key_bits(num_experts)));
  d.sort_temp = DeviceBuffer(std::max<size_t>(temp, 1));
  d.active =
      DeviceBuffer(static_cast<size_t>(active_entries(max_slots, num_experts)) * sizeof(int32_t));
  d.active_count = DeviceBuffer(sizeof(int32_t));
  size_t select = 0;
  MOQE_CUDA_CHECK(cub::DeviceSelect::If(nullptr, select, thrust::counting_iterator<int32_t>(0),
                                        d.active.as<int32_t>(), d.active_count.as<int32_t>(),
                                        static_cast<int>(num_experts),
                                        HasRows{d.offsets.as<int64_t>()}));
  d.select_temp = DeviceBuffer(std::max<size_t>(select, 1));
  return d;
}

void build_dispatch(const DeviceRouting& routing, DeviceDispatch& d, Stream stream) {
  const int64_t n = routing.tokens * routing.slots, e = routing.num_experts;
  MOQE_CHECK(e == d.num_experts && n <= d.max_slots,
             "cuda::build_dispatch: a routing of {} slots over {} experts does not fit a "
             "dispatch of {} slots over {}",
             n, e, d.max_slots, d.num_experts);
  // No expert active until the selection below says which (-1 in every entry).
  MOQE_CUDA_CHECK(cudaMemsetAsync(d.active.data(), 0xff, d.active.size(), stream));
  if (n == 0) {
    MOQE_CUDA_CHECK(cudaMemsetAsync(d.offsets.data(), 0, d.offsets.size(), stream));
    MOQE_CUDA_CHECK(cudaMemsetAsync(d.active_count.data(), 0, d.active_count.size(), stream));
    return;
  }
  make_keys<<<grid_for(n), kThreads, 0, stream>>>(
      routing.ids.as<int32_t>(), routing.kept.as<uint8_t>(), n, static_cast<uint32_t>(e),
      d.keys.as<uint32_t>(), d.slot.as<int32_t>(), d.slot_row.as<int32_t>());
  MOQE_CUDA_CHECK(cudaGetLastError());
  size_t temp = 0;
  MOQE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp, d.keys.as<uint32_t>(), d.keys_sorted.as<uint32_t>(), d.slot.as<int32_t>(),
      d.row_slot.as<int32_t>(), static_cast<int>(n), 0, key_bits(e)));
  MOQE_CHECK(temp <= d.sort_temp.size(),
             "cuda::build_dispatch: the sort needs {} bytes of temporary storage, {} planned", temp,
             d.sort_temp.size());
  temp = d.sort_temp.size();
  MOQE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      d.sort_temp.data(), temp, d.keys.as<uint32_t>(), d.keys_sorted.as<uint32_t>(),
      d.slot.as<int32_t>(), d.row_slot.as<int32_t>(), static_cast<int>(n), 0, key_bits(e), stream));
  find_offsets<<<grid_for(e + 1), kThreads, 0, stream>>>(d.keys_sorted.as<uint32_t>(), n, e,
                                                         d.offsets.as<int64_t>());
  MOQE_CUDA_CHECK(cudaGetLastError());
  scatter_slot_row<<<grid_for(n), kThreads, 0, stream>>>(
      d.row_slot.as<int32_t>(), d.offsets.as<int64_t>() + e, n, d.slot_row.as<int32_t>());
  MOQE_CUDA_CHECK(cudaGetLastError());
  // The experts with rows, in increasing order, into the first entries of d.active: at most
  // min(E, n) of them, which is the list's length.
  size_t select = 0;
  MOQE_CUDA_CHECK(cub::DeviceSelect::If(nullptr, select, thrust::counting_iterator<int32_t>(0),
                                        d.active.as<int32_t>(), d.active_count.as<int32_t>(),
                                        static_cast<int>(e), HasRows{d.offsets.as<int64_t>()}));
  MOQE_CHECK(select <= d.select_temp.size(),
             "cuda::build_dispatch: the expert selection needs {} bytes of temporary storage, {} "
             "planned",
             select, d.select_temp.size());
  select = d.select_temp.size();
  MOQE_CUDA_CHECK(cub::DeviceSelect::If(
      d.select_temp.data(), select, thrust::counting_iterator<int32_t>(0), d.active.as<int32_t>(),
      d.active_count.as<int32_t>(), static_cast<int>(e), HasRows{d.offsets.as<int64_t>()}, stream));
}

void download_dispatch(const DeviceDispatch& d, std::vector<int64_t>& offsets,
                       std::vector<int32_t>& row_slot, Stream stream) {
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream));
  offsets.resize(static_cast<size_t>(d.num_experts + 1));
  d.offsets.download(std::span<int64_t>(offsets));
  row_slot.resize(static_cast<size_t>(offsets.back()));
  if (!row_slot.empty()) {
    d.row_slot.download(row_slot.data(), row_slot.size() * sizeof(int32_t));
  }
}

namespace detail {

template <class TIn>
void launch_gather(const float* x, int64_t h, const int32_t* row_slot, int64_t slots,
                   const int64_t* rows_at, int64_t max_rows, TIn* xe, Stream stream) {
  if (max_rows == 0) return;
  gather_rows<TIn>
      <<<grid_for(max_rows, 1), kThreads, 0, stream>>>(x, h, row_slot, slots, rows_at, xe);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

template <class TIn>
void launch_convert(const float* x, int64_t n, TIn* out, Stream stream) {
  if (n == 0) return;
  convert<TIn><<<grid_for(n), kThreads, 0, stream>>>(x, n, out);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const float* x, const float* ye, const int32_t* slot_row, const float* weights,
                    const uint8_t* passthrough, int64_t tokens, int64_t slots, int64_t h, float* y,
                    Stream stream) {
  if (tokens == 0) return;
  combine<<<grid_for(tokens, 1), kThreads, 0, stream>>>(x, ye, slot_row, weights, passthrough,
                                                        slots, h, y);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

void launch_add_shared(const float* x, const float* ys, const float* gate, const uint8_t* active,
                       int64_t tokens, int64_t h, float* y, Stream stream) {
  if (tokens == 0) return;
  add_shared<<<grid_for(tokens, 1), kThreads, 0, stream>>>(x, ys, gate, active, h, y);
  MOQE_CUDA_CHECK(cudaGetLastError());
}

#define MOQE_MOE_KERNELS(T)                                                                      \
  template void launch_gather<T>(const float*, int64_t, const int32_t*, int64_t, const int64_t*, \
                                 int64_t, T*, Stream);                                           \
  template void launch_convert<T>(const float*, int64_t, T*, Stream);
MOQE_MOE_KERNELS(Half)
MOQE_MOE_KERNELS(BFloat16)
#undef MOQE_MOE_KERNELS

}  // namespace detail
}  // namespace moqe::cuda
