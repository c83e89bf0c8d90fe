#!/usr/bin/env bash
# Issue 8's GPU benchmark in one call, on a machine with a CUDA GPU, from the repository root:
#     bash benchmarks/gpu.sh [OUT_DIR] [gpu_bench.py options]
# Wheels carried in .whl/ (trl, datasets, peft, bitsandbytes, liger-kernel, ...: a GPU machine with no registry)
# are installed into /tmp/site first. Prints a short table last; full results in OUT_DIR.
set -uo pipefail
out=${1:-${OUT:-/tmp/tuneforge-gpu}}
shift || true
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > "$out/pip.txt" 2>&1 || { tail -5 "$out/pip.txt"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 benchmarks/gpu_bench.py --out "$out" "$@"
