#!/usr/bin/env bash
# The one command to run when a GPU is lent (issue #13): GPU tests, autotuning, the quick GPU benchmarks, the
# dispatch table and the shipped tuning defaults, all written under one folder, with a summary table at the end.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--out DIR]     on a CUDA machine (the device image: torch 2.11,
#                                                             Triton 3.6, no registry)
#   bash bench/gpu_check.sh --dry-run [--out DIR]             the same steps on CPU under TRITON_INTERPRET=1 with
#                                                             tiny shapes (CI runs this so the script cannot rot)
#   bash bench/gpu_check.sh --collect DIR                     here, after a run: copy DIR's files to their places
#                                                             in the repository (DIR/manifest.txt says where)
#
# Budget: the default 450 s (under the 8 minutes the lease plan allows: a 15-minute lease also pays the machine's
# start and keeps room for a rerun). Each step runs under `timeout` with its share of the budget, in this order:
# benchmarks 55%, tests 20%, autotune 15%, the rest for setup and reports. A step that runs out is interrupted
# (SIGINT: pytest still writes its records), reported in the summary, and the script goes on. The benchmarks also
# trim their own case list to their share (--bench-budget; the cost model is bench/gpu.py: plan_budget; about
# 265 s for the whole quick list on an H100 with a cold Triton cache, an estimate).
#
# Output folder (default $OUT when the device tool runs this, else bench/results/gpu_check): at most 8 files, so
# that the device tool brings all of them back:
#   results-<gpu>.json   -> bench/results/<gpu>.json          benchmark records (device, versions, commit inside)
#   dispatch-<gpu>.json  -> tritonslide/dispatch/<gpu>.json   per-shape Triton / torch choice (bench.dispatch_table)
#   tuned-<gpu>.json     -> tritonslide/tuned/<gpu>.json      autotune winners shipped as package defaults
#   summary.md, log.txt, pip-list.txt, manifest.txt           the table, the whole log, the image's packages
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=450
BUDGET_SET=0
OUT_DIR=""
COLLECT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=${2:?--budget needs SECONDS}; BUDGET_SET=1; shift ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --collect) COLLECT=${2:?--collect needs the folder a run wrote}; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got $BUDGET" >&2; exit 2 ;; esac

if [ -n "$COLLECT" ]; then
  [ -f "$COLLECT/manifest.txt" ] || { echo "gpu_check.sh: $COLLECT/manifest.txt not found" >&2; exit 2; }
  while read -r file dest; do
    [ -n "$file" ] && [ -f "$COLLECT/$file" ] || continue
    mkdir -p "$(dirname "$dest")" && cp "$COLLECT/$file" "$dest" && echo "$COLLECT/$file -> $dest"
  done < "$COLLECT/manifest.txt"
  exit 0
fi

PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ]; then PY=.venv/bin/python; fi
OUT_DIR=${OUT_DIR:-${OUT:-bench/results/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/log.txt"
: > "$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# one tuning cache for every step: keys the autotune step timed are cache hits in the benchmarks
export TRITONSLIDE_CACHE_DIR="$WORK/cache"
export PYTHONUNBUFFERED=1
# the commit of the tree under test (the device machine gets a copy without .git)
export TRITONSLIDE_GIT_COMMIT=${TRITONSLIDE_GIT_COMMIT:-$(git describe --always --dirty --abbrev=40 2>/dev/null || echo unknown)}
START=$(date +%s)
STATUS=()

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
share() { echo $(( BUDGET * $1 / 100 )); }
# step NAME SECONDS CMD...: run CMD with its output in the log, interrupted after SECONDS
step() {
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  say "[$name] $* (limit ${secs}s)"
  timeout -s INT -k 30 "$secs" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS+=("| $name | ok | ${took}s |") ;;
    124|137) STATUS+=("| $name | stopped at its ${secs}s limit | ${took}s |") ;;
    *) STATUS+=("| $name | failed (exit $rc) | ${took}s |") ;;
  esac
  say "[$name] exit $rc after ${took}s"
  return 0
}

if [ "$DRY" = 1 ]; then
  # a CI machine is slower and shared: the limits only guard against a hang there (the dry run takes ~2-3 min)
  [ "$BUDGET_SET" = 1 ] || BUDGET=1200
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  SCALE=dry
  DTYPES=fp32                       # the interpreter has no bf16 tl.dot and no fp16 atomic_add
  TUNE_ARGS=(--model digits_cnn --batch 2 --image-size 8)   # the demo CNN: every kernel, seconds in the interpreter
else
  SCALE=quick
  DTYPES=fp16,bf16
  TUNE_ARGS=(--model alexnet,vgg11 --batch 64 --image-size 224)
fi

