// Quantization on the GPU with the shared scalar numerics (moqe/quant/numerics.hpp): the same
// codes, scales and zero points as moqe::quantize, bit for bit, computed one group per thread and
// packed one byte per thread.
#pragma once

#include "moqe/cuda/runtime.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe::cuda {

// Quantizes the host matrix w [N, K] on the device and returns it as a host QuantizedMatrix.
// Errors are moqe::quantize's, with the same messages: an unsupported scheme, a NaN or Inf
// (tensor, row and column), a scale that overflows fp16 (row and group).
QuantizedMatrix quantize(MatrixView<const float> w, const QuantScheme& scheme,
                         std::string_view name = "matrix", Stream stream = nullptr);

}  // namespace moqe::cuda
