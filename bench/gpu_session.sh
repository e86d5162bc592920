#!/usr/bin/env bash
# One GPU session: build with CUDA, run the test suite on CUDA, memcheck the op tests, benchmark.
# Usage (on the GPU machine, repo root): OUT=/some/dir bash bench/gpu_session.sh [tests|bench|all]
set -uo pipefail
OUT=${OUT:-/tmp/moestream-out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
export MOESTREAM_CUDA=ON
export MOESTREAM_CUDA_ARCHS=${MOESTREAM_CUDA_ARCHS:-90a}
# the sm90 wgmma grouped_mm is compiled out of default builds until it has run on hardware; this
# session compiles it in, so its tests (gmm_impl="wgmma") run
export MOESTREAM_GMM_WGMMA=${MOESTREAM_GMM_WGMMA:-ON}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
export CUDACXX=${CUDACXX:-$(command -v nvcc)}

{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name())"; nvcc --version | tail -2; } 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import moestream; assert moestream.with_cuda, 'built without CUDA'; print('moestream CUDA build ok')" || exit 1

if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -ra -x --timeout=600 -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
  if command -v compute-sanitizer >/dev/null && [ -n "${MEMCHECK_TESTS:-}" ]; then
    compute-sanitizer --tool memcheck --error-exitcode 99 python3 -m pytest -q -x -p no:cacheprovider $MEMCHECK_TESTS \
      2>&1 | tee "$OUT/memcheck.log" | tail -15
  fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for suite in ${BENCH_SUITES:-ops moe}; do
    for shape in ${BENCH_SHAPES:-qwen3-30b-a3b}; do
      python3 -m moestream.bench --suite "$suite" --shape "$shape" --device cuda --dtype bfloat16 \
        --json "$OUT/bench-$suite-$shape.json" ${BENCH_ARGS:-} 2>"$OUT/bench-$suite-$shape.err" | tee "$OUT/bench-$suite-$shape.txt"
    done
  done
fi
