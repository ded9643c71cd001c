#!/usr/bin/env bash
# The main job on embedded defaults (run by `make demo` after setup), end to end on one CPU
# machine with no network: metadata curation, image curation, pretokenize, train, sample.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
rm -rf demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/8 metadata: 200k LAION-like rows (planted duplicates, missing scores) -> dedup -> filter -> captions"
$BIN/curate synth --rows 200000 --files 8 --output demo/laion --captions-output demo/captions.parquet
$BIN/curate run --pipeline demo

step "2/8 photos served on 127.0.0.1 -> dedup -> filter -> download -> neardup -> score"
$BIN/python scripts/demo_web.py --out demo/web --n 320 -- $BIN/curate run --pipeline demo-web

step "3/8 the shapes world served on 127.0.0.1 (6 shape/colour/background combinations held out) -> dedup -> filter -> download"
$BIN/python scripts/demo_web.py --world shapes --out demo/shapes --n 30 -- $BIN/curate run --pipeline demo-shapes

step "4/8 fit a VQ tokenizer on the shapes (pretokenize fit-vq, its defaults: ~2-3 min)"
$BIN/pretokenize fit-vq --input demo/shapes-out/download --output demo/vq

step "5/8 pretokenize: shapes -> VQ code shards; reconstructions beside originals"
$BIN/pretokenize --res 64 --input demo/shapes-out/download --output demo/codes --vq demo/vq
$BIN/pretokenize check --input demo/codes --n 8

step "6/8 train the debug model on the codes (resumable: rerun the same command to continue)"
$BIN/train run debug --data demo/codes --run-dir demo/train --steps 3000

step "7/8 sample the held-out prompts (never in training) and judge the pictures by their pixels"
mapfile -t HELD < <($BIN/python scripts/shapes_world.py held-out)
PROMPTS=()
for p in "${HELD[@]}"; do PROMPTS+=(--prompt "$p"); done
$BIN/train sample --checkpoint demo/train --out demo/samples.png --n 4 "${PROMPTS[@]}"  # guidance: the debug stage's sample.cfg (3)
$BIN/python scripts/shapes_world.py judge demo/samples.png --n 4 || true

step "8/8 summary"
$BIN/python - <<'PY'
import json
for name in ("demo/out/_summary.json", "demo/web-out/_summary.json", "demo/shapes-out/_summary.json"):
    for x in json.load(open(name))["steps"]:
        print(f"{x['step']:>9}: {x['rows_in']:>8,} in -> {x['kept']:>8,} kept ({x['seconds']:.1f} s) in {x['output']}")
fit = json.load(open("demo/vq/fit_report.json"))
print(f"  fit-vq: held-out PSNR {fit['psnr']:.1f} dB, {fit['codes_used']} codes used, {fit['seconds']:.0f} s; demo/vq")
m = json.load(open("demo/codes/manifest.json"))
print(f"   codes: {m['num_rows']} images -> {m['grid'][0]}x{m['grid'][1]} tokens of {m['codebook_size']} codes in demo/codes")
lines = [json.loads(l) for l in open("demo/train/metrics.jsonl") if '"loss"' in l]
print(f"   train: loss {lines[0]['loss']:.3f} (step {lines[0]['step']}) -> {lines[-1]['loss']:.3f} (step {lines[-1]['step']}); run folder demo/train")
print("  sample: demo/samples.png (one row per held-out prompt)")
PY

step "report: every step above on one self-contained page"
$BIN/curate report demo -o demo/report.html
echo "open demo/report.html in a browser"
