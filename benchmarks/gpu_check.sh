#!/usr/bin/env bash
# The one-command GPU check, for a fresh single-GPU machine with torch and triton preinstalled and
# no network: installs fastencoder without dependencies, runs the gpu-marked tests and benchmarks,
# then `fastencoder bench --quick`, whose summary table is printed last. Meant to fit in 8 minutes.
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

$python -m pytest -m gpu -q -p no:cacheprovider --junitxml="$results/gpu-tests.xml" \
    --benchmark-json="$results/pytest-benchmark.json" tests benchmarks 2>&1 | tee "$results/gpu-tests.log"
tests_status=${PIPESTATUS[0]}
echo "== gpu-marked tests: $(tail -n 1 "$results/gpu-tests.log")"

$python -m fastencoder bench --quick --out "$results" 2>&1 | tee "$results/bench.log"
bench_status=${PIPESTATUS[0]}
echo "To publish: copy the run's folder from $results into benchmarks/results/, then"
echo "python -m fastencoder.benchmarks.readme  (regenerates the README's performance section)"
exit $(( tests_status || bench_status ))
