// MOQE_CUDA_CHECK: every CUDA runtime call is checked; a failure throws moqe::Error naming the
// call, the error and the place.
#pragma once

#include <cuda_runtime.h>

#include "moqe/core/error.hpp"

#define MOQE_CUDA_CHECK(call)                                                                     \
  do {                                                                                            \
    const cudaError_t moqe_cuda_status_ = (call);                                                 \
    MOQE_CHECK(moqe_cuda_status_ == cudaSuccess, "CUDA error {} ({}) in {} at {}:{}",             \
               cudaGetErrorName(moqe_cuda_status_), cudaGetErrorString(moqe_cuda_status_), #call, \
               __FILE__, __LINE__);                                                               \
  } while (0)
