#!/usr/bin/env bash
# Compiles each csrc/**/*.cu for sm_80 and sm_90a with plain nvcc (no torch headers needed), with
# the kernels that builds leave out by default compiled in (MOESTREAM_GMM_WGMMA=1), and the files
# that switch on that define once more without them.
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
mapfile -t optional < <(grep -l 'MOESTREAM_GMM_WGMMA' "${files[@]}" | sort)
{ printf '1 %s\n' "${files[@]}"; printf '0 %s\n' "${optional[@]}"; } | xargs -P "$jobs" -L1 sh -c \
  '"$0" -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc -DMOESTREAM_GMM_WGMMA="$2" -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a -c "$3" -o "$1/$(echo "$3" | tr / _).$2.o" || { echo "FAILED: $3 (MOESTREAM_GMM_WGMMA=$2)"; exit 255; }' \
  "$NVCC" "$out"
echo "check_cuda_compile: ${#files[@]} CUDA files compiled for sm_80 and sm_90a (${#optional[@]} of them also without the optional kernels)"

# The host glue (csrc/**/*_cuda.cpp: op registration, device guards, streams, the streaming engine's
# CUDA side) includes torch's CUDA headers. A CPU build of torch ships them too, all but one header
# its CMake generates for CUDA builds; with that one supplied, g++ checks the glue's syntax and types
# against the installed torch and the CUDA toolkit's headers.
PY="${PYTHON:-python3}"
CUDA_INC=""
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC="$d/include"; break; fi
done
mapfile -t glue < <(find csrc -name '*_cuda.cpp' | sort)
if [ "${#glue[@]}" -eq 0 ]; then exit 0; fi
if ! torch_inc=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem' + p for p in c.include_paths()))" 2>/dev/null) \
   || [ -z "$CUDA_INC" ]; then
  echo "check_cuda_compile: torch or the CUDA headers not found, host glue check skipped"
  exit 0
fi
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
mkdir -p "$out/shim/c10/cuda/impl"
if ! "$PY" -c "import torch, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h')) else 1)"; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
CXX_BIN="${CXX:-g++}"
printf '%s\n' "${glue[@]}" | xargs -P "$jobs" -I{} sh -c \
  '$0 -std=c++17 -fsyntax-only $1 -isystem"$2/shim" -isystem"$3" -isystem"$4" -Icsrc -DMOESTREAM_WITH_CUDA "$5" || { echo "FAILED: $5"; exit 255; }' \
  "$CXX_BIN" "$torch_inc" "$out" "$py_inc" "$CUDA_INC" {}
echo "check_cuda_compile: ${#glue[@]} CUDA host glue files checked against torch's CUDA headers"
