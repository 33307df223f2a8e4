#include <climits>
#include <cmath>
#include <vector>

#include "check.cuh"
#include "moqe/cuda/router.hpp"

namespace moqe::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint64_t kNoBadTask = ~uint64_t{0};

// DeviceRouting::scratch: a 64-byte control block (uint64 first bad task key, int64 number of
// tasks for its message, int64 active tokens), the switch sequence ends (int64 [max_tokens + 1]),
// the scores (float [max_tokens, E]; logits, then probabilities in place) and, for the grouped
// routers, per token the group scores (float [n_group]) and the kept groups (int32 [topk_group]).
struct ScratchLayout {
  size_t seq_ends = 0, scores = 0, group_score = 0, keep = 0, total = 0;
};

constexpr size_t kBadTaskAt = 0, kTaskCountAt = 8, kActiveAt = 16, kControlBytes = 64;

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

bool is_grouped(const RouterConfig& c) {
  return c.kind == RouterKind::kDeepSeekV3 ||
         (c.kind == RouterKind::kDeepSeekV2 && c.topk_method == TopkMethod::kGroupLimitedGreedy);
}

ScratchLayout scratch_layout(const RouterConfig& c, int64_t max_tokens) {
  const size_t t = static_cast<size_t>(max_tokens);
  ScratchLayout l;
  l.seq_ends = kControlBytes;
  l.scores = align256(l.seq_ends + (t + 1) * sizeof(int64_t));
  const size_t scores = c.kind == RouterKind::kTask ? 0 : t * c.num_experts * sizeof(float);
  l.group_score = align256(l.scores + scores);
  const bool grouped = is_grouped(c);
  l.keep = align256(l.group_score + (grouped ? t * c.n_group * sizeof(float) : 0));
  l.total = l.keep + (grouped ? t * c.topk_group * sizeof(int32_t) : 0);
  return l;
}

// --- numerics shared with src/moe/router.cpp (ported statement by statement) ---------------

// a ranks above b: larger first, NaN last, then the lower index.
__device__ __forceinline__ bool ranks_above(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = isnan(va), nb = isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

// topk_indices with the values and the exclusion given as functions of the index, so that the
// grouped routers' masked scores need no [T, E] buffer. out is read back for the taken check.
template <class Value, class Excluded>
__device__ void topk_dev(int64_t n, int64_t k, int32_t* out, Value value, Excluded excluded) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float best_v = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (excluded(i)) continue;
      bool taken = false;
      for (int64_t p = 0; p < j; ++p) taken = taken || out[p] == i;
      if (taken) continue;
      const float v = value(i);
      if (best < 0 || ranks_above(v, i, best_v, best)) {
        best = i;
        best_v = v;
      }
    }
    out[j] = static_cast<int32_t>(best);
  }
}

__device__ void softmax_dev(float* v, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = (m < v[i]) ? v[i] : m;  // std::max(m, v[i]), NaN kept out
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = expf(v[i] - m);
    sum += v[i];
  }
  for (int64_t i = 0; i < n; ++i) v[i] /= sum;
}

// ceil(a / b), saturating like the host's ceil_div.
__device__ int64_t ceil_div_dev(double a, double b) {
  const double q = ceil(a / b);
  return q < 9.2e18 ? static_cast<int64_t>(q) : LLONG_MAX;
}

__device__ __forceinline__ bool is_active(const uint8_t* active, int64_t t) {
  return active == nullptr || active[t] != 0;
}

// --- logits -----------------------------------------------------------------------------------

constexpr int kLogitWarps = 8;   // experts per block
constexpr int kLogitTokens = 4;  // tokens per warp: each gate value loaded once serves four

