#!/usr/bin/env bash
# Installs the Debian 12 packages moqe builds with, when any is missing (needs root or sudo).
# The CUDA component is built only where nvcc is already installed (the CUDA toolkit is not a
# Debian package); set MOQE_DEPS_EXTRA for more packages (CI adds clang-format).
set -euo pipefail

packages=(build-essential cmake ninja-build ccache libfmt-dev nlohmann-json3-dev libcli11-dev
          catch2 libbenchmark-dev libeigen3-dev libopenmpi-dev openmpi-bin libsimde-dev ${MOQE_DEPS_EXTRA:-})
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "moqe: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "moqe: run as root or install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
