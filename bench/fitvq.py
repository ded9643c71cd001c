"""`pretokenize fit-vq` with its default settings: held-out PSNR and time on two image sets.

1. shapes: the shapes world (scripts/shapes_world.py), flat colours, 2,520 images at 64 px;
2. photos: the demo's photos (scripts/demo_web.py: 320 crops of the scikit-image photos,
   without the planted duplicates), stored at 128 px as the demo downloads them, fit at 64 px.

Issue 13's goals: >= 28 dB on (1), >= 22 dB on (2), <= 3 minutes each on this 2-core machine.
Each fit runs the real command (`pretokenize fit-vq --input SHARDS --output VQ`, nothing else)
in a subprocess; PSNR is the fit's own held-out measure (64 images it never trained on, see
fit_report.json); wall and CPU seconds are measured here. `--baseline` also runs the previous
defaults (f8, width 32, 300 steps of 64-px batches, lr 1e-3, codebook learnt by gradient)
through the same command with a pipelines.yaml that sets them (its lr now decays by cosine;
it was constant).

    .venv/bin/python bench/fitvq.py [--baseline] [--repeats 1] [--work bench/_work/fitvq]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

import demo_web  # noqa: E402
import shapes_world  # noqa: E402
from toy_t2i import command, timed  # noqa: E402

# The fit_vq section of pipelines.yaml before issue 13, plus what the code then fixed.
PREVIOUS = {"codebook": 1024, "downsample": 8, "steps": 300, "res": 64, "batch_size": 16, "width": 32,
            "crop": 64, "lr": 1.0e-3, "warmup_steps": 0, "codebook_decay": 0.0}


def image_sets(work: Path) -> dict[str, Path]:
    """Write both image sets as download-style shards; returns name -> shard folder."""
    shapes, photos = work / "shapes", work / "photos"
    demo_web.write_shards(shapes, shapes_world.training_items(), size=64)
    distinct = (item for item in demo_web.photo_items(320, 0) if item[0].startswith("img"))
    demo_web.write_shards(photos, distinct, size=128)
    return {"shapes": shapes, "photos": photos}


def fit(shards: Path, out: Path, config: Path | None) -> dict:
    """One `pretokenize fit-vq` run: its report plus wall/CPU seconds measured from outside."""
    extra = ["--config", str(config)] if config else []
    t = timed(command("pretokenize", "fit-vq", "--input", str(shards), "--output", str(out), *extra),
              out.with_suffix(".log"))
    report = json.loads((out / "fit_report.json").read_text())
    return {"psnr": round(report["psnr"], 2), "codes_used": report["codes_used"],
            "held_out_images": report["held_out_images"], **t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="store_true", help="also fit with the previous defaults")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "fitvq")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    sets = image_sets(args.work)
    previous = args.work / "previous.yaml"
    previous.write_text(yaml.safe_dump({"pretokenize": {"fit_vq": PREVIOUS}}))
    recipes = {"defaults": None, **({"previous": previous} if args.baseline else {})}
    results = {}
    for name, shards in sets.items():
        for recipe, config in recipes.items():
            runs = [fit(shards, args.work / f"{name}-{recipe}-{r}", config) for r in range(args.repeats)]
            results[f"{name}/{recipe}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name:>7} {recipe:>9}: {results[f'{name}/{recipe}']}", flush=True)
    (args.work / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