// scores [T, E] = x [T, H] (row stride ldx) . Wg [E, H]^T. Block (token tile, expert tile): warp w
// computes expert blockIdx.y * 8 + w for tokens blockIdx.x * 4 .. + 3; lane l sums h = l, l + 32,
// ... (coalesced rows of x and Wg) and a butterfly shuffle adds the 32 partial sums.
__global__ void __launch_bounds__(kLogitWarps * 32)
    logits_kernel(const float* __restrict__ x, int64_t tokens, int64_t ldx,
                  const float* __restrict__ gate, int64_t hidden, int64_t experts,
                  float* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kLogitWarps + (threadIdx.x >> 5);
  if (e >= experts) return;  // whole warps only
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kLogitTokens;
  const int n = static_cast<int>(tokens - t0 < kLogitTokens ? tokens - t0 : kLogitTokens);
  const float* w = gate + e * hidden;
  float acc[kLogitTokens] = {0, 0, 0, 0};
  for (int64_t h = lane; h < hidden; h += 32) {
    const float wv = __ldg(w + h);
#pragma unroll
    for (int i = 0; i < kLogitTokens; ++i) {
      if (i < n) acc[i] = fmaf(__ldg(x + (t0 + i) * ldx + h), wv, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kLogitTokens; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(kFullMask, acc[i], o);
    if (lane == 0 && i < n) scores[(t0 + i) * experts + e] = acc[i];
  }
}

// --- per-token selection ----------------------------------------------------------------------

struct SelectParams {
  RouterKind kind;
  TopkMethod topk_method;
  bool norm_topk_prob;
  int64_t experts, top_k, slots, n_group, topk_group;
  float routed_scaling_factor;
  float norm_epsilon, norm_min;  // renormalization: w /= max(sum + norm_epsilon, norm_min)
  const float* bias;             // [E] or nullptr
  const int32_t* task_experts;
  const float* task_weights;
  int64_t num_tasks;
  int32_t task_id;
  const int32_t* task_ids;  // [T] or nullptr
  const uint8_t* active;    // [T] or nullptr
  float* scores;            // [T, E]
  float* group_score;       // [T, n_group] (grouped routers)
  int32_t* keep;            // [T, topk_group] (grouped routers)
  int32_t* ids;
  float* weights;
  uint8_t* kept;
  uint8_t* passthrough;
  unsigned long long* bad_task;  // min of (token << 32 | id) over bad task ids
  int64_t* task_count;
};

// One thread per token, a serial port of Router::route's per-token body, for routers with more
// experts than select_warp_kernel holds. Every slot of the token is written (ids -1, weights 0,
// kept 0 first), so the outputs need no clearing. The token's score row is softmaxed (or
// sigmoided) in place; expert choice stops there and selects per expert.
// Task routing of token t: the task's experts and weights, or no slots (and the token flagged
// for download() to report) when its task id is out of range.
__device__ void route_task(const SelectParams& p, int64_t t, int32_t* ids, float* w,
                           uint8_t* kept) {
  const int64_t k = p.top_k;
  const int32_t id = p.task_ids != nullptr ? p.task_ids[t] : p.task_id;
  if (id < 0 || id >= p.num_tasks) {
    atomicMin(p.bad_task, (static_cast<unsigned long long>(t) << 32) | static_cast<uint32_t>(id));
    *p.task_count = p.num_tasks;
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = p.task_experts[id * k + j];
    w[j] = p.task_weights[id * k + j];
    kept[j] = 1;
  }
}

// Expert i lies outside the topk_group groups kept for the token.
__device__ __forceinline__ bool outside_kept_groups(int64_t i, int64_t gsize, const int32_t* keep,
                                                    int64_t topk_group) {
  const int64_t g = i / gsize;
  for (int64_t j = 0; j < topk_group; ++j) {
    if (keep[j] == g) return false;
  }
  return true;
}

__global__ void select_kernel(SelectParams p, int64_t tokens) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int64_t e = p.experts, k = p.top_k;
  int32_t* ids = p.ids + t * p.slots;
  float* w = p.weights + t * p.slots;
  uint8_t* kept = p.kept + t * p.slots;
  for (int64_t j = 0; j < p.slots; ++j) {
    ids[j] = -1;
    w[j] = 0.0f;
    kept[j] = 0;
  }
  p.passthrough[t] = 0;
  if (!is_active(p.active, t)) return;

  if (p.kind == RouterKind::kTask) {
    route_task(p, t, ids, w, kept);
    return;
  }
  float* s = p.scores + t * e;
  if (p.kind == RouterKind::kExpertChoice) {
    softmax_dev(s, e);
    return;
  }
  const int64_t n_group = p.n_group, gsize = e / n_group;
  float* group_score = p.group_score + t * n_group;
  int32_t* keep = p.keep + t * p.topk_group;
  auto masked = [&](int64_t i) { return outside_kept_groups(i, gsize, keep, p.topk_group); };
  auto none = [](int64_t) { return false; };
  auto mask_groups = [&]() {
    topk_dev(
        n_group, p.topk_group, keep, [&](int64_t g) { return group_score[g]; }, none);
  };
  switch (p.kind) {
    case RouterKind::kSoftmaxTopK:
    case RouterKind::kMixtral:
    case RouterKind::kSwitch: {
      softmax_dev(s, e);
      topk_dev(
          e, k, ids, [&](int64_t i) { return s[i]; }, none);
      float sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += (w[j] = s[ids[j]]);
      const bool renorm = p.kind == RouterKind::kMixtral ||
                          (p.kind == RouterKind::kSoftmaxTopK && p.norm_topk_prob);
      if (renorm) {
        const float d = fmaxf(sum + p.norm_epsilon, p.norm_min);
        for (int64_t j = 0; j < k; ++j) w[j] /= d;
      }
      break;
    }
    case RouterKind::kDeepSeekV2: {
      softmax_dev(s, e);
      if (p.topk_method == TopkMethod::kGroupLimitedGreedy) {
        for (int64_t g = 0; g < n_group; ++g) {  // std::max_element: the first largest
          float best = s[g * gsize];
          for (int64_t i = g * gsize + 1; i < (g + 1) * gsize; ++i) {
            if (best < s[i]) best = s[i];
          }
          group_score[g] = best;
        }
        mask_groups();
        // Masked experts score 0 (the reference implementation's fill value).
        topk_dev(
            e, k, ids, [&](int64_t i) { return masked(i) ? 0.0f : s[i]; }, none);
      } else {
        topk_dev(
            e, k, ids, [&](int64_t i) { return s[i]; }, none);
      }
      for (int64_t j = 0; j < k; ++j) w[j] = s[ids[j]] * p.routed_scaling_factor;
      break;
    }
    case RouterKind::kDeepSeekV3: {
      for (int64_t i = 0; i < e; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
      auto choice = [&](int64_t i) { return s[i] + (p.bias == nullptr ? 0.0f : p.bias[i]); };
      for (int64_t g = 0; g < n_group; ++g) {
        int32_t top2[2];
        topk_dev(
            gsize, 2, top2, [&](int64_t i) { return choice(g * gsize + i); }, none);
        group_score[g] = choice(g * gsize + top2[0]) + choice(g * gsize + top2[1]);
      }
      mask_groups();
      // Masked experts are excluded (their -inf fill never matters then).
      topk_dev(e, k, ids, choice, masked);
      float sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += (w[j] = s[ids[j]]);
      if (p.norm_topk_prob) {
        const float d = fmaxf(sum + p.norm_epsilon, p.norm_min);
        for (int64_t j = 0; j < k; ++j) w[j] /= d;
      }
      for (int64_t j = 0; j < k; ++j) w[j] *= p.routed_scaling_factor;
      break;
    }
    default:
      break;
  }
  for (int64_t j = 0; j < k; ++j) kept[j] = 1;
}

// --- per-token selection, one warp per token ----------------------------------------------------

// Lane l owns items l, l + 32, ... of a token (experts or groups). Each lane folds its items in
// index order and the warp combines the partial results by butterfly shuffles; ranks_above is a
// total order, so the winner is the host's winner whatever the combining order.
constexpr int64_t kWarpMaxItems = 64 * 32;  // a lane marks its taken items in 64 bits

struct Candidate {
  float v;
  int32_t i;  // -1: none
};

__device__ __forceinline__ Candidate better(Candidate a, Candidate b) {
  if (a.i < 0) return b;
  if (b.i < 0) return a;
  return ranks_above(a.v, a.i, b.v, b.i) ? a : b;
}

// topk_indices over n items with the values given by their owning lanes: out[0..k) is written by
// lane 0 and visible to the warp on return.
template <class Value, class Excluded>
__device__ void warp_topk(int64_t n, int64_t k, int32_t* out, Value value, Excluded excluded) {
  const int lane = threadIdx.x & 31;
  uint64_t taken = 0;  // bit m: item lane + 32 m
  for (int64_t j = 0; j < k; ++j) {
    Candidate c{0.0f, -1};
    int m = 0;
    for (int64_t i = lane; i < n; i += 32, ++m) {
      if (((taken >> m) & 1u) != 0 || excluded(i)) continue;
      c = better(c, Candidate{value(i), static_cast<int32_t>(i)});
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Candidate other{__shfl_xor_sync(kFullMask, c.v, o), __shfl_xor_sync(kFullMask, c.i, o)};
      c = better(c, other);
    }
    if (c.i >= 0 && (c.i & 31) == lane) taken |= uint64_t{1} << (c.i >> 5);
    if (lane == 0) out[j] = c.i;
  }
  __syncwarp();
}

// softmax_dev across the warp. The max ignores NaN as the host's does (a lane's partial never is
// NaN); the sum is added in another order than the host's, which the tests' tolerance covers
// (any order is within (E - 1) u of the exact sum). Every lane ends with the same sum (a
// butterfly adds the same two values on both lanes of each pair), so exact ties stay exact.
__device__ void warp_softmax(float* v, int64_t n) {
  const int lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int64_t i = lane; i < n; i += 32) m = (m < v[i]) ? v[i] : m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, m, o);
    m = (m < other) ? other : m;
  }
  float sum = 0;
  for (int64_t i = lane; i < n; i += 32) {
    v[i] = expf(v[i] - m);
    sum += v[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  for (int64_t i = lane; i < n; i += 32) v[i] /= sum;
  __syncwarp();
}

// select_kernel with a warp per token (E <= kWarpMaxItems): the softmax / sigmoid, the group
// scores (one lane per group, serially as the host) and each top-k step are spread over the
// lanes; the weights of the k chosen are summed by lane 0 in slot order, as the host does.
__global__ void select_warp_kernel(SelectParams p, int64_t tokens) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= tokens) return;  // whole warps
  const int64_t e = p.experts, k = p.top_k;
  int32_t* ids = p.ids + t * p.slots;
  float* w = p.weights + t * p.slots;
  uint8_t* kept = p.kept + t * p.slots;
  for (int64_t j = lane; j < p.slots; j += 32) {
    ids[j] = -1;
    w[j] = 0.0f;
    kept[j] = 0;
  }
  if (lane == 0) p.passthrough[t] = 0;
  __syncwarp();  // lane 0 rewrites some of these slots below
  if (!is_active(p.active, t)) return;

  if (p.kind == RouterKind::kTask) {
    if (lane == 0) route_task(p, t, ids, w, kept);
    return;
  }
  float* s = p.scores + t * e;
  if (p.kind == RouterKind::kExpertChoice) {
    warp_softmax(s, e);
    return;
  }
  const int64_t n_group = p.n_group, gsize = e / n_group;
  float* group_score = p.group_score + t * n_group;
  int32_t* keep = p.keep + t * p.topk_group;
  auto masked = [&](int64_t i) { return outside_kept_groups(i, gsize, keep, p.topk_group); };
  auto none = [](int64_t) { return false; };
  auto score = [&](int64_t i) { return s[i]; };
  auto group_value = [&](int64_t g) { return group_score[g]; };
  switch (p.kind) {
    case RouterKind::kSoftmaxTopK:
    case RouterKind::kMixtral:
    case RouterKind::kSwitch:
      warp_softmax(s, e);
      warp_topk(e, k, ids, score, none);
      if (lane == 0) {
        float sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += (w[j] = s[ids[j]]);
        const bool renorm = p.kind == RouterKind::kMixtral ||
                            (p.kind == RouterKind::kSoftmaxTopK && p.norm_topk_prob);
        if (renorm) {
          const float d = fmaxf(sum + p.norm_epsilon, p.norm_min);
          for (int64_t j = 0; j < k; ++j) w[j] /= d;
        }
      }
      break;
    case RouterKind::kDeepSeekV2:
      warp_softmax(s, e);
      if (p.topk_method == TopkMethod::kGroupLimitedGreedy) {
        for (int64_t g = lane; g < n_group; g += 32) {  // std::max_element: the first largest
          float best = s[g * gsize];
          for (int64_t i = g * gsize + 1; i < (g + 1) * gsize; ++i) {
            if (best < s[i]) best = s[i];
          }
          group_score[g] = best;  // read back by this lane only
        }
        warp_topk(n_group, p.topk_group, keep, group_value, none);
        warp_topk(
            e, k, ids, [&](int64_t i) { return masked(i) ? 0.0f : s[i]; }, none);
      } else {
        warp_topk(e, k, ids, score, none);
      }
      if (lane == 0) {
        for (int64_t j = 0; j < k; ++j) w[j] = s[ids[j]] * p.routed_scaling_factor;
      }
      break;
    case RouterKind::kDeepSeekV3: {
      for (int64_t i = lane; i < e; i += 32) s[i] = 1.0f / (1.0f + expf(-s[i]));
      __syncwarp();
      auto choice = [&](int64_t i) { return s[i] + (p.bias == nullptr ? 0.0f : p.bias[i]); };
      for (int64_t g = lane; g < n_group; g += 32) {
        int32_t top2[2];
        topk_dev(
            gsize, 2, top2, [&](int64_t i) { return choice(g * gsize + i); }, none);
        group_score[g] = choice(g * gsize + top2[0]) + choice(g * gsize + top2[1]);
      }
      warp_topk(n_group, p.topk_group, keep, group_value, none);
      warp_topk(e, k, ids, choice, masked);
      if (lane == 0) {
        float sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += (w[j] = s[ids[j]]);
        if (p.norm_topk_prob) {
          const float d = fmaxf(sum + p.norm_epsilon, p.norm_min);
          for (int64_t j = 0; j < k; ++j) w[j] /= d;
        }
        for (int64_t j = 0; j < k; ++j) w[j] *= p.routed_scaling_factor;
      }
      break;
    }
    default:
      break;
  }
  if (lane == 0) {
    for (int64_t j = 0; j < k; ++j) kept[j] = 1;
  }
}

