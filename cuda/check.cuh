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

namespace moqe::cuda::detail {

// Makes `device` current for a scope and restores the caller's device after it, so that a
// library call never leaves another device current behind the caller's back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    MOQE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MOQE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace moqe::cuda::detail