say "python $($PY -c 'import sys; print(sys.version.split()[0])'), budget ${BUDGET}s, scale $SCALE, out $OUT_DIR"
command -v nvidia-smi > /dev/null && nvidia-smi >> "$LOG" 2>&1
$PY -m pip list --format=freeze > "$OUT_DIR/pip-list.txt" 2>/dev/null
# what the steps import; the device image has them all (KINDS.md), a bare one may not: carry wheels in .whl/
MISSING=$($PY - <<'EOF'
import importlib.util
need = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "numpy": "numpy", "tqdm": "tqdm",
        "matplotlib": "matplotlib", "sklearn": "scikit-learn", "PIL": "pillow", "triton": "triton", "torch": "torch"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$MISSING" ] && [ -d .whl ]; then
  say "installing carried wheels for: $MISSING"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl >> "$LOG" 2>&1 &&
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -n "$MISSING" ] && say "missing packages: $MISSING (steps that need them will fail; see pip-list.txt)"

step install 120 $PY -m pip install -q --no-deps --no-build-isolation -e .
GPU=$($PY -c 'from tritonslide import tuning; from tritonslide._dispatch import gpu_slug; print(gpu_slug(tuning.gpu_identity()["name"]))')
GPU=${GPU:-unknown-device}
say "device slug: $GPU"
RESULTS="$OUT_DIR/results-$GPU.json"

# 1. the quick form of the four GPU benchmarks: each kernel family against its baselines (cuDNN, the torch path,
#    the memory floor); every Triton record is also checked against the torch path (a wrong kernel has no time).
#    First, as the evidence a lease exists for; its tuning goes into the shared cache.
rm -f "$RESULTS"
BENCH_SECS=$(share 55)
step benchmarks "$BENCH_SECS" $PY -m pytest -q -p no:cacheprovider --benchmark-only --bench-scale "$SCALE" \
  --bench-budget "$(( BENCH_SECS * 9 / 10 ))" --bench-results "$RESULTS" \
  bench/test_hash_histogram_gpu.py bench/test_active_conv2d_gpu.py bench/test_sketch_gpu.py bench/test_alsh_layer_gpu.py
# 2. correctness on the GPU: the kernel tests on CUDA, autocast, torch.compile (configs: the heuristic, so that the
#    tests do not spend the lease on tuning; -x would hide later failures, so it runs until its limit)
step "pytest -m gpu" "$(share 20)" env TRITONSLIDE_AUTOTUNE=off $PY -m pytest -q -m gpu -p no:cacheprovider tests
# 3. autotune the AlexNet / VGG-11 shapes of every method with kernels, inference and training (keys the
#    benchmarks tuned are cache hits; each key is written as it is tuned, so a stopped step keeps its winners)
step autotune "$(share 15)" $PY -m tritonslide autotune "${TUNE_ARGS[@]}" --dtype "$DTYPES" --mode inference,train \
  --cached
# 4. the dispatch table and the shipped tuning defaults
if [ -f "$RESULTS" ]; then
  DISPATCH_ARGS=()
  [ "$DRY" = 1 ] && DISPATCH_ARGS=(--include-dry)
  step dispatch 60 $PY -m bench.dispatch_table "$RESULTS" --out "$OUT_DIR/dispatch-$GPU.json" "${DISPATCH_ARGS[@]}"
fi
step tuned-defaults 60 $PY -c "
import shutil, sys
from tritonslide import tuning
src = tuning.user_cache_path(tuning.gpu_identity())
if not src.exists():
    sys.exit(f'no cache file {src}: nothing was tuned (the interpreter never times)' if '$DRY' == '0' else 0)
shutil.copy(src, '$OUT_DIR/tuned-$GPU.json')
print(src, '->', '$OUT_DIR/tuned-$GPU.json')
"

cat > "$OUT_DIR/manifest.txt" <<EOF
results-$GPU.json bench/results/$GPU.json
dispatch-$GPU.json tritonslide/dispatch/$GPU.json
tuned-$GPU.json tritonslide/tuned/$GPU.json
EOF
{
  echo "# gpu_check: $GPU, scale $SCALE, commit $TRITONSLIDE_GIT_COMMIT, $(( $(date +%s) - START ))s of ${BUDGET}s"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  [ -f "$RESULTS" ] && $PY -m bench.gpu_summary "$RESULTS"
} > "$OUT_DIR/summary.md" 2>> "$LOG"
cat "$OUT_DIR/summary.md"
say "files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
# the dry run is CI's check that every step still works: any failed step fails it
if [ "$DRY" = 1 ] && printf '%s\n' "${STATUS[@]}" | grep -qv '| ok |'; then
  say "dry run: a step did not finish ok (see $LOG)"
  tail -n 60 "$LOG" >&2
  exit 1
fi
exit 0
