#!/usr/bin/env bash
# The main job on embedded defaults (run by `make demo` after setup).
# Metadata curation: generate LAION-like metadata with planted duplicates and missing scores,
# then dedup -> filter -> caption merge through `curate run --pipeline demo` (pipelines.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
CURATE=.venv/bin/curate

# 1. LAION-like metadata (200k rows in 8 parquet files) and a long-caption table.
rm -rf demo/laion demo/captions.parquet demo/out
$CURATE synth --rows 200000 --files 8 --output demo/laion --captions-output demo/captions.parquet

# 2. dedup, filter and caption merge, each step a folder under demo/out/.
$CURATE run --pipeline demo

# 3. The summary, and where the kept rows are.
.venv/bin/python -c "import json; s = json.load(open('demo/out/_summary.json')); [print(f\"{x['step']:>9}: {x['rows_in']:>8,} in -> {x['kept']:>8,} kept ({x['seconds']:.1f} s) in {x['output']}\") for x in s['steps']]"
