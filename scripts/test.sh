#!/usr/bin/env bash
# Quick start, second command: install what is missing, build everything, and run the tests
# (CUDA tests report SKIPPED without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build=$(bash scripts/configure.sh)
cmake --build "$build" -- -j"$(nproc)"
ctest --test-dir "$build" --output-on-failure -j"$(nproc)"
