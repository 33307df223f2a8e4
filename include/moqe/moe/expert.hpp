// Expert MLPs: `glu` (down(act(gate x) * up x)) with gate and up fused into one matrix when their
// storage allows, or `mlp` (down(act(up x))); act = silu | gelu_tanh | gelu | relu.
#pragma once

#include <cstdint>
#include <string>

#include "moqe/gemm/linear.hpp"
#include "moqe/moe/activation.hpp"

namespace moqe {

enum class MlpKind : uint8_t { kGlu, kMlp };

class ExpertMLP {
 public:
  ExpertMLP() = default;
  // gate [I, H], up [I, H], down [H, I]. Fuses gate and up when they share storage and scheme.
  static ExpertMLP glu(QuantizedLinear gate, QuantizedLinear up, QuantizedLinear down,
                       Activation act, bool fuse = true);
  // up [I, H], down [H, I].
  static ExpertMLP mlp(QuantizedLinear up, QuantizedLinear down, Activation act);

  MlpKind kind() const { return kind_; }
  Activation activation() const { return act_; }
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
  // Applies the activation (and the GLU product) to rows of h [M, 2I] (glu) or [M, I] (mlp) for
  // the intermediate columns [c0, c1); the result lands in columns [c0, c1) of h.
  void activate_columns(MatrixView<float> h, int64_t c0, int64_t c1) const;

  // Floats of scratch that forward() needs for `rows` rows.
  int64_t scratch_floats(int64_t rows) const { return rows * 2 * intermediate(); }
  // y [M, H] = expert(x [M, H]), using scratch (scratch_floats(M) floats).
  void forward(MatrixView<const float> x, MatrixView<float> y, float* scratch,
               int num_threads = 0) const;

 private:
  MlpKind kind_ = MlpKind::kGlu;
  Activation act_ = Activation::kSilu;
  bool fused_ = false;
  QuantizedLinear gate_up_;  // fused: [2I, H], gate rows first
  QuantizedLinear gate_;     // unfused glu
  QuantizedLinear up_;       // unfused glu, or mlp
  QuantizedLinear down_;
};

}  // namespace moqe