// --- capacity ---------------------------------------------------------------------------------

// The number of active tokens (single block).
__global__ void count_active_kernel(const uint8_t* __restrict__ active, int64_t tokens,
                                    int64_t* __restrict__ out) {
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  unsigned long long n = 0;
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) n += is_active(active, t) ? 1 : 0;
  atomicAdd(&total, n);
  __syncthreads();
  if (threadIdx.x == 0) *out = static_cast<int64_t>(total);
}

// Admission in slot order for one expert by one warp: slots [begin, end) holding `expert` (and
// kept) are ranked by a ballot prefix count; rank >= capacity (the host's ++load > capacity) drops
// the slot. Only this warp touches this expert's slots.
__device__ void admit_warp(const int32_t* __restrict__ ids, uint8_t* __restrict__ kept,
                           uint8_t* __restrict__ passthrough, int64_t begin, int64_t end,
                           int32_t expert, int64_t capacity) {
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;
  int64_t seen = 0;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t s = base + lane;
    const bool match = s < end && ids[s] == expert && kept[s] != 0;
    const unsigned ballot = __ballot_sync(kFullMask, match);
    if (match && seen + __popc(ballot & lower) >= capacity) {
      kept[s] = 0;
      if (passthrough != nullptr) passthrough[s] = 1;
    }
    seen += __popc(ballot);
  }
}

