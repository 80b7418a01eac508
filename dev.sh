#!/usr/bin/env bash
# One entry point that sets everything up from a fresh clone, then runs a job:
#   ./dev.sh compare [args] the main job: the papers' experiments on the bundled data (tritonslide compare --quick,
#                           ~3 min on 2 cores; --full for the papers' settings), report in compare-report/
#   ./dev.sh demo [args]    train the 3-layer CNN on the bundled digits, dense vs ALSH
#   ./dev.sh test [args]    the test suite (what CI runs)
#   ./dev.sh bench [args]   the CPU benchmarks (bench/, pytest-benchmark)
# Setup: a virtual environment in .venv (override with VENV=...), a CPU build of torch installed first, then the
# package in editable mode with its dev extra. The pinned torch release resolves to the CPU wheel on this team's
# machines; elsewhere point pip at a CPU wheel index with TORCH_PIP_ARGS="--index-url URL" (or set TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "dev.sh: installing $TORCH_SPEC (CPU build) into $VENV" >&2
    # shellcheck disable=SC2086
    "$py" -m pip install -q --disable-pip-version-check $TORCH_PIP_ARGS "$TORCH_SPEC"
  fi
  # torch is already satisfied, so this adds only the package, numpy, triton (Linux), and the dev/demo tools.
  "$py" -m pip install -q --disable-pip-version-check -e ".[dev]"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  compare)
    setup
    exec "$VENV/bin/tritonslide" compare "$@"
    ;;
  demo)
    setup
    exec "$VENV/bin/tritonslide" demo "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  bench)
    setup
    # with no arguments every benchmark in bench/; otherwise the files / options given
    if [ $# -eq 0 ]; then set -- bench; fi
    exec "$VENV/bin/python" -m pytest --benchmark-only "$@"
    ;;
  *)
    echo "usage: ./dev.sh compare|demo|test|bench [args...]" >&2
    exit 2
    ;;
esac
