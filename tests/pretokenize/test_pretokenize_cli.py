"""The three spellings of the command through CliRunner: `pretokenize --res ...` (on the local
Ray, actors), `pretokenize check ...`, `pretokenize fit-vq ...`, and user errors (exit 2)."""
from __future__ import annotations

import io
import json

from PIL import Image
from typer.testing import CliRunner

from core.codeshard import CodeDataset
from core.vq import load_vq
from pretokenize.cli import app

RES = 32
runner = CliRunner()


def flat(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_encode_on_ray_then_check(tmp_path, shards, vq_dir, ray_local):
    out = tmp_path / "codes"
    args = ["--res", str(RES), "--input", str(shards), "--output", str(out), "--vq", str(vq_dir), "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 13 code rows (8x8 tokens)" in flat(result)
    assert len(CodeDataset(out)) == 13
    again = runner.invoke(app, args)  # every shard done: nothing re-encoded, same manifest
    assert again.exit_code == 0 and "wrote 13 code rows" in flat(again)

    result = runner.invoke(app, ["check", "--input", str(out), "--n", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "_check" / "check.json").read_text())
    assert report["compared"] == 4 and report["decoded_only"] == 0
    assert all(s["psnr"] > 5 for s in report["samples"])
    with Image.open(out / "_check" / report["samples"][0]["png"]) as im:
        assert im.size == (2 * RES, RES)  # input | reconstruction
    assert (out / "_check" / "codebook_usage.png").is_file()
    assert "codebook:" in flat(result) and "mean PSNR" in flat(result)


def test_fit_vq_spelling(tmp_path, shards):
    out = tmp_path / "vq"
    result = runner.invoke(app, ["fit-vq", "--input", str(shards), "--output", str(out), "--steps", "2",
                                 "--codebook", "16", "--downsample", "4", "--res", "16", "--crop", "8",
                                 "--batch-size", "2", "--width", "8"])
    assert result.exit_code == 0, result.output
    vq = load_vq(out)
    assert vq.config.num_vq_embeddings == 16 and "saved VQ (16 codes, f4)" in flat(result)
    assert "held-out PSNR" in flat(result)
    again = runner.invoke(app, ["fit-vq", "--input", str(shards), "--output", str(out), "--steps", "2"])
    assert again.exit_code == 2 and "exists and is not empty" in flat(again)  # never half-overwritten


def test_user_errors_exit_2_with_one_line(tmp_path, shards, vq_dir):
    base = ["--input", str(shards), "--output", str(tmp_path / "o")]
    result = runner.invoke(app, ["--res", "30", "--vq", str(vq_dir), *base])
    assert result.exit_code == 2 and "multiple of the tokenizer's downsampling factor 4" in flat(result)
    assert "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["--res", "32", "--vq", str(tmp_path / "empty"), *base])
    assert result.exit_code == 2 and "config.json: missing" in flat(result)
    result = runner.invoke(app, ["--res", "32"])
    assert result.exit_code == 2 and "--input and --output are required" in flat(result)
    result = runner.invoke(app, ["--res", "32", "--crop", "diagonal", "--vq", str(vq_dir), *base])
    assert result.exit_code == 2 and "crop must be one of center, random" in flat(result)
    result = runner.invoke(app, ["check", "--input", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no manifest.json" in flat(result)


def test_help_lists_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("--res", "--keep-list", "--ray-address", "check", "fit-vq"):
        assert word in result.output


def test_the_driver_imports_no_torch():
    """The driver only reads the tokenizer's identity; torch (~2 s of import) loads in the actors
    that encode. Checked in a fresh interpreter: this test process has torch loaded already."""
    import subprocess
    import sys

    code = "import sys, pretokenize.cli, pretokenize.run; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_corrected_original_sizes_and_an_all_too_small_run_are_said(tmp_path, vq_dir):
    import pyarrow.parquet as pq

    from core.imageshard import Sample, write_shard

    def png_of(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 40, 40)).save(buf, "PNG")
        return buf.getvalue()

    src = tmp_path / "in"
    src.mkdir()
    metas = [{"original_width": 240, "original_height": 160},  # a plain rescale of this 48x32 image
             {"original_width": 160, "original_height": 240},  # turned: the image is upright
             {"original_width": 2_000_000_000, "original_height": 32}]  # no download makes this image
    write_shard(src / "00000.tar", [Sample(f"0000000{i}", png_of(48, 32), "png", "c", m) for i, m in enumerate(metas)])
    out = tmp_path / "codes"
    result = runner.invoke(app, ["--res", str(RES), "-i", str(src), "-o", str(out), "--vq", str(vq_dir),
                                 "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert "warning: 2 kept image(s) had an original size in their .json that does not fit" in flat(result)
    rows = pq.read_table(out / "_ledger" / "00000.parquet").to_pylist()
    assert [(r["state"], r["reason"]) for r in rows] == [("kept", None), ("kept", "orig_size_rotated"),
                                                          ("kept", "orig_size_mismatch")]
    result = runner.invoke(app, ["--res", "64", "-i", str(src), "-o", str(tmp_path / "big"), "--vq", str(vq_dir),
                                 "--executor", "local"])
    assert result.exit_code == 0 and "no image was encoded: 3 were smaller than --res 64" in flat(result)