// capacity_factor > 0 (token-choice routers): warp e admits expert e's slots over all tokens, up
// to ceil(capacity_factor * active * top_k / E).
__global__ void capacity_factor_kernel(const int32_t* __restrict__ ids, uint8_t* __restrict__ kept,
                                       int64_t n_slots, int64_t experts, int64_t top_k,
                                       double capacity_factor,
                                       const int64_t* __restrict__ n_active) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (e >= experts) return;
  const int64_t cap =
      ceil_div_dev(capacity_factor * double(*n_active) * double(top_k), double(experts));
  admit_warp(ids, kept, nullptr, 0, n_slots, static_cast<int32_t>(e), cap);
}

// Switch expert_capacity: warp (sequence, expert) admits the expert's tokens of that sequence.
// ends: the exclusive ends of the non-empty sequences (nullptr: one sequence of all tokens).
// Sequence ends travel to the device by value, kEndsPerLaunch per launch: a kernel's parameters
// are copied when it is launched (and kept by value in a captured CUDA graph), so no host buffer
// has to outlive the call, and no pageable copy sits in the stream.
constexpr int kEndsPerLaunch = 64;
struct EndsChunk {
  int64_t v[kEndsPerLaunch];
};

__global__ void store_ends_kernel(EndsChunk c, int count, int64_t* __restrict__ dst) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < count) dst[i] = c.v[i];
}

