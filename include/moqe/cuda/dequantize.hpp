// Dequantization of a QuantizedMatrix on the GPU with the shared scalar numerics: the device
// path's first kernel and the smoke test of the CUDA component.
#pragma once

#include <span>

#include "moqe/cuda/runtime.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::cuda {

// Uploads q, dequantizes it on the device and downloads the result into out (rows * cols
// floats, checked). Bit-identical to moqe::dequantize.
void dequantize(const QuantizedMatrix& q, std::span<float> out, Stream stream = nullptr);

}  // namespace moqe::cuda
