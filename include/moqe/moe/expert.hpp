// Expert MLPs: `glu` (down(act(gate x) * up x)) with gate and up fused into one matrix when their
// storage allows, or `mlp` (down(act(up x))); act = silu | gelu_tanh | gelu | relu. Optional
// biases on each projection, and gpt-oss's clamped SwiGLU in place of act(gate) * up.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "moqe/gemm/linear.hpp"
#include "moqe/moe/activation.hpp"

namespace moqe {

enum class MlpKind : uint8_t { kGlu, kMlp };

// Biases added to each projection's output (empty: none): gate and up [I], down [H].
struct MlpBiases {
  std::vector<float> gate, up, down;
};

// gpt-oss's GLU: with g = min(gate, limit) and u = clamp(up, -limit, limit), the product is
// (u + 1) * g * sigmoid(alpha * g) instead of act(gate) * up.
struct ClampedSwiglu {
  float alpha = 1.702f;
  float limit = 7.0f;
};

// The GLU product of one gate and up value, as transformers' GptOssExperts computes it.
inline float clamped_swiglu(const ClampedSwiglu& s, float gate, float up) {
  const float g = gate > s.limit ? s.limit : gate;  // clamp(max=limit) keeps NaN
  const float u = up < -s.limit ? -s.limit : (up > s.limit ? s.limit : up);
  return (u + 1.0f) * (g * (1.0f / (1.0f + std::exp(-(g * s.alpha)))));
}

class ExpertMLP {
 public:
  ExpertMLP() = default;
  // gate [I, H], up [I, H], down [H, I]. Fuses gate and up when they share storage and scheme.
  static ExpertMLP glu(QuantizedLinear gate, QuantizedLinear up, QuantizedLinear down,
                       Activation act, bool fuse = true, MlpBiases biases = {});
  // The same with gpt-oss's clamped SwiGLU as the GLU product.
  static ExpertMLP clamped_glu(QuantizedLinear gate, QuantizedLinear up, QuantizedLinear down,
                               ClampedSwiglu swiglu, bool fuse = true, MlpBiases biases = {});
  // up [I, H], down [H, I].
  static ExpertMLP mlp(QuantizedLinear up, QuantizedLinear down, Activation act,
                       MlpBiases biases = {});

  MlpKind kind() const { return kind_; }
  Activation activation() const { return act_; }
  // Set when the GLU product is gpt-oss's clamped SwiGLU (activation() is then not used).
  const std::optional<ClampedSwiglu>& clamped_swiglu() const { return swiglu_; }
  bool has_biases() const { return !first_bias_.empty() || !down_bias_.empty(); }
  // The first projection's bias laid out as its output (glu: gate then up, [2I]; mlp: [I]) and the
  // down projection's ([H]); empty when absent.
  const std::vector<float>& first_bias() const { return first_bias_; }
  const std::vector<float>& down_bias() const { return down_bias_; }
  int64_t hidden() const { return down_.out_features(); }
  int64_t intermediate() const { return down_.in_features(); }
  bool fused() const { return fused_; }
  int64_t weight_bytes() const;
  int64_t parameters() const;
  std::string describe() const;  // the weights' storage, e.g. "int4 sym g128 f16"

  // The grouped expert pass (MoELayer) drives the matrices itself when the first projection is one
  // matrix: the fused gate+up ([2I, H], gate rows first) or the mlp's up. Otherwise
  // single_first() is false and forward() is used.
  bool single_first() const { return kind_ == MlpKind::kMlp || fused_; }
  const QuantizedLinear& first() const { return kind_ == MlpKind::kMlp ? up_ : gate_up_; }
  const QuantizedLinear& down() const { return down_; }
  // Adds the first projection's bias and applies the activation (and the GLU product) to rows of
  // h [M, 2I] (glu) or [M, I] (mlp) for the intermediate columns [c0, c1); the result lands in
  // columns [c0, c1) of h.
  void activate_columns(MatrixView<float> h, int64_t c0, int64_t c1) const;
  // Adds the down projection's bias to columns [c0, c1) of y's rows (nothing when it has none).
  void add_down_bias(MatrixView<float> y, int64_t c0, int64_t c1) const;

  // Floats of scratch that forward() needs for `rows` rows (of T activations).
  int64_t scratch_floats(int64_t rows) const { return rows * 2 * intermediate(); }
  template <ActivationType T>
  int64_t scratch_floats(int64_t rows) const {
    return scratch_floats(rows) + (std::same_as<T, float> ? 0 : 2 * rows * hidden());
  }
  // y [M, H] = expert(x [M, H]), using scratch (scratch_floats(M) floats).
  void forward(MatrixView<const float> x, MatrixView<float> y, float* scratch,
               int num_threads = 0) const;
  // The same on fp16 / bf16 activations (scratch_floats<T>(M) floats): x widened once, y rounded
  // once; the fp32 result on the widened x, rounded.
  template <HalfActivation T>
  void forward(MatrixView<const T> x, MatrixView<T> y, float* scratch, int num_threads = 0) const;

 private:
  MlpKind kind_ = MlpKind::kGlu;
  Activation act_ = Activation::kSilu;
  std::optional<ClampedSwiglu> swiglu_;
  bool fused_ = false;
  std::vector<float> first_bias_, down_bias_;
  void set_biases(MlpBiases b);
  QuantizedLinear gate_up_;  // fused: [2I, H], gate rows first
  QuantizedLinear gate_;     // unfused glu
  QuantizedLinear up_;       // unfused glu, or mlp
  QuantizedLinear down_;
};

extern template void ExpertMLP::forward<Half>(MatrixView<const Half>, MatrixView<Half>, float*,
                                              int) const;
extern template void ExpertMLP::forward<BFloat16>(MatrixView<const BFloat16>, MatrixView<BFloat16>,
                                                  float*, int) const;

}  // namespace moqe
