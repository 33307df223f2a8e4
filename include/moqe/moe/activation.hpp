// The expert MLPs' activation functions: the enum, its Hugging Face names, and the scalar
// formulas every kernel (CPU and CUDA) reproduces. Needs nothing else from moqe.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moqe {

enum class Activation : uint8_t { kSilu, kGeluTanh, kGelu, kRelu };

std::string_view to_string(Activation a);
// Hugging Face `hidden_act` names: silu/swish, gelu, gelu_new/gelu_pytorch_tanh/gelu_fast (tanh),
// relu.
std::optional<Activation> parse_activation(std::string_view name);

inline float activate(Activation a, float x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.0f + std::exp(-x));
    case Activation::kGeluTanh: {
      const float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * x * (1.0f + std::tanh(kAlpha * (x + 0.044715f * x * x * x)));
    }
    case Activation::kGelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

}  // namespace moqe
