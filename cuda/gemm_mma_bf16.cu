// Instantiation unit: the mma GEMM kernels for bf16 activations.
#include "gemm_mma.cuh"

MOQE_GEMM_MMA_CONFIGS(MOQE_INSTANTIATE_GEMM_MMA, 1)