__global__ void switch_capacity_kernel(const int32_t* __restrict__ ids, uint8_t* __restrict__ kept,
                                       uint8_t* __restrict__ passthrough, int64_t tokens,
                                       const int64_t* __restrict__ ends, int64_t sequences,
                                       int64_t experts, int64_t capacity) {
  const int64_t unit = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (unit >= sequences * experts) return;
  const int64_t seq = unit / experts, e = unit % experts;
  const int64_t begin = ends == nullptr || seq == 0 ? 0 : ends[seq - 1];
  const int64_t end = ends == nullptr ? tokens : ends[seq];
  admit_warp(ids, kept, passthrough, begin, end, static_cast<int32_t>(e), capacity);
}

// --- expert choice ----------------------------------------------------------------------------

// An unsigned key that orders like ranks_above's values: larger floats larger, -0 == +0, NaN
// below -inf.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return 0;
  if (v == 0.0f) v = 0.0f;
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

constexpr int kChoiceThreads = 256;

// Block e: expert e takes its top C active tokens by probability (C as the host computes it).
// An 8-bit radix select over the keys finds the C-th largest key K and how many tokens of key K
// to take; those go in token order (the host's tie rule), by a block-wide ballot prefix count.
// Scores [T, E] are read down column e.
__global__ void __launch_bounds__(kChoiceThreads)
    expert_choice_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ active,
                         int64_t tokens, int64_t experts, int64_t top_k, int64_t expert_capacity,
                         const int64_t* __restrict__ n_active_ptr, int32_t* __restrict__ ids,
                         float* __restrict__ weights, uint8_t* __restrict__ kept) {
  __shared__ unsigned hist[256];
  __shared__ unsigned digit_s;
  __shared__ long long need_s;
  __shared__ unsigned warp_count[kChoiceThreads / 32];
  const int64_t e = blockIdx.x;
  const int64_t n_active = *n_active_ptr;
  int64_t cap = expert_capacity > 0
                    ? expert_capacity
                    : ceil_div_dev(double(n_active) * double(top_k), double(experts));
  cap = cap < n_active ? cap : n_active;
  if (cap <= 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  auto key_of = [&](int64_t t) { return order_key(scores[t * experts + e]); };

  uint32_t prefix = 0, mask = 0;
  int64_t need = cap;  // tokens still to take among those matching prefix under mask
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kChoiceThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t t = tid; t < tokens; t += kChoiceThreads) {
      if (!is_active(active, t)) continue;
      const uint32_t key = key_of(t);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t above = 0;
      for (int d = 255; d >= 0; --d) {
        if (above + hist[d] >= need) {
          digit_s = static_cast<unsigned>(d);
          need_s = need - above;
          break;
        }
        above += hist[d];
      }
    }
    __syncthreads();
    prefix |= digit_s << shift;
    mask |= 255u << shift;
    need = need_s;
    __syncthreads();
  }

  int64_t equal_before = 0;  // tokens of key == prefix met in earlier chunks
  for (int64_t base = 0; base < tokens; base += kChoiceThreads) {
    const int64_t t = base + tid;
    const bool act = t < tokens && is_active(active, t);
    const uint32_t key = act ? key_of(t) : 0;
    const bool equal = act && key == prefix;
    const unsigned ballot = __ballot_sync(kFullMask, equal);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = equal_before + __popc(ballot & ((1u << lane) - 1u)), chunk = 0;
    for (int w = 0; w < kChoiceThreads / 32; ++w) {
      if (w < warp) rank += warp_count[w];
      chunk += warp_count[w];
    }
    if ((act && key > prefix) || (equal && rank < need)) {
      const int64_t s = t * experts + e;
      ids[s] = static_cast<int32_t>(e);
      weights[s] = scores[s];
      kept[s] = 1;
    }
    equal_before += chunk;
    __syncthreads();
  }
}

