#!/usr/bin/env bash
# The GPU check, for a lent GPU machine: the CUDA tests, then the CUDA benchmarks, in a few
# minutes. Run from the repository root: `bash benchmarks/gpu_check.sh OUT_DIR`.
#
# The device image has torch, pytest, pytest-benchmark, scipy and hypothesis but not quadprog:
# put its wheel in .whl/ (ignored by git) before the run, as benchmarks/README.md says, and carry
# .whl with the call. Results land in OUT_DIR: the test log, the benchmark JSON and a text table.
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
    'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; } \
    >"$out/machine.txt" 2>&1

timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
    2>&1 | tee "$out/cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" benchmarks/test_cuda_step.py \
    --benchmark-only --benchmark-max-time=0.5 --benchmark-json="$out/cuda_bench.json" \
    --benchmark-columns=median,iqr,rounds 2>&1 | tee "$out/cuda_bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "cuda tests rc=$tests_rc, cuda benchmarks rc=$bench_rc"
exit $((tests_rc || bench_rc))
