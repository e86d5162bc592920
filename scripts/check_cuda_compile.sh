#!/usr/bin/env bash
# Compiles each csrc/**/*.cu for sm_80 and sm_90a with plain nvcc (no torch headers needed).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found, CUDA compile check skipped"
  exit 0
fi
mapfile -t files < <(find csrc -name '*.cu' | sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
jobs=$(nproc 2>/dev/null || echo 2)
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} sh -c \
  '"$0" -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a -c "$1" -o "$2/$(echo "$1" | tr / _).o" || { echo "FAILED: $1"; exit 255; }' \
  "$NVCC" {} "$out"
echo "check_cuda_compile: ${#files[@]} CUDA files compiled for sm_80 and sm_90a"
