#!/usr/bin/env bash
# The one-command GPU check, for a fresh single-GPU machine with torch and triton preinstalled and
# no network: installs fastencoder without dependencies, then in three stages, each under its own
# time limit (seconds, from the environment) so that one slow stage cannot starve the next:
#   1. the whole test suite, tests/ (TESTS_S, default 270): with a GPU every kernel test runs the
#      compiled kernels on it, and the gpu-marked tests run too
#   2. `fastencoder bench --quick`, models first, its table printed last (BENCH_S, default 180)
#   3. the pytest-benchmark tests in benchmarks/ (BENCHMARKS_S, default 45)
# A stage cut short by its limit (SIGINT) still writes what it measured. Meant to fit in 8 minutes.
# Most of the tests' time is Triton compiling one kernel variant after another: with pytest-xdist
# (on the GPU image) they run in TEST_WORKERS (default 8) processes.
# Usage: benchmarks/gpu_check.sh RESULTS_DIR
set -uo pipefail
results=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$results"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ! $python -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>"$results/install.log"; then
    # no recent setuptools to build with: link the mapped packages into place inside this checkout
    # (the working directory comes first on sys.path, so this is the fastencoder that gets imported)
    ln -sfn ../kernels fastencoder/kernels && ln -sfn ../benchmarks fastencoder/benchmarks
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    $python -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')"
    $python -c "import transformers; print(f'transformers {transformers.__version__}')" 2>/dev/null
} | tee "$results/environment.txt"

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log it, keep its status
    local name=$1 seconds=$2
    shift 2
    timeout --signal=INT --kill-after=30 "$seconds" "$@" 2>&1 | tee "$results/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && echo "== $name: cut short after $seconds s"
    return "$status"
}

workers=()
if $python -c "import xdist" 2>/dev/null; then
    workers=(-n "${TEST_WORKERS:-8}")
fi
stage tests "${TESTS_S:-270}" $python -m pytest -v -p no:cacheprovider "${workers[@]}" \
    --junitxml="$results/tests.xml" tests
tests_status=$?
stage bench "${BENCH_S:-180}" $python -m fastencoder bench --quick --out "$results"
bench_status=$?
stage pytest-benchmark "${BENCHMARKS_S:-45}" $python -m pytest -m gpu -q -p no:cacheprovider \
    --benchmark-json="$results/pytest-benchmark.json" benchmarks
benchmarks_status=$?
echo "== tests: $(grep -E '^=+ .+ in [0-9.]+s' "$results/tests.log" | tail -n 1)"
echo "== status: tests $tests_status, bench $bench_status, pytest-benchmark $benchmarks_status"
echo "To publish: copy the run's folder from $results into benchmarks/results/, then"
echo "python -m fastencoder.benchmarks.readme  (regenerates the README's performance section)"
exit $(( tests_status || bench_status || benchmarks_status ))
