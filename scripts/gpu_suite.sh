#!/usr/bin/env bash
# GPU proof in one call, on a machine that already has torch, triton and nvcc and no network
# (the device tool's H100/H200, 16 cores): build tntkernels._C with --no-build-isolation, run the GPU
# tests (-m "gpu and not slow"; the CPU / interpreter tests run in CI) while compute-sanitizer memcheck
# and racecheck run scripts/sanitize.py beside them, run the benchmarks, and leave under $OUT:
#   env.json build.log backends.txt tests.log sanitize_{memcheck,racecheck,memcheck_triton}.log
#   bench_{inner_attention,nested_attention,hsim_split,train}.{json,png,txt}  steps.tsv (name, rc, seconds,
#   limit of every step)  results.json (all of it in one file)  README_perf.md (the README section,
#   also written into README.md between <!-- perf:start --> and <!-- perf:end -->)
# Every step runs under `timeout`: min(its cap, what is left of SUITE_BUDGET_S), so the whole suite
# ends within the budget and results.json is always written; a step with no time left is recorded
# as not run. Each step prints its exit code and seconds.
#
# Usage: OUT=/some/dir bash scripts/gpu_suite.sh verdict|bench|all   (default OUT: benchmarks/results/latest)
#   verdict  build (its failure does not stop the Triton tests), the GPU tests of every kernel one pytest
#            process per file, TEST_JOBS files at once (compiles warmed in parallel), each capped at
#            FILE_CAP_S seconds, with compute-sanitizer memcheck / racecheck beside them; <= 5 minutes
#   bench    build (skipped when already built), then the benchmarks, ours first, JSON after every row
#   all      both (the default)
# Environment:
#   SUITE_BUDGET_S  seconds for the whole suite (default 300 for verdict / bench, 470 for all)
#   STEPS           comma list of steps to run (default: the mode's: build,tests,sanitize | build,inner,nested,hsim,train)
#   TEST_MARK       pytest -m expression (default "gpu and not slow")
#   TEST_JOBS       test files at once (default 8)   FILE_CAP_S  seconds per test file (default 150)
#   INNER_ARGS NESTED_ARGS HSIM_ARGS TRAIN_ARGS  arguments of each benchmark (defaults below: a quick
#                   subset sized to the budget; give "" for the full sweep, with a larger budget)
#   SANITIZE_TRITON=0  skip the memcheck run over the Triton kernels
#   PACK=1          at the end, tar everything into $OUT/suite.tar.gz and keep beside it only
#                   results.json, README_perf.md, steps.tsv and the PNGs (the device tool brings back
#                   at most 8 files from its $OUT)
#   README=none     do not rewrite README.md (README_perf.md is still written)
#   TEST_FILES      space-separated test files instead of every file holding a GPU test (the CI dry run)
# The device tool's calls:  PACK=1 bash scripts/gpu_suite.sh verdict   then   PACK=1 bash scripts/gpu_suite.sh bench
# then here:  python benchmarks/write_readme_perf.py <files_at>/results.json   (rewrites README.md)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
MODE="${1:-all}"
case "$MODE" in
  verdict) DEFAULT_STEPS=build,tests,sanitize; DEFAULT_BUDGET=300 ;;
  bench) DEFAULT_STEPS=build,inner,nested,hsim,train; DEFAULT_BUDGET=300 ;;
  all) DEFAULT_STEPS=build,tests,sanitize,inner,nested,hsim,train; DEFAULT_BUDGET=470 ;;
  *) echo "usage: bash scripts/gpu_suite.sh verdict|bench|all" >&2; exit 2 ;;
esac
SUITE_BUDGET_S="${SUITE_BUDGET_S:-$DEFAULT_BUDGET}"
STEPS=",${STEPS:-$DEFAULT_STEPS},"
TEST_JOBS="${TEST_JOBS:-8}"
FILE_CAP_S="${FILE_CAP_S:-150}"
TEST_MARK="${TEST_MARK:-gpu and not slow}"
INNER_ARGS="${INNER_ARGS---quick --batch 256 --dtype bfloat16 --shapes tnt_s}"
NESTED_ARGS="${NESTED_ARGS---quick --dtype bfloat16}"
HSIM_ARGS="${HSIM_ARGS---quick --dtype bfloat16 --rows 8192}"
TRAIN_ARGS="${TRAIN_ARGS---quick}"
RESERVE_S=25   # kept back for results.json and the README
T0=$SECONDS
status=0
: > "$OUT/steps.tsv"

