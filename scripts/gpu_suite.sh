#!/usr/bin/env bash
# GPU proof in one call, on a machine that already has torch, triton and nvcc and no network
# (the device tool's H100/H200): build tntkernels._C with --no-build-isolation, run the whole test
# suite on the GPU (every dtype), run the benchmarks, and leave the results under $OUT:
#   build.log  backends.txt  tests.log  bench_inner_attention.json/.png  bench_nested_attention.json/.png
#   bench_hsim_split.json/.png
# Usage: OUT=/some/dir bash scripts/gpu_suite.sh      (default OUT: benchmarks/results/latest)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
status=0

echo "== build ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null))"
if ! TNTKERNELS_FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "build failed"; exit 1
fi
"$PY" -m tntkernels | tee "$OUT/backends.txt"

echo "== tests"
"$PY" -m pytest -q -ra -m "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
"$PY" benchmarks/bench_inner_attention.py --out "$OUT/bench_inner_attention.json" > "$OUT/bench_inner_attention.txt" 2>&1 \
  || { status=1; tail -20 "$OUT/bench_inner_attention.txt"; }
grep -E "ours|timm_eager|compile" "$OUT/bench_inner_attention.txt" | grep "fwd+bwd" | head -40
"$PY" benchmarks/bench_nested_attention.py --out "$OUT/bench_nested_attention.json" > "$OUT/bench_nested_attention.txt" 2>&1 \
  || { status=1; tail -20 "$OUT/bench_nested_attention.txt"; }
grep "fwd+bwd" "$OUT/bench_nested_attention.txt" | head -40
"$PY" benchmarks/bench_hsim_split.py --out "$OUT/bench_hsim_split.json" > "$OUT/bench_hsim_split.txt" 2>&1 \
  || { status=1; tail -20 "$OUT/bench_hsim_split.txt"; }
grep "fwd+bwd" "$OUT/bench_hsim_split.txt" | head -40
exit $status
