// An MoE layer on the GPU: the device router, dispatch by a stable radix sort of the kept slots
// (CUB), one grouped GEMM launch per projection over all experts (gate and up in one GLU matrix
// whose epilogue applies act(gate) * up; the down projection's epilogue scales each row by its
// routing weight), a combine that sums each token's rows, and the shared experts.
// Weights are uploaded once; make_workspace plans every buffer once; run() allocates nothing and
// is asynchronous on its stream. No CUDA header is needed to include this file.
//
// Numerics: activations enter the GEMMs as fp16 (or bf16), rounded once when gathered and once
// after the activation function; everything else (logits, routing weights, GEMM accumulation,
// GLU, routing-weight scaling, combine) is fp32. Against the CPU layer (moqe::MoELayer) on the same
// weights, outputs agree to those two roundings (relative error of order 2^-11 for fp16); routing
// agrees except where two experts' logits are within fp32 summation error of each other.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "moqe/cuda/gemm.hpp"
#include "moqe/cuda/router.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/moe/loader.hpp"

namespace moqe::cuda {

// The activations' type inside the GEMMs.
enum class ActType : uint8_t { kF16, kBF16 };

struct DeviceLoadOptions {
  ActType act_type = ActType::kF16;
  GemmPath path = GemmPath::kAuto;
  bool switch_passthrough = false;    // as LoadOptions::switch_passthrough
  bool allow_unused_tensors = false;  // as LoadOptions::allow_unused_tensors
};

// The kept slots of a DeviceRouting grouped by expert (rows of one expert contiguous, in token
// order, like moqe::DispatchPlan), built on the device.
struct DeviceDispatch {
  int64_t max_slots = 0, num_experts = 0;
  DeviceBuffer keys, keys_sorted;  // int32 [max_slots]: expert id, or E for a dropped slot
  DeviceBuffer slot, row_slot;     // int32 [max_slots]: slot index, sorted by expert
  DeviceBuffer offsets;            // int64 [E + 1]
  DeviceBuffer slot_row;           // int32 [max_slots]: row of a kept slot, -1 otherwise
  // int32 [min(E, max_slots)]: the experts with rows in increasing order, then -1s (the grouped
  // GEMMs' grid), and int32 [1] their count.
  DeviceBuffer active, active_count;
  DeviceBuffer sort_temp;    // CUB's temporary storage (the sort)
  DeviceBuffer select_temp;  // CUB's temporary storage (the active experts)
};
DeviceDispatch make_dispatch(int64_t max_slots, int64_t num_experts);
// Groups the routing's kept slots by expert (asynchronous).
void build_dispatch(const DeviceRouting& routing, DeviceDispatch& d, Stream stream = nullptr);
// Synchronizes and copies the offsets [E + 1] and row_slot [rows] to the host (tests).
void download_dispatch(const DeviceDispatch& d, std::vector<int64_t>& offsets,
                       std::vector<int32_t>& row_slot, Stream stream = nullptr);

// An expert MLP stack on the device: E experts of one shape and scheme.
struct DeviceExperts {
  MlpKind kind = MlpKind::kGlu;
  Activation activation = Activation::kSilu;
  int64_t hidden = 0, intermediate = 0;
  DeviceQuantizedMatrix first;  // gate and up as a GLU matrix (glu), or [I, H] up (mlp)
  DeviceQuantizedMatrix down;   // [H, I]
};

// E experts from host matrices of one shape and scheme: gate and up [I, H] (gate empty: an mlp
// of up alone), down [H, I]. Gate and up become one GLU matrix (DeviceQuantizedMatrix::stack_glu).
DeviceExperts make_device_experts(std::span<const QuantizedMatrix> gate,
                                  std::span<const QuantizedMatrix> up,
                                  std::span<const QuantizedMatrix> down, Activation activation,
                                  GemmPath path = GemmPath::kAuto);

class MoELayer {
 public:
  struct Workspace {
    int64_t max_tokens = 0;
    DeviceRouting routing;
    DeviceDispatch dispatch;
    DeviceBuffer xe;  // [T * slots, H] activations of the routed rows (fp16/bf16)
    DeviceBuffer a;   // [T * slots, I] activations after GLU (fp16/bf16; shared experts' too)
    DeviceBuffer ye;  // [T * slots, H] fp32 expert outputs scaled by their routing weights
    DeviceBuffer xs;  // [T, H] fp16/bf16 copy of x for the shared experts
    DeviceBuffer ys;  // [T, H] fp32 shared expert output
  };
  struct RunOptions {
    const uint8_t* active = nullptr;            // device [T]; inactive tokens output 0
    std::span<const int64_t> sequence_lengths;  // host; switch capacity per sequence
    int32_t task_id = 0;                        // task router: every token's task...
    const int32_t* task_ids = nullptr;          // ...or one per token (device [T])
  };

  // A shared expert: its MLP, and Qwen2-MoE's sigmoid gate [H] (fp32; empty when ungated).
  struct Shared {
    DeviceExperts mlp;
    DeviceBuffer gate;
  };

  MoELayer() = default;
  // A layer assembled in code: the router is uploaded; the experts are on the device already.
  MoELayer(const Router& router, DeviceExperts experts, std::vector<Shared> shared = {},
           ActType act = ActType::kF16);
  // From a checkpoint: routed and shared experts must be moqe-quantized (`moqe quantize`, whose
  // default --include covers the routed experts; name the shared ones to include them); an
  // unquantized one is an error naming the tensor. Every expert layout of the family table
  // (per-expert and fused tensors); a family whose routing or experts the device does not compute
  // yet (docs/families.md says which) is refused with a message naming what is missing.
  static MoELayer load(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& config,
                       const DeviceLoadOptions& options = {});

  int64_t hidden() const { return hidden_; }
  int64_t num_experts() const { return router_.num_experts(); }
  const DeviceRouter& router() const { return router_; }
  ActType act_type() const { return act_; }
  // Device bytes of all weights (experts, shared experts, router).
  int64_t device_bytes() const;

  Workspace make_workspace(int64_t max_tokens) const;
  // y [T, H] = layer(x [T, H]); x and y are dense fp32 device arrays that must not alias.
  // T <= ws.max_tokens.
  // ws.routing holds the routing afterwards (download() to read it).
  void run(const float* x, float* y, int64_t tokens, Workspace& ws, const RunOptions& options,
           Stream stream = nullptr) const;
  void run(const float* x, float* y, int64_t tokens, Workspace& ws, Stream stream = nullptr) const {
    run(x, y, tokens, ws, RunOptions{}, stream);
  }

 private:
  DeviceRouter router_;
  DeviceExperts experts_;
  std::vector<Shared> shared_;
  int64_t hidden_ = 0;
  int64_t max_intermediate_ = 0;  // routed and shared
  ActType act_ = ActType::kF16;
};

}  // namespace moqe::cuda
