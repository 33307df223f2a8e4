#!/usr/bin/env bash
# The lent GPU machines reach no package registry, and their image lacks moqe's C++ build
# dependencies. Fetch the Debian packages here, carry the folder, unpack it there:
#
#   here:  bash scripts/gpu-deps.sh fetch      # .gpu-deps/debs (about 2.3 MB; git-ignored)
#   there: bash scripts/gpu-deps.sh unpack     # .gpu-deps/root; scripts/gpu-check.sh uses it
#
# (device run: carry [".gpu-deps"] and start the command with `bash scripts/gpu-deps.sh unpack;`)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu-deps
case "${1:-}" in
  fetch)
    mkdir -p "$dir/debs"
    (cd "$dir/debs" && apt-get download libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev catch2 \
      libbenchmark-dev libbenchmark1debian libeigen3-dev)
    du -sh "$dir/debs"
    ;;
  unpack)
    mkdir -p "$dir/root"
    for f in "$dir"/debs/*.deb; do dpkg -x "$f" "$dir/root"; done
    echo "moqe: build dependencies unpacked into $dir/root"
    ;;
  *)
    echo "usage: $0 fetch|unpack" >&2
    exit 2
    ;;
esac
