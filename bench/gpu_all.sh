#!/usr/bin/env bash
# Every GPU benchmark in one short call (a lent GPU machine gives ~15 minutes in all).
#
#   bash bench/gpu_all.sh [OUT_DIR]
#
# Runs on a machine whose python3 already has torch (the lent H100/H200 image does); packages it
# lacks (diffusers, duckdb, importlib_metadata for core.vq / core.ledger) are installed from
# wheels in .whl/ when that folder exists; fetch them on a machine with PyPI (cp312, x86_64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     diffusers==0.42.1 duckdb==2.0.1 importlib_metadata
# Each benchmark has its own time cap so that one slow
# step (torch.compile) cannot swallow the figures of the others; logs go to OUT_DIR.
set -u
out=${1:-${OUT:-/tmp/gpu_bench}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$out/smi.txt"
$py -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)' | tee -a "$out/smi.txt"

step() {  # step NAME SECONDS CMD...: run with a cap, keep its log
  local name=$1 cap=$2; shift 2
  echo "=== $name (cap ${cap}s) ==="
  local t0=$SECONDS
  timeout "$cap" "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s ==="
}
# Caps from the first H100 run (2026-11-27): eager training 66 s for three resolutions; the
# pretokenize bench's 256-px pass ~80 s (512 px did not fit in 170 s); compiling the 1B model
# ~160 s at 256 px. Sum + install stays under one 10-minute device call.
step train ${CAP_TRAIN:-90} $py bench/gpu_train.py --res 256 512 1024
step pretokenize ${CAP_PRETOK:-200} $py bench/gpu_pretokenize.py --seconds 8
step train_compile ${CAP_COMPILE:-280} $py bench/gpu_train.py --compile --res 256 512 --warmup 2 --steps 5
echo "=== summary ==="
grep -h '^{' "$out"/train.txt "$out"/pretokenize.txt "$out"/train_compile.txt 2>/dev/null
