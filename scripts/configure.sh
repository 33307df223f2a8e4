#!/usr/bin/env bash
# Configures the build tree (default: build/) with Ninja, Release and ccache. Extra arguments go
# to cmake; MOQE_BUILD_DIR picks another tree.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${MOQE_BUILD_DIR:-build}"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" "$@" >/dev/null
echo "$build"
