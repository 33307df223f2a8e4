// Helpers shared by moqe_bench_cuda's files: error checks that end the run with a message, and
// timing of a sequence of launches with CUDA events.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace moqe_bench {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "moqe_bench_cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "moqe_bench_cuda: %s: cuBLAS status %d\n", what, static_cast<int>(s));
    std::exit(1);
  }
}

// Times `calls` launches of call(i) between two events on `stream`; seconds per call.
template <class F>
double time_calls(cudaStream_t stream, int calls, F&& call) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  check(cudaEventRecord(start, stream), "event record");
  for (int i = 0; i < calls; ++i) call(i);
  check(cudaEventRecord(stop, stream), "event record");
  check(cudaEventSynchronize(stop), "event sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 1e-3 * ms / calls;
}

}  // namespace moqe_bench
