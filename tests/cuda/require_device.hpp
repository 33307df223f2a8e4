// MOQE_REQUIRE_DEVICE(): a CUDA test without a usable device reports "SKIPPED: no CUDA device"
// (which ctest's SKIP_REGULAR_EXPRESSION counts as skipped) and returns; with MOQE_REQUIRE_GPU=1
// in the environment (scripts/gpu-first.sh sets it on a GPU machine) it fails instead, naming
// the runtime's reason, so that a broken or invisible device can never turn a GPU run green.
#pragma once

#include <catch2/catch.hpp>

#include <cstdlib>
#include <string_view>

#include "moqe/cuda/runtime.hpp"

namespace moqe::test {

inline bool gpu_required() {
  const char* v = std::getenv("MOQE_REQUIRE_GPU");
  return v != nullptr && std::string_view(v) == "1";
}

}  // namespace moqe::test

#define MOQE_REQUIRE_DEVICE()                                                                     \
  do {                                                                                            \
    if (moqe::cuda::device_count() == 0) {                                                        \
      if (moqe::test::gpu_required()) {                                                           \
        FAIL("MOQE_REQUIRE_GPU=1, but no CUDA device is usable: " << moqe::cuda::device_error()); \
      }                                                                                           \
      WARN("SKIPPED: no CUDA device (" << moqe::cuda::device_error() << ")");                     \
      return;                                                                                     \
    }                                                                                             \
  } while (0)
