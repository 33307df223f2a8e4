// Private to cuda/: moqe::activate's formulas (moqe/moe/expert.hpp) as device functions, shared
// by the GEMM epilogues and the element-wise kernels.
#pragma once

#include <cuda_runtime.h>

#include "moqe/moe/activation.hpp"

namespace moqe::cuda::detail {

__device__ __forceinline__ float activate_dev(Activation a, float x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.0f + expf(-x));
    case Activation::kGeluTanh: {
      const float kAlpha = 0.7978845608028654f;
      return 0.5f * x * (1.0f + tanhf(kAlpha * (x + 0.044715f * x * x * x)));
    }
    case Activation::kGelu:
      return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

}  // namespace moqe::cuda::detail