want() { [[ "$STEPS" == *",$1,"* ]]; }
left() { echo $(( SUITE_BUDGET_S - RESERVE_S - (SECONDS - T0) )); }
limit_for() { local cap=$1 l; l=$(left); (( l < cap )) && echo "$l" || echo "$cap"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"; }

# run_step NAME CAP_S LOG CMD...: CMD > LOG under timeout; records and prints rc and seconds.
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local lim; lim=$(limit_for "$cap")
  if (( lim < 15 )); then
    record "$name" - 0 "not run: suite budget spent"; echo "== $name: not run (suite budget spent)"; return 99
  fi
  echo "== $name (limit ${lim} s, $((SECONDS - T0)) s into the suite)"
  local t=$SECONDS rc
  timeout -k 15 "$lim" "$@" > "$log" 2>&1
  rc=$?
  record "$name" "$rc" "$((SECONDS - t))" "limit ${lim} s"
  echo "   $name: rc=$rc in $((SECONDS - t)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
  return $rc
}

finish() {
  echo "== results ($((SECONDS - T0)) s into the suite)"
  local readme_args=(--readme "${README:-README.md}")
  [ "${README:-README.md}" = none ] && readme_args=(--no-readme)
  "$PY" benchmarks/write_readme_perf.py --collect "$OUT" --section-out "$OUT/README_perf.md" "${readme_args[@]}" \
    || { echo "results.json / README step failed"; status=1; }
  "$PY" - "$OUT/results.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
print("tests:", r["tests"].get("summary", "no summary"))
for tool, s in r["sanitizers"].items():
    print(f"compute-sanitizer {tool}: {s['result']}")
for name, b in r["benchmarks"].items():
    print(f"{name}: {len(b.get('rows', []))} rows")
EOF
  cat "$OUT/steps.tsv"
  if [ "${PACK:-0}" = 1 ]; then  # only the files this suite writes are packed and removed
    local tgz; tgz="$(mktemp -d)/suite.tar.gz"
    ( cd "$OUT" && shopt -s nullglob \
      && files=() && for f in env.json build.log backends.txt tests.log steps.tsv results.json README_perf.md \
                              sanitize_*.log bench_*.json bench_*.txt bench_*.png tests; do if [ -e "$f" ]; then files+=("$f"); fi; done \
      && tar czf "$tgz" "${files[@]}" \
      && rm -rf env.json build.log backends.txt tests.log sanitize_*.log bench_*.json bench_*.txt tests ) \
      && mv "$tgz" "$OUT/suite.tar.gz"
    echo "packed into $OUT/suite.tar.gz; kept: $(ls "$OUT" | tr '\n' ' ')"
  fi
  echo "suite: $((SECONDS - T0)) s, status $status"
  exit $status
}

echo "== environment"
"$PY" - > "$OUT/env.json" <<'EOF' || true
import json, platform, shutil, subprocess
import torch
env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
run = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout.strip()
try:
    env["driver"] = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or None
except OSError:
    env["driver"] = None
nvcc = shutil.which("nvcc")
env["nvcc"] = run(nvcc, "--version").splitlines()[-1] if nvcc else None
env["commit"] = run("git", "rev-parse", "--short", "HEAD") or None
env["nproc"] = len(__import__("os").sched_getaffinity(0))
print(json.dumps(env))
EOF
cat "$OUT/env.json"

if want build; then
  if [ "$MODE" = bench ] && "$PY" -c "import tntkernels._C as C; assert C.cuda_compiled()" 2>/dev/null; then
    record build 0 0 "already built"; echo "== build: already built"
  else
    run_step build 240 "$OUT/build.log" env TNTKERNELS_FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e .
    rc=$?
    if [ $rc != 0 ]; then  # the Triton kernels need no nvcc: their tests still run; the C++ ones skip
      tail -30 "$OUT/build.log"; echo "build failed: the tests of the compiled ops will be skipped"; status=1
    fi
  fi
