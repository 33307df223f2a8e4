#include "moqe/moe/expert.hpp"

#include <fmt/core.h>

namespace moqe {

std::string_view to_string(Activation a) {
  switch (a) {
    case Activation::kSilu:
      return "silu";
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kGelu:
      return "gelu";
    case Activation::kRelu:
      return "relu";
  }
  return "?";
}

std::optional<Activation> parse_activation(std::string_view n) {
  if (n == "silu" || n == "swish") return Activation::kSilu;
  if (n == "gelu") return Activation::kGelu;
  if (n == "gelu_tanh" || n == "gelu_new" || n == "gelu_pytorch_tanh" || n == "gelu_fast") {
    return Activation::kGeluTanh;
  }
  if (n == "relu") return Activation::kRelu;
  return std::nullopt;
}

void ExpertMLP::set_biases(MlpBiases b) {
  const int64_t i = intermediate(), h = hidden();
  auto check = [&](const std::vector<float>& v, int64_t n, const char* what) {
    MOQE_CHECK(v.empty() || static_cast<int64_t>(v.size()) == n,
               "ExpertMLP: the {} bias has {} values, expected {}", what, v.size(), n);
  };
  if (kind_ == MlpKind::kGlu) {
    check(b.gate, i, "gate");
    check(b.up, i, "up");
    MOQE_CHECK(b.gate.empty() == b.up.empty(),
               "ExpertMLP: a gate bias without an up bias or the reverse");
    if (!b.gate.empty()) {
      first_bias_ = std::move(b.gate);
      first_bias_.insert(first_bias_.end(), b.up.begin(), b.up.end());
    }
  } else {
    MOQE_CHECK(b.gate.empty(), "ExpertMLP: an mlp has no gate to bias");
    check(b.up, i, "up");
    first_bias_ = std::move(b.up);
  }
  check(b.down, h, "down");
  down_bias_ = std::move(b.down);
}

ExpertMLP ExpertMLP::clamped_glu(QuantizedLinear gate, QuantizedLinear up, QuantizedLinear down,
                                 ClampedSwiglu swiglu, bool fuse, MlpBiases biases) {
  MOQE_CHECK(swiglu.limit >= 0 && std::isfinite(swiglu.alpha),
             "ExpertMLP: clamped SwiGLU limit {} must be >= 0 and alpha {} finite", swiglu.limit,
             swiglu.alpha);
  ExpertMLP m = glu(std::move(gate), std::move(up), std::move(down), Activation::kSilu, fuse,
                    std::move(biases));
  m.swiglu_ = swiglu;
  return m;
}

ExpertMLP ExpertMLP::glu(QuantizedLinear gate, QuantizedLinear up, QuantizedLinear down,
                         Activation act, bool fuse, MlpBiases biases) {
  MOQE_CHECK(gate.out_features() == up.out_features() && gate.in_features() == up.in_features() &&
                 down.in_features() == gate.out_features() &&
                 down.out_features() == gate.in_features(),
             "ExpertMLP: gate [{}, {}], up [{}, {}] and down [{}, {}] do not form a GLU",
             gate.out_features(), gate.in_features(), up.out_features(), up.in_features(),
             down.out_features(), down.in_features());
  ExpertMLP m;
  m.kind_ = MlpKind::kGlu;
  m.act_ = act;
  if (fuse && QuantizedLinear::can_concat(gate, up)) {
    m.fused_ = true;
    m.gate_up_ = QuantizedLinear::concat_rows(gate, up);
  } else {
    m.gate_ = std::move(gate);
    m.up_ = std::move(up);
  }
  m.down_ = std::move(down);
  m.set_biases(std::move(biases));
  return m;
}

ExpertMLP ExpertMLP::mlp(QuantizedLinear up, QuantizedLinear down, Activation act,
                         MlpBiases biases) {
  MOQE_CHECK(down.in_features() == up.out_features() && down.out_features() == up.in_features(),
             "ExpertMLP: up [{}, {}] and down [{}, {}] do not form an MLP", up.out_features(),
             up.in_features(), down.out_features(), down.in_features());
  ExpertMLP m;
  m.kind_ = MlpKind::kMlp;
  m.act_ = act;
  m.up_ = std::move(up);
  m.down_ = std::move(down);
  m.set_biases(std::move(biases));
  return m;
}

int64_t ExpertMLP::weight_bytes() const {
  return gate_up_.weight_bytes() + gate_.weight_bytes() + up_.weight_bytes() + down_.weight_bytes();
}

int64_t ExpertMLP::parameters() const {
  const int64_t h = hidden(), i = intermediate();
  return (kind_ == MlpKind::kGlu ? 3 : 2) * h * i;
}

std::string ExpertMLP::describe() const {
  return fused_ ? gate_up_.describe() : (kind_ == MlpKind::kGlu ? gate_ : up_).describe();
}

void ExpertMLP::activate_columns(MatrixView<float> h, int64_t c0, int64_t c1) const {
  const int64_t i = intermediate();
  const float* b = first_bias_.empty() ? nullptr : first_bias_.data();
  for (int64_t r = 0; r < h.rows(); ++r) {
    float* row = h.row(r);
    if (b != nullptr) {
      for (int64_t c = c0; c < c1; ++c) row[c] += b[c];
      if (kind_ == MlpKind::kGlu) {
        for (int64_t c = c0; c < c1; ++c) row[i + c] += b[i + c];
      }
    }
    if (kind_ == MlpKind::kGlu && swiglu_) {
      for (int64_t c = c0; c < c1; ++c) row[c] = moqe::clamped_swiglu(*swiglu_, row[c], row[i + c]);
    } else if (kind_ == MlpKind::kGlu) {
      for (int64_t c = c0; c < c1; ++c) row[c] = activate(act_, row[c]) * row[i + c];
    } else {
      for (int64_t c = c0; c < c1; ++c) row[c] = activate(act_, row[c]);
    }
  }
}

void ExpertMLP::add_down_bias(MatrixView<float> y, int64_t c0, int64_t c1) const {
  if (down_bias_.empty()) return;
  for (int64_t r = 0; r < y.rows(); ++r) {
    float* row = y.row(r);
    for (int64_t c = c0; c < c1; ++c) row[c] += down_bias_[c];
  }
}

void ExpertMLP::forward(MatrixView<const float> x, MatrixView<float> y, float* scratch,
                        int num_threads) const {
  const int64_t m = x.rows(), i = intermediate();
  MOQE_CHECK(x.cols() == hidden() && y.cols() == hidden() && y.rows() == m,
             "ExpertMLP (hidden {}): input {} and output {} do not fit", hidden(), shape_string(x),
             shape_string(y));
  if (m == 0) return;
  // scratch: h [M, 2I] (gate then up per row); the activated product overwrites the gate half.
  MatrixView<float> h(scratch, m, 2 * i);
  MatrixView<float> a(scratch, m, i, 2 * i);
  if (kind_ == MlpKind::kGlu) {
    if (fused_) {
      gate_up_.forward(x, h, num_threads);
    } else {
      gate_.forward(x, h.block(0, 0, m, i), num_threads);
      up_.forward(x, h.block(0, i, m, i), num_threads);
    }
    activate_columns(h, 0, i);
  } else {
    up_.forward(x, a, num_threads);
    activate_columns(a, 0, i);
  }
  down_.forward(MatrixView<const float>(a), y, num_threads);
  add_down_bias(y, 0, hidden());
}

template <HalfActivation T>
void ExpertMLP::forward(MatrixView<const T> x, MatrixView<T> y, float* scratch,
                        int num_threads) const {
  const int64_t m = x.rows(), h = hidden();
  MOQE_CHECK(x.cols() == h && y.cols() == h && y.rows() == m,
             "ExpertMLP (hidden {}): input {} and output {} do not fit", h, shape_string(x),
             shape_string(y));
  float* x32 = scratch + scratch_floats(m);
  float* y32 = x32 + m * h;
  widen_rows(x, MatrixView<float>(x32, m, h));
  forward(MatrixView<const float>(x32, m, h), MatrixView<float>(y32, m, h), scratch, num_threads);
  round_rows(MatrixView<const float>(y32, m, h), y);
}

template void ExpertMLP::forward<Half>(MatrixView<const Half>, MatrixView<Half>, float*, int) const;
template void ExpertMLP::forward<BFloat16>(MatrixView<const BFloat16>, MatrixView<BFloat16>, float*,
                                           int) const;

}  // namespace moqe
