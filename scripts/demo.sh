#!/usr/bin/env bash
# The main job on embedded defaults (run by `make demo` after setup), end to end on one CPU
# machine with no network: metadata curation, image curation, pretokenize, train, sample.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
rm -rf demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/7 metadata: 200k LAION-like rows (planted duplicates, missing scores) -> dedup -> filter -> captions"
$BIN/curate synth --rows 200000 --files 8 --output demo/laion --captions-output demo/captions.parquet
$BIN/curate run --pipeline demo

step "2/7 images: photos served on 127.0.0.1 -> dedup -> filter -> download -> neardup -> score"
$BIN/python scripts/demo_web.py --out demo/web --n 320 -- $BIN/curate run --pipeline demo-web

step "3/7 fit a small VQ tokenizer on the downloaded images (no real checkpoint is at hand offline)"
$BIN/pretokenize fit-vq --input demo/web-out/download --output demo/vq --codebook 256 --downsample 8 --res 64 --steps 150

step "4/7 pretokenize: images -> VQ code shards (near-duplicates skipped via keep.parquet)"
$BIN/pretokenize --res 64 --input demo/web-out/download --output demo/codes --vq demo/vq \
  --keep-list demo/web-out/neardup/keep.parquet
$BIN/pretokenize check --input demo/codes --n 8

step "5/7 train the debug model on the codes (resumable: rerun the same command to continue)"
$BIN/train run debug --data demo/codes --run-dir demo/train --steps 300

step "6/7 sample from the trained model"
$BIN/train sample --checkpoint demo/train --out demo/samples.png --n 4 --steps 12 --cfg 3 \
  --prompt "a photo of a cup of coffee on a saucer on a wooden table, natural tones" \
  --prompt "a close-up of a ginger tabby cat looking to the side, warm tones"

step "7/7 summary"
$BIN/python - <<'PY'
import json
for name in ("demo/out/_summary.json", "demo/web-out/_summary.json"):
    for x in json.load(open(name))["steps"]:
        print(f"{x['step']:>9}: {x['rows_in']:>8,} in -> {x['kept']:>8,} kept ({x['seconds']:.1f} s) in {x['output']}")
m = json.load(open("demo/codes/manifest.json"))
print(f"   codes: {m['num_rows']} images -> {m['grid'][0]}x{m['grid'][1]} tokens of {m['codebook_size']} codes in demo/codes")
lines = [json.loads(l) for l in open("demo/train/metrics.jsonl") if '"loss"' in l]
print(f"   train: loss {lines[0]['loss']:.3f} (step {lines[0]['step']}) -> {lines[-1]['loss']:.3f} (step {lines[-1]['step']}); run folder demo/train")
print("  sample: demo/samples.png")
PY

step "report: every step above on one self-contained page"
$BIN/curate report demo -o demo/report.html
echo "open demo/report.html in a browser"