fi
"$PY" -m tntkernels > "$OUT/backends.txt" 2>&1; cat "$OUT/backends.txt"

# compute-sanitizer over scripts/sanitize.py, in the background while the tests run (no timings then)
SAN=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
         "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")/compute-sanitizer" \
         /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -n "$c" ] && [ -x "$c" ]; then SAN="$c"; break; fi
done
san_pids=()
if want sanitize; then
  if [ -z "$SAN" ]; then
    for tool in memcheck racecheck; do record "sanitize_$tool" - 0 "not run: compute-sanitizer not found"; done
    echo "== sanitizers: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, next to nvcc, /usr/local/cuda)"
  else
    echo "== sanitizers in the background: $SAN"
    run_step sanitize_memcheck 200 "$OUT/sanitize_memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize.py & san_pids+=($!)
    run_step sanitize_racecheck 200 "$OUT/sanitize_racecheck.log" \
      "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize.py & san_pids+=($!)
    if [ "${SANITIZE_TRITON:-1}" = 1 ]; then
      # 20 s after the tests start: it compiles what they compile, so it mostly finds their cache warm
      ( sleep 20; run_step sanitize_memcheck_triton 150 "$OUT/sanitize_memcheck_triton.log" \
          env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 \
          "$PY" scripts/sanitize.py --ops triton ) & san_pids+=($!)
    fi
  fi
fi

if want tests; then
  run_step tests 230 "$OUT/tests.log" "$PY" scripts/run_gpu_tests.py --mark "$TEST_MARK" --jobs "$TEST_JOBS" \
    --file-cap "$FILE_CAP_S" --log-dir "$OUT/tests" ${TEST_FILES:+--files $TEST_FILES} || status=1
  tail -25 "$OUT/tests.log"
fi
for pid in "${san_pids[@]}"; do wait "$pid" || status=1; done
for tool in memcheck racecheck memcheck_triton; do
  [ -f "$OUT/sanitize_$tool.log" ] && { echo "-- $tool:"; tail -4 "$OUT/sanitize_$tool.log"; }
done

echo "== benchmarks"
if want inner; then
  # shellcheck disable=SC2086
  run_step bench_inner_attention 110 "$OUT/bench_inner_attention.txt" \
    "$PY" benchmarks/bench_inner_attention.py $INNER_ARGS --out "$OUT/bench_inner_attention.json" \
    || { status=1; tail -20 "$OUT/bench_inner_attention.txt"; }
  grep -E "ours|timm_eager|compile" "$OUT/bench_inner_attention.txt" | grep "fwd+bwd" | head -40
fi
if want nested; then
  # shellcheck disable=SC2086
  run_step bench_nested_attention 100 "$OUT/bench_nested_attention.txt" \
    "$PY" benchmarks/bench_nested_attention.py $NESTED_ARGS --out "$OUT/bench_nested_attention.json" \
    || { status=1; tail -20 "$OUT/bench_nested_attention.txt"; }
  grep "fwd+bwd" "$OUT/bench_nested_attention.txt" | head -40
fi
if want hsim; then
  # shellcheck disable=SC2086
  run_step bench_hsim_split 60 "$OUT/bench_hsim_split.txt" \
    "$PY" benchmarks/bench_hsim_split.py $HSIM_ARGS --out "$OUT/bench_hsim_split.json" \
    || { status=1; tail -20 "$OUT/bench_hsim_split.txt"; }
  grep "fwd+bwd" "$OUT/bench_hsim_split.txt" | head -40
fi
if want train; then
  lim=$(limit_for 170)
  # --budget: candidates that would start after it are skipped with a note (JSON rewritten after every row)
  # shellcheck disable=SC2086
  run_step bench_train 170 "$OUT/bench_train.txt" \
    "$PY" benchmarks/bench_train.py $TRAIN_ARGS --budget $(( lim > 30 ? lim - 20 : 10 )) --out "$OUT/bench_train.json" \
    || { status=1; tail -20 "$OUT/bench_train.txt"; }
  sed -n '/^group /,$p' "$OUT/bench_train.txt" | head -40
fi
finish
