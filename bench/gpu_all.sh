#!/usr/bin/env bash
# Every GPU benchmark in one short call (a lent GPU machine gives ~15 minutes in all).
#
#   bash bench/gpu_all.sh [OUT_DIR]
#
# Runs on a machine whose python3 already has torch (the lent H100/H200 image does); packages it
# lacks (diffusers, duckdb, importlib_metadata for core.vq / core.ledger) are installed from
# wheels in .whl/ when that folder exists. Each benchmark has its own time cap so that one slow
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
step train ${CAP_TRAIN:-150} $py bench/gpu_train.py --res 256 512 1024
step pretokenize ${CAP_PRETOK:-170} $py bench/gpu_pretokenize.py --seconds 8
step train_compile ${CAP_COMPILE:-200} $py bench/gpu_train.py --compile --res 256 512
echo "=== summary ==="
grep -h '^{' "$out"/train.txt "$out"/pretokenize.txt "$out"/train_compile.txt 2>/dev/null