unsigned blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  MOQE_CHECK(b <= INT_MAX, "cuda router: {} work items need too many blocks", n);
  return static_cast<unsigned>(b);
}

}  // namespace

std::string device_router_unsupported(const RouterConfig& c) {
  switch (c.kind) {
    case RouterKind::kTopKSoftmax:
    case RouterKind::kTopKSigmoid:
    case RouterKind::kSparseMixer:
      return fmt::format("{} routing is not implemented on the device yet", to_string(c.kind));
    default:
      break;
  }
  if (!c.router_bias.empty()) return "a router bias is not implemented on the device yet";
  if (!c.correction_bias.empty() && c.kind != RouterKind::kDeepSeekV3) {
    return fmt::format("a correction bias with {} routing is not implemented on the device yet",
                       to_string(c.kind));
  }
  if (c.norm_p != 1.0f) return "p-norm renormalization is not implemented on the device yet";
  if (c.scale_input) return "weights on the experts' input are not implemented on the device yet";
  return {};
}

DeviceRouter::DeviceRouter(const Router& router)
    : config_(router.config()), hidden_(router.hidden()) {
  const RouterConfig& c = config_;
  const std::string unsupported = device_router_unsupported(c);
  MOQE_CHECK(unsupported.empty(), "cuda router: {}", unsupported);
  if (c.kind != RouterKind::kTask) {
    const std::span<const float> g = router.gate_weight();
    gate_ = DeviceBuffer(g.size_bytes());
    gate_.upload(g);
  }
  if (c.kind == RouterKind::kDeepSeekV3 && !c.correction_bias.empty()) {
    bias_ = DeviceBuffer(c.correction_bias.size() * sizeof(float));
    bias_.upload(std::span<const float>(c.correction_bias));
  }
  if (c.kind == RouterKind::kTask) {
    std::vector<int32_t> experts;
    std::vector<float> weights;
    for (const TaskRoute& r : c.tasks) {
      experts.insert(experts.end(), r.experts.begin(), r.experts.end());
      weights.insert(weights.end(), r.weights.begin(), r.weights.end());
    }
    task_experts_ = DeviceBuffer(experts.size() * sizeof(int32_t));
    task_weights_ = DeviceBuffer(weights.size() * sizeof(float));
    task_experts_.upload(std::span<const int32_t>(experts));
    task_weights_.upload(std::span<const float>(weights));
  }
}

int64_t DeviceRouter::slots_per_token() const {
  return config_.kind == RouterKind::kExpertChoice ? config_.num_experts : config_.top_k;
}

DeviceRouting DeviceRouter::make_routing(int64_t max_tokens) const {
  MOQE_CHECK(max_tokens >= 0, "make_routing: negative max_tokens {}", max_tokens);
  MOQE_CHECK(config_.num_experts > 0, "make_routing: the router is empty (default-constructed)");
  DeviceRouting r;
  r.max_tokens = max_tokens;
  r.slots = slots_per_token();
  r.num_experts = config_.num_experts;
  const size_t n = static_cast<size_t>(max_tokens * r.slots);
  r.ids = DeviceBuffer(n * sizeof(int32_t));
  r.weights = DeviceBuffer(n * sizeof(float));
  r.kept = DeviceBuffer(n);
  r.passthrough = DeviceBuffer(static_cast<size_t>(max_tokens));
  r.scratch = DeviceBuffer(scratch_layout(config_, max_tokens).total);
  uint64_t control[kControlBytes / sizeof(uint64_t)] = {kNoBadTask};  // download() before route()
  r.scratch.upload(control, sizeof(control));
  return r;
}

