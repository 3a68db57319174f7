#!/bin/bash
# The GPU checks in one go, for a machine with a CUDA GPU and torch already installed (the
# device machines lent to some sessions), run from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Packages the machine lacks come as wheels in .whl/ (pyro-ppl, pyro-api, tensorboardX,
# h5netcdf, arviz, xarray-einstats, platformdirs: see benchmarks/README.md, "On a GPU"); they
# and vibench are installed into /tmp/site, put on PYTHONPATH. Each part has its own time
# limit in seconds (TESTS_S, BENCH_S, BIG_S, SUITE_S; 0 skips the part; the defaults come to
# about 8 minutes, to fit one 10-minute device call) and is stopped with SIGINT, so pytest
# still prints its summary of failures. Logs, JUnit XML and a profile of the 10^8-row
# compiled run go to OUT_DIR (default: $OUT).
set -u
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
began=$(date +%s)
mark() { echo "== $1 at $(( $(date +%s) - began )) s"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --no-build-isolation --target /tmp/site .whl/*.whl . packages/vibench-posteriordb
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import sys, torch, pyro; print(sys.version.split()[0], torch.__version__, \
pyro.__version__, torch.cuda.get_device_name())"
mark "set up"

if [ "${TESTS_S:-180}" -gt 0 ]; then
    timeout -s INT "${TESTS_S:-180}" python3 -m pytest -p no:cacheprovider -n 4 -q -rA \
        tests/test_gpu.py --junitxml="$out/test_gpu.xml" 2>&1 | grep -v Benchmark \
        | tee "$out/test_gpu.log" | tail -25
    mark "GPU tests"
fi

if [ "${BENCH_S:-120}" -gt 0 ]; then
    timeout -s INT "${BENCH_S:-120}" python3 benchmarks/gpu.py --coin-steps 4000 --steps 100 \
        --sizes 1000000 10000000 2>&1 | tee "$out/gpu_bench.log"
    pkill -INT -f "workbench run"
    mark "benchmarks"
fi

# 10^8 rows compiled, its kernels profiled; the cProfile and the stacks (every thread, each
# 30 s) say where a set-up that does not end spends its time (on 26 November 2026: Triton
# autotuning a sum over the rows that inductor had not split).
if [ "${BIG_S:-150}" -gt 0 ]; then
    timeout -s INT "${BIG_S:-150}" python3 -m cProfile -o "$out/logistic-1e8.prof" \
        benchmarks/gpu_profile.py --rows 100000000 --steps 100 --stacks "$out/stacks.txt" \
        2>&1 | grep -v "^step " | tail -40
    python3 -c "import pstats; pstats.Stats('$out/logistic-1e8.prof').sort_stats('cumulative')\
.print_stats('workbench|standalone_compile|make_fx|_check_against|benchmark_all_configs', 20)" \
        | tail -26
    mark "10^8 rows"
fi

if [ "${SUITE_S:-0}" -gt 0 ]; then
    timeout -s INT "$SUITE_S" python3 -m pytest -p no:cacheprovider -n 16 -q -m 'not slow' \
        --junitxml="$out/suite.xml" 2>&1 | grep -v Benchmark | tee "$out/suite.log" | tail -40
    mark "quick suite"
fi
