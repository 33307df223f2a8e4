// MOQE_REQUIRE_DEVICE(): a CUDA test without a device reports "SKIPPED: no CUDA device" (which
// ctest's SKIP_REGULAR_EXPRESSION counts as skipped) and returns.
#pragma once

#include <catch2/catch.hpp>

#include "moqe/cuda/runtime.hpp"

#define MOQE_REQUIRE_DEVICE()              \
  do {                                     \
    if (moqe::cuda::device_count() == 0) { \
      WARN("SKIPPED: no CUDA device");     \
      return;                              \
    }                                      \
  } while (0)
