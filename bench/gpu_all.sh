#!/usr/bin/env bash
# GPU benchmarks in capped steps; one device call runs at most 10 minutes (15 in all per session),
# so run them as two calls:
#
#   bash bench/gpu_all.sh OUT_DIR stages                 # the real trainer, stages 1-3 (~9 min)
#   bash bench/gpu_all.sh OUT_DIR train pretokenize      # eager model steps + pretokenize (~5 min)
#
# Steps: stages (bench/gpu_stages.py: `train run stage1|2|3` >= 200 steps each, bench/gpu_train.py at
# the same settings, the cost of deterministic: true, MFU at the stages' micro-batches, measured.json
# for `train plan --measured`), train (bench/gpu_train.py eager at 256/512/1024 px), pretokenize
# (bench/gpu_pretokenize.py). No step names: all three, in that order (more than one call's time).
#
# Runs on a machine whose python3 already has torch (the lent H100/H200 image does); packages it
# lacks are installed from wheels in .whl/ when that folder exists; fetch them on a machine with
# PyPI (cp312, x86_64): open_clip_torch, ftfy and wcwidth for the trainer's text tower, diffusers,
# duckdb and importlib_metadata for core.vq / core.ledger:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth diffusers==0.42.1 duckdb==2.0.1 importlib_metadata
# Each step has its own time cap so that one slow step cannot swallow the figures of the others;
# logs go to OUT_DIR.
set -u
out=${1:-${OUT:-/tmp/gpu_bench}}
shift || true
steps=${*:-stages train pretokenize}
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
# Caps: gpu_stages.py keeps its own budget (510 s, skipping what no longer fits) inside a 540 s cap;
# from the first H100 run (2026-11-27): eager training 66 s for three resolutions, the pretokenize
# bench's 256-px pass ~80 s (512 px did not fit in 170 s).
for s in $steps; do
  case $s in
    stages) step stages ${CAP_STAGES:-540} $py bench/gpu_stages.py --out "$out/stages" --budget ${BUDGET_STAGES:-510} ;;
    train) step train ${CAP_TRAIN:-90} $py bench/gpu_train.py --res 256 512 1024 ;;
    pretokenize) step pretokenize ${CAP_PRETOK:-200} $py bench/gpu_pretokenize.py --seconds 8 ;;
    *) echo "unknown step $s (stages, train, pretokenize)"; exit 2 ;;
  esac
done
echo "=== summary ==="
grep -h '^{' "$out"/*.txt 2>/dev/null
