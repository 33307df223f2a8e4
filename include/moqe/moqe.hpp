// moqe: mixture-of-quantized-experts. The umbrella header of the CPU API: core views and types,
// quantization, GEMM, routers and MoE layers, and checkpoint I/O. It includes no CUDA header (see
// moqe/cuda/ for the GPU API).
#pragma once

#include "moqe/core/config.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/core/view.hpp"
#include "moqe/gemm/linear.hpp"
#include "moqe/gemm/reference.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/dtype.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/dispatch.hpp"
#include "moqe/moe/expert.hpp"
#include "moqe/moe/loader.hpp"
#include "moqe/moe/moe_layer.hpp"
#include "moqe/moe/router.hpp"
#include "moqe/quant/adaptive.hpp"
#include "moqe/quant/numerics.hpp"
#include "moqe/quant/packing.hpp"
#include "moqe/quant/quantized_matrix.hpp"
#include "moqe/quant/scheme.hpp"
#include "moqe/version.hpp"