void DeviceRouter::route(const float* x, int64_t tokens, int64_t ldx, DeviceRouting& out,
                         const DeviceRouteOptions& o, Stream stream) const {
  const RouterConfig& c = config_;
  const int64_t e = c.num_experts, k = c.top_k, slots = slots_per_token();
  const std::string_view name = to_string(c.kind);
  MOQE_CHECK(e > 0, "cuda router: the router is empty (default-constructed)");
  MOQE_CHECK(tokens >= 0 && tokens <= out.max_tokens,
             "{} router: {} tokens for a routing of at most {}", name, tokens, out.max_tokens);
  MOQE_CHECK(out.slots == slots && out.num_experts == e,
             "{} router: a routing of {} slots and {} experts, expected {} and {}", name, out.slots,
             out.num_experts, slots, e);
  const ScratchLayout layout = scratch_layout(c, out.max_tokens);
  MOQE_CHECK(
      out.scratch.size() >= layout.total,
      "{} router: the routing's scratch holds {} bytes, {} needed (make it with this router)", name,
      out.scratch.size(), layout.total);
  if (c.kind != RouterKind::kTask) {
    MOQE_CHECK(ldx >= hidden_, "{} router: row stride {} is smaller than the hidden size {}", name,
               ldx, hidden_);
    MOQE_CHECK(x != nullptr || tokens == 0, "{} router: null input for {} tokens", name, tokens);
  }
  if (c.kind == RouterKind::kTask && o.task_ids == nullptr && tokens > 0) {
    MOQE_CHECK(o.task_id >= 0 && o.task_id < static_cast<int32_t>(c.tasks.size()),
               "task router: task id {} of token {} is not one of the {} tasks", o.task_id, 0,
               c.tasks.size());
  }
  const bool switch_capacity = c.kind == RouterKind::kSwitch && c.expert_capacity > 0;
  int64_t nonempty = 0;  // sequences with tokens: their ends go to the device
  if (switch_capacity && !o.sequence_lengths.empty()) {
    int64_t total = 0;
    for (int64_t s : o.sequence_lengths) {
      MOQE_CHECK(s >= 0 && s <= tokens, "switch router: sequence length {} for {} tokens", s,
                 tokens);
      total += s;
      MOQE_CHECK(total <= tokens, "switch router: sequence lengths sum to more than {} tokens",
                 tokens);
      nonempty += s > 0 ? 1 : 0;
    }
    MOQE_CHECK(total == tokens, "switch router: sequence lengths sum to {}, not {} tokens", total,
               tokens);
  }

  auto* base = static_cast<char*>(out.scratch.data());
  MOQE_CUDA_CHECK(cudaMemsetAsync(base + kBadTaskAt, 0xff, sizeof(uint64_t), stream));
  out.tokens = tokens;
  if (tokens == 0) return;
  float* scores = reinterpret_cast<float*>(base + layout.scores);
  auto* n_active = reinterpret_cast<int64_t*>(base + kActiveAt);

  if (c.kind != RouterKind::kTask) {
    const dim3 grid(blocks_for(tokens, kLogitTokens), blocks_for(e, kLogitWarps));
    MOQE_CHECK(grid.y <= 65535, "{} router: {} experts are too many", name, e);
    logits_kernel<<<grid, kLogitWarps * 32, 0, stream>>>(x, tokens, ldx, gate_.as<float>(), hidden_,
                                                         e, scores);
  }
  SelectParams p{};
  p.kind = c.kind;
  p.topk_method = c.topk_method;
  p.norm_topk_prob = c.norm_topk_prob;
  p.experts = e;
  p.top_k = k;
  p.slots = slots;
  // n_group is read only by group-limited routing; a greedy config may carry any value.
  p.n_group = is_grouped(c) ? c.n_group : 1;
  p.topk_group = is_grouped(c) ? c.topk_group : 0;
  p.routed_scaling_factor = c.routed_scaling_factor;
  p.norm_epsilon = c.norm_epsilon;
  p.norm_min = c.norm_min;
  p.bias = bias_.size() > 0 ? bias_.as<float>() : nullptr;
  p.task_experts = task_experts_.as<int32_t>();
  p.task_weights = task_weights_.as<float>();
  p.num_tasks = static_cast<int64_t>(c.tasks.size());
  p.task_id = o.task_id;
  p.task_ids = o.task_ids;
  p.active = o.active;
  p.scores = scores;
  p.group_score = reinterpret_cast<float*>(base + layout.group_score);
  p.keep = reinterpret_cast<int32_t*>(base + layout.keep);
  p.ids = out.ids.as<int32_t>();
  p.weights = out.weights.as<float>();
  p.kept = out.kept.as<uint8_t>();
  p.passthrough = out.passthrough.as<uint8_t>();
  p.bad_task = reinterpret_cast<unsigned long long*>(base + kBadTaskAt);
  p.task_count = reinterpret_cast<int64_t*>(base + kTaskCountAt);
  constexpr int kSelectThreads = 128;
  if (e <= kWarpMaxItems) {
    select_warp_kernel<<<blocks_for(tokens * 32, kSelectThreads), kSelectThreads, 0, stream>>>(
        p, tokens);
  } else {
    select_kernel<<<blocks_for(tokens, kSelectThreads), kSelectThreads, 0, stream>>>(p, tokens);
  }

  if (c.kind == RouterKind::kExpertChoice) {
    count_active_kernel<<<1, 256, 0, stream>>>(o.active, tokens, n_active);
    expert_choice_kernel<<<static_cast<unsigned>(e), kChoiceThreads, 0, stream>>>(
        scores, o.active, tokens, e, k, c.expert_capacity, n_active, p.ids, p.weights, p.kept);
  } else if (switch_capacity) {
    const int64_t sequences = o.sequence_lengths.empty() ? 1 : nonempty;
    const int64_t* d_ends = nullptr;
    if (!o.sequence_lengths.empty()) {
      auto* dst = reinterpret_cast<int64_t*>(base + layout.seq_ends);
      EndsChunk chunk{};
      int filled = 0;
      int64_t total = 0, stored = 0;
      auto flush = [&] {
        store_ends_kernel<<<1, kEndsPerLaunch, 0, stream>>>(chunk, filled, dst + stored);
        stored += filled;
        filled = 0;
      };
      for (int64_t s : o.sequence_lengths) {
        total += s;
        if (s == 0) continue;
        chunk.v[filled++] = total;
        if (filled == kEndsPerLaunch) flush();
      }
      if (filled > 0) flush();
      d_ends = dst;
    }
    if (sequences > 0) {
      constexpr int kThreads = 128;
      switch_capacity_kernel<<<blocks_for(sequences * e * 32, kThreads), kThreads, 0, stream>>>(
          p.ids, p.kept, c.switch_passthrough ? p.passthrough : nullptr, tokens, d_ends, sequences,
          e, c.expert_capacity);
    }
  } else if (c.capacity_factor > 0) {
    count_active_kernel<<<1, 256, 0, stream>>>(o.active, tokens, n_active);
    constexpr int kThreads = 128;
    capacity_factor_kernel<<<blocks_for(e * 32, kThreads), kThreads, 0, stream>>>(
        p.ids, p.kept, tokens * slots, e, k, c.capacity_factor, n_active);
  }
  MOQE_CUDA_CHECK(cudaGetLastError());
}

