// Compiler portability macros shared by host code and CUDA kernels.
// MOQE_HOST_DEVICE marks the scalar numeric core that both sides compile.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOQE_HOST_DEVICE __host__ __device__
#define MOQE_FORCEINLINE __forceinline__
#else
#define MOQE_HOST_DEVICE
#define MOQE_FORCEINLINE inline __attribute__((always_inline))
#endif
