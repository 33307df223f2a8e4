#!/usr/bin/env bash
# Quick start, first command: install what is missing, build, and run the demo (a synthetic
# Mixtral-shaped checkpoint quantized at 8/4/3/2 bits). Arguments go to the demo (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build=$(bash scripts/configure.sh)
cmake --build "$build" --target moqe_demo moqe_cli -- -j"$(nproc)"
"$build"/examples/moqe_demo "$@"