void download(const DeviceRouting& r, Routing& out, Stream stream) {
  out.reset(r.tokens, r.slots, r.num_experts);
  const size_t n = static_cast<size_t>(r.tokens * r.slots);
  if (n > 0) {
    MOQE_CUDA_CHECK(cudaMemcpyAsync(out.ids.data(), r.ids.data(), n * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, stream));
    MOQE_CUDA_CHECK(cudaMemcpyAsync(out.weights.data(), r.weights.data(), n * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream));
    MOQE_CUDA_CHECK(
        cudaMemcpyAsync(out.kept.data(), r.kept.data(), n, cudaMemcpyDeviceToHost, stream));
  }
  if (r.tokens > 0) {
    MOQE_CUDA_CHECK(cudaMemcpyAsync(out.passthrough.data(), r.passthrough.data(),
                                    static_cast<size_t>(r.tokens), cudaMemcpyDeviceToHost, stream));
  }
  int64_t control[2] = {-1, 0};  // the bad task key, the number of tasks
  if (r.scratch.size() >= kControlBytes) {
    MOQE_CUDA_CHECK(cudaMemcpyAsync(control, r.scratch.data(), sizeof(control),
                                    cudaMemcpyDeviceToHost, stream));
  }
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream));
  // A slot with an expert is either kept (load) or dropped for capacity, as on the host.
  for (size_t s = 0; s < n; ++s) {
    const int32_t id = out.ids[s];
    if (id < 0 || id >= r.num_experts) continue;
    (out.kept[s] ? out.expert_load : out.expert_dropped)[static_cast<size_t>(id)]++;
  }
  const auto bad = static_cast<uint64_t>(control[0]);
  if (bad != kNoBadTask) {
    MOQE_FAIL("task router: task id {} of token {} is not one of the {} tasks",
              static_cast<int32_t>(static_cast<uint32_t>(bad & 0xffffffffu)), bad >> 32,
              control[1]);
  }
}

}  // namespace moqe::cuda
