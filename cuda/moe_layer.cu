// The device MoE layer: loading (quantized experts stacked per projection, gate and up fused by
// rows), workspace planning, and run() as a fixed sequence of launches on one stream.
#include <algorithm>
#include <string>

#include "check.cuh"
#include "moe_kernels.cuh"
#include "moqe/cuda/moe.hpp"
#include "moqe/io/quantized_format.hpp"

namespace moqe::cuda {
namespace {

// The expert MLP over rows of x: offsets null is one expert over max_rows rows (a shared expert).
// Two GEMMs: the first applies the activation (and, GLU, multiplies by up) in its epilogue and
// writes the fp16/bf16 input of the second; the second scales each row by row_scale (the routing
// weights of the slots, through row_slot) when given.
template <class TIn>
void run_mlp_rows(const DeviceExperts& m, const TIn* x, int64_t max_rows, const int64_t* offsets,
                  const int32_t* expert_list, TIn* a, float* y, const float* row_scale,
                  const int32_t* row_slot, Stream stream) {
  const int64_t hid = m.hidden, inter = m.intermediate;
  const MatrixView<const TIn> xv(x, max_rows, hid);
  const MatrixView<TIn> av(a, max_rows, inter);
  GemmEpilogue first;
  first.activate = true;
  first.activation = m.activation;
  GemmEpilogue second;
  second.row_scale = row_scale;
  second.row_index = row_slot;
  const MatrixView<const TIn> ain(a, max_rows, inter);
  const MatrixView<float> yv(y, max_rows, hid);
  if (offsets != nullptr) {
    gemm_grouped<TIn, TIn>(xv, m.first, offsets, av, first, stream, -1, expert_list);
    gemm_grouped<TIn, float>(ain, m.down, offsets, yv, second, stream, -1, expert_list);
  } else {
    gemm<TIn, TIn>(xv, m.first, av, first, stream);
    gemm<TIn, float>(ain, m.down, yv, second, stream);
  }
}

template <class TIn>
void run_layer(const DeviceRouter& router, const DeviceExperts& experts,
               const std::vector<MoELayer::Shared>& shared, const float* x, float* y,
               int64_t tokens, MoELayer::Workspace& ws, const MoELayer::RunOptions& o,
               int64_t hidden, Stream stream) {
  DeviceRouteOptions ro;
  ro.active = o.active;
  ro.sequence_lengths = o.sequence_lengths;
  ro.task_id = o.task_id;
  ro.task_ids = o.task_ids;
  router.route(x, tokens, hidden, ws.routing, ro, stream);
  build_dispatch(ws.routing, ws.dispatch, stream);
  const int64_t slots = ws.routing.slots, max_rows = tokens * slots;
  const int64_t e = router.num_experts();
  const int64_t* offsets = ws.dispatch.offsets.as<int64_t>();
  if (max_rows > 0) {
    detail::launch_gather<TIn>(x, hidden, ws.dispatch.row_slot.as<int32_t>(), slots, offsets + e,
                               max_rows, ws.xe.as<TIn>(), stream);
    // The grid covers the experts with rows only (the dispatch's list of them).
    run_mlp_rows<TIn>(experts, ws.xe.as<TIn>(), max_rows, offsets, ws.dispatch.active.as<int32_t>(),
                      ws.a.as<TIn>(), ws.ye.as<float>(), ws.routing.weights.as<float>(),
                      ws.dispatch.row_slot.as<int32_t>(), stream);
  }
  detail::launch_combine(x, ws.ye.as<float>(), ws.dispatch.slot_row.as<int32_t>(),
                         ws.routing.weights.as<float>(), ws.routing.passthrough.as<uint8_t>(),
                         tokens, slots, hidden, y, stream);
  if (shared.empty() || tokens == 0) return;
  detail::launch_convert<TIn>(x, tokens * hidden, ws.xs.as<TIn>(), stream);
  for (const MoELayer::Shared& s : shared) {
    run_mlp_rows<TIn>(s.mlp, ws.xs.as<TIn>(), tokens, nullptr, nullptr, ws.a.as<TIn>(),
                      ws.ys.as<float>(), nullptr, nullptr, stream);
    detail::launch_add_shared(x, ws.ys.as<float>(),
                              s.gate.size() > 0 ? s.gate.as<float>() : nullptr, o.active, tokens,
                              hidden, y, stream);
  }
}

}  // namespace

DeviceExperts make_device_experts(std::span<const QuantizedMatrix> gate,
                                  std::span<const QuantizedMatrix> up,
                                  std::span<const QuantizedMatrix> down, Activation activation,
                                  GemmPath path) {
  MOQE_CHECK(!up.empty() && up.size() == down.size() && (gate.empty() || gate.size() == up.size()),
             "cuda::make_device_experts: {} gate, {} up and {} down matrices", gate.size(),
             up.size(), down.size());
  DeviceExperts d;
  d.kind = gate.empty() ? MlpKind::kMlp : MlpKind::kGlu;
  d.activation = activation;
  d.hidden = up[0].cols();
  d.intermediate = up[0].rows();
  for (size_t e = 0; e < up.size(); ++e) {
    MOQE_CHECK(
        up[e].rows() == d.intermediate && up[e].cols() == d.hidden && down[e].rows() == d.hidden &&
            down[e].cols() == d.intermediate &&
            (gate.empty() || (gate[e].rows() == d.intermediate && gate[e].cols() == d.hidden)),
        "cuda::make_device_experts: expert {} does not have expert 0's shapes (up [{}, {}], "
        "down [{}, {}])",
        e, d.intermediate, d.hidden, d.hidden, d.intermediate);
  }
  d.first = gate.empty() ? DeviceQuantizedMatrix::stack(up, path)
                         : DeviceQuantizedMatrix::stack_glu(gate, up, path);
  d.down = DeviceQuantizedMatrix::stack(down, path);
  return d;
}

MoELayer::MoELayer(const Router& router, DeviceExperts experts, std::vector<Shared> shared,
                   ActType act)
    : router_(router),
      experts_(std::move(experts)),
      shared_(std::move(shared)),
      hidden_(experts_.hidden),
      max_intermediate_(experts_.intermediate),
      act_(act) {
  MOQE_CHECK(experts_.first.num_experts() == router.num_experts(),
             "cuda::MoELayer: {} experts for a router over {}", experts_.first.num_experts(),
             router.num_experts());
  MOQE_CHECK(router.kind() == RouterKind::kTask || router.hidden() == hidden_,
             "cuda::MoELayer: the router's hidden size {} is not the experts' {}", router.hidden(),
             hidden_);
  for (const Shared& s : shared_) {
    MOQE_CHECK(s.mlp.hidden == hidden_,
               "cuda::MoELayer: a shared expert has hidden size {}, not {}", s.mlp.hidden, hidden_);
    MOQE_CHECK(s.gate.size() == 0 || s.gate.size() == static_cast<size_t>(hidden_) * sizeof(float),
               "cuda::MoELayer: a shared expert's gate holds {} bytes, expected {} floats",
               s.gate.size(), hidden_);
    max_intermediate_ = std::max(max_intermediate_, s.mlp.intermediate);
  }
}

MoELayer MoELayer::load(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
                        const DeviceLoadOptions& options) {
  const std::string where = ckpt.path().string();
  const std::string_view family = to_string(c.family);
  // What the device layer does not compute is refused by name before anything is read.
  MOQE_CHECK(!c.swiglu, "{}: the {} experts' clamped SwiGLU is not implemented on the device yet",
             where, family);
  MOQE_CHECK(c.shared_combine == SharedCombine::kAdd,
             "{}: {}'s averaged shared expert is not implemented on the device yet", where, family);
  MOQE_CHECK(family_info(c.family).output_bias.empty(),
             "{}: {}'s output bias is not implemented on the device yet", where, family);
  MOQE_CHECK(!c.shared_biases,
             "{}: {}'s shared-expert biases are not implemented on the device yet", where, family);
  LoadOptions lo;
  lo.switch_passthrough = options.switch_passthrough;
  lo.allow_unused_tensors = options.allow_unused_tensors;
  QuantizedLayer q = load_quantized_layer(ckpt, prefix, c, lo);
  const std::string unsupported = device_router_unsupported(q.router.config());
  MOQE_CHECK(unsupported.empty(), "{}: the {} router: {}", where, family, unsupported);
  DeviceExperts experts =
      make_device_experts(q.experts.gate, q.experts.up, q.experts.down, c.activation, options.path);
  std::vector<Shared> shared;
  if (q.shared) {
    Shared s;
    s.mlp = make_device_experts(q.shared->gate, q.shared->up, q.shared->down, c.activation,
                                options.path);
    if (!q.shared_gate.empty()) {
      s.gate = DeviceBuffer(q.shared_gate.size() * sizeof(float));
      s.gate.upload(std::span<const float>(q.shared_gate));
    }
    shared.push_back(std::move(s));
  }
  return MoELayer(q.router, std::move(experts), std::move(shared), options.act_type);
}

int64_t MoELayer::device_bytes() const {
  int64_t b = experts_.first.device_bytes() + experts_.down.device_bytes();
  for (const Shared& s : shared_) {
    b += s.mlp.first.device_bytes() + s.mlp.down.device_bytes() +
         static_cast<int64_t>(s.gate.size());
  }
  return b + num_experts() * hidden_ * static_cast<int64_t>(sizeof(float));
}

MoELayer::Workspace MoELayer::make_workspace(int64_t max_tokens) const {
  MOQE_CHECK(max_tokens >= 0, "cuda::MoELayer::make_workspace: negative max_tokens {}", max_tokens);
  Workspace ws;
  ws.max_tokens = max_tokens;
  ws.routing = router_.make_routing(max_tokens);
  const int64_t rows = max_tokens * ws.routing.slots;
  ws.dispatch = make_dispatch(rows, num_experts());
  const size_t act = 2;  // fp16 or bf16
  const auto r = static_cast<size_t>(std::max<int64_t>(rows, 1));
  const auto h = static_cast<size_t>(hidden_), i = static_cast<size_t>(max_intermediate_);
  // a serves the routed rows and, for shared experts, the tokens (rows >= tokens).
  ws.xe = DeviceBuffer(r * h * act);
  ws.a = DeviceBuffer(r * i * act);
  ws.ye = DeviceBuffer(r * h * sizeof(float));
  if (!shared_.empty()) {
    const auto t = static_cast<size_t>(std::max<int64_t>(max_tokens, 1));
    ws.xs = DeviceBuffer(t * h * act);
    ws.ys = DeviceBuffer(t * h * sizeof(float));
  }
  return ws;
}

void MoELayer::run(const float* x, float* y, int64_t tokens, Workspace& ws,
                   const RunOptions& options, Stream stream) const {
  MOQE_CHECK(tokens >= 0 && tokens <= ws.max_tokens,
             "cuda::MoELayer: {} tokens for a workspace of {}", tokens, ws.max_tokens);
  MOQE_CHECK(tokens == 0 || (x != nullptr && y != nullptr), "cuda::MoELayer: null x or y");
  MOQE_CHECK(
      ws.routing.slots == router_.slots_per_token() && ws.dispatch.num_experts == num_experts(),
      "cuda::MoELayer: the workspace was made for another layer");
  if (act_ == ActType::kF16) {
    run_layer<Half>(router_, experts_, shared_, x, y, tokens, ws, options, hidden_, stream);
  } else {
    run_layer<BFloat16>(router_, experts_, shared_, x, y, tokens, ws, options, hidden_, stream);
  }
}

}  // namespace moqe::cuda
