"""curate download end to end against a loopback server of hostile inputs.

img2dataset costs 7-9 s of start-up per call, so the whole file makes three calls: one run
over every bad-input case (each case is then its own test, read from the ledger), one rerun
that redoes a damaged shard on img2dataset's Ray distributor, and one `--retry-failed`
through the CLI. The server is on loopback, which the network guard refuses unless allowed:
every run allows 127.0.0.0/8, and the cases that point (or redirect) anywhere else are refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import httpserver as hs  # noqa: E402

from core import imageshard  # noqa: E402
from curate.download import step as dl  # noqa: E402
from curate.cli import app  # noqa: E402

CFG = dict(image_size=64, processes=1, threads=16, timeout=1.5, max_download_seconds=2.5, retries=1,
           max_bytes=200_000, max_pixels=50_000_000, samples_per_shard=32, allow_networks=["127.0.0.0/8"])
KEPT, FAILED = "kept", "failed"

# name -> (route or literal URL, expected state, expected reason); fast cases in file a (shard 0),
# slow in b (shard 1)
FAST = {
    "good_jpeg": (hs.Route(hs.jpeg(seed=11)), KEPT, None),
    "good_png": (hs.Route(hs._save(hs.photo(50, 40, 12), "PNG"), "image/png"), KEPT, None),
    "truncated_jpeg": (hs.Route(hs.truncated_jpeg()), FAILED, "decode_error"),
    "zero_bytes": (hs.Route(b""), FAILED, "decode_error"),
    "html_as_jpeg": (hs.Route(hs.HTML_PAGE, "image/jpeg"), FAILED, "decode_error"),
    "cmyk_jpeg": (hs.Route(hs.cmyk_jpeg()), KEPT, None),
    "png_16bit": (hs.Route(hs.png16(), "image/png"), KEPT, None),
    "palette_png_transparency": (hs.Route(hs.palette_png_transparent(), "image/png"), KEPT, None),
    "animated_gif": (hs.Route(hs.animated_gif(), "image/gif"), KEPT, None),
    "exif_rotated_jpeg": (hs.Route(hs.exif_rotated_jpeg()), KEPT, None),
    "thin_1x20000": (hs.Route(hs.thin_png(), "image/png"), FAILED, "aspect_ratio"),
    "decompression_bomb": (hs.Route(hs.png_bomb(), "image/png"), FAILED, "too_many_pixels"),
    "not_found_404": (None, FAILED, "http_404"),
    "connection_refused": (None, FAILED, "connection_refused"),
    "x_robots_noai": (hs.Route(hs.jpeg(), headers={"X-Robots-Tag": "noai"}), FAILED, "x_robots_tag"),
    "body_over_cap_chunked": (hs.Route(b"\xff" * 300_000, chunked=True), FAILED, "too_large"),
    "body_over_cap_declared": (hs.Route(b"\xff" * 300_000), FAILED, "too_large"),
    "redirect_within_loopback": (hs.Route(location="/good_jpeg.img", status=301), KEPT, None),
    "private_address": ("http://10.0.0.1/a.jpg", FAILED, "blocked_address"),
    "metadata_mapped_ipv6": ("http://[::ffff:169.254.169.254]/latest/meta-data/", FAILED, "blocked_address"),
    "redirect_to_private": (hs.Route(location="http://192.168.1.1/a.jpg"), FAILED, "blocked_address"),
    "redirect_to_metadata": (hs.Route(location="http://169.254.169.254/latest/meta-data/"), FAILED, "blocked_address"),
    "file_url": ("file:///etc/hostname", FAILED, "bad_url"),
    "redirect_to_file": (hs.Route(location="file:///etc/hostname"), FAILED, "bad_url"),
}
BLOCKED = [n for n, c in FAST.items() if c[2] == "blocked_address"]
SLOW = {
    "stalls_beyond_timeout": (hs.Route(hs.jpeg(), stall=60), FAILED, "timeout"),
    "trickles_forever": (hs.Route(hs.jpeg(), trickle=0.5), FAILED, "timeout"),
    "trickles_headers": (hs.Route(hs.jpeg(), header_trickle=0.5), FAILED, "timeout"),
    "connection_reset": (hs.Route(reset=True), FAILED, "connection_reset"),
    "flaky_503": (hs.Route(hs.jpeg(seed=13), fail_first=2), FAILED, "http_503"),  # 2 = 1 try + 1 retry
    "good_after_slow": (hs.Route(hs.jpeg(seed=14)), KEPT, None),
}
CASES = {**FAST, **SLOW}


def _url(server: hs.ImageServer, name: str, route: hs.Route | str | None) -> str:
    if name == "connection_refused":
        return hs.closed_port_url()
    if isinstance(route, str):
        return route
    return server.add(f"{name}.img", route) if route else server.url(f"{name}.img")


def _write_input(folder: Path, server: hs.ImageServer, cases: dict, file: str) -> None:
    names = list(cases)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "URL": [_url(server, n, cases[n][0]) for n in names],
        "TEXT": names,
        "aesthetic": [5.5] * len(names),
        "pwatermark": [0.1] * len(names),
    }), folder / file)


@pytest.fixture(scope="module")
def server():
    with hs.ImageServer() as s:
        yield s


@pytest.fixture(scope="module")
def hostile(server, tmp_path_factory):
    """One download run over every case; returns (out folder, ledger by caption, samples by key, seconds)."""
    root = tmp_path_factory.mktemp("hostile")
    _write_input(root / "in", server, FAST, "a.parquet")
    _write_input(root / "in", server, SLOW, "b.parquet")
    t0 = time.perf_counter()
    stats = dl.run(dl.DownloadConfig(**CFG), str(root / "in"), str(root / "out"))
    seconds = time.perf_counter() - t0
    return root, stats, _ledger_by_caption(root / "out"), _samples(root / "out"), seconds


def _ledger_by_caption(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "_ledger").to_pylist()
    names = {("a.parquet", i): n for i, n in enumerate(FAST)} | {("b.parquet", i): n for i, n in enumerate(SLOW)}
    return {names[(r["source"], r["row"])]: r for r in rows}


def _samples(out: Path) -> dict[str, imageshard.Sample]:
    return {s.key: s for p in imageshard.list_shards(out) for s in imageshard.iter_shard(p)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(hostile, case):
    """Each case ends kept (and correct) or failed with the expected reason."""
    _, _, by_caption, samples, _ = hostile
    _, state, reason = CASES[case]
    row = by_caption[case]
    assert (row["state"], row["reason"]) == (state, reason), row
    if state == KEPT:
        s = samples[row["key"]]
        im = Image.open(io.BytesIO(s.image))
        im.load()
        # aspect kept, shorter side 64 (or the image's own size: never upscaled)
        ow, oh = s.meta["original_width"], s.meta["original_height"]
        assert min(im.size) == min(64, ow, oh) and abs(im.size[0] / im.size[1] - ow / oh) < 0.05 and s.caption == case
        assert s.meta["status"] == "success" and s.meta["aesthetic"] == 5.5 and s.meta["pwatermark"] == 0.1
        assert s.meta["hash"] == mmh3.hash64((s.meta["url"] + case).encode())[0]  # computed: input had none
    else:
        assert row["key"] not in samples and row["value"].startswith("failed_to_")


def test_kept_images_are_right(hostile, server):
    _, _, by_caption, samples, _ = hostile
    meta = {n: samples[by_caption[n]["key"]].meta for n in CASES if CASES[n][1] == KEPT}
    assert (meta["exif_rotated_jpeg"]["original_width"], meta["exif_rotated_jpeg"]["original_height"]) == (60, 120)
    assert meta["good_jpeg"]["sha256"] == hashlib.sha256(hs.jpeg(seed=11)).hexdigest()  # of the bytes served
    grey = np.asarray(Image.open(io.BytesIO(samples[by_caption["png_16bit"]["key"]].image)).convert("L"))
    assert 100 < grey.mean() < 155 and grey.std() > 40  # the ramp survived (not saturated to white)


def test_run_accounts_for_every_url_and_behaves_on_the_wire(hostile, server):
    root, stats, by_caption, samples, seconds = hostile
    assert stats["rows_in"] == len(CASES) == stats["kept"] + stats["failed"]
    assert stats["kept"] == sum(c[1] == KEPT for c in CASES.values()) == len(samples)
    assert len(by_caption) == len(CASES)  # every input row exactly once
    assert sorted(p.name for p in (root / "out" / "_done").iterdir()) == ["00000.json", "00001.json"]
    assert server.hits["not_found_404.img"] == 1  # permanent errors are not retried
    assert server.hits["stalls_beyond_timeout.img"] == 2 and server.hits["flaky_503.img"] == 2
    assert server.hits["trickles_headers.img"] == 1  # the URL's deadline was spent: no retry
    assert all(server.hits[f"{n}.img"] == 1 for n in BLOCKED if n.startswith("redirect"))  # refusals are final
    assert stats["failed_reasons"]["blocked_address"] == len(BLOCKED) and stats["failed_reasons"]["bad_url"] == 2
    assert all("(compatible; tessera;" in ua for ua in server.user_agents)
    assert seconds < 90  # nothing hung (the stall sleeps 60 s, the trickles would take minutes)


def test_rerun_skips_verified_shards_and_redoes_a_damaged_one_on_ray(hostile, tmp_path):
    root, stats, by_caption, _, _ = hostile
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    logs = set((out / "_logs").iterdir())
    t0 = time.perf_counter()
    assert dl.run(dl.DownloadConfig(**CFG), str(root / "in"), str(out)) == stats
    assert time.perf_counter() - t0 < 5 and set((out / "_logs").iterdir()) == logs  # no img2dataset call
    tar = out / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # damaged after it was verified
    # Redone through img2dataset's Ray distributor (a local Ray started by the worker): the
    # limits and the shard plan must hold in Ray workers too, so the ledger comes out the same.
    assert dl.run(dl.DownloadConfig(**CFG, distributor="ray"), str(root / "in"), str(out)) == stats
    new_logs = set((out / "_logs").iterdir()) - logs
    assert len(new_logs) == 2  # one call (log + spec), shard 0 only
    spec = json.loads(next(p for p in new_logs if p.name.endswith(".spec.json")).read_text())
    assert spec["i2d"]["distributor"] == "ray" and [e["id"] for e in spec["plan"]] == [0]
    assert _ledger_by_caption(out) == by_caption
    assert len(_samples(out)) == stats["kept"]


def test_retry_failed_requeues_transient_failures_into_new_shards(hostile, server, tmp_path):
    root, stats, by_caption, _, _ = hostile
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    runner = CliRunner()
    yaml = tmp_path / "pipelines.yaml"  # settings from the file, the rest as flags: one precedence
    yaml.write_text("curate:\n  download:\n    max_download_seconds: 2.5\n    threads: 16\n    image_size: 32\n")
    args = ["download", "-i", str(root / "in"), "-o", str(out), "-c", str(yaml), "--image-size", "64",
            "--processes", "1", "--timeout", "1.5", "--retries", "1", "--max-bytes", "200000",
            "--max-pixels", "50000000", "--allow-network", "127.0.0.0/8", "--samples-per-shard", "32"]
    hits = dict(server.hits)
    changed = runner.invoke(app, args[:-1] + ["16"])  # a different shard size is a different output
    assert changed.exit_code == 2 and "different config" in changed.output
    unguarded = [a for a in args if a not in ("--allow-network", "127.0.0.0/8")]  # so is another network policy
    changed = runner.invoke(app, unguarded + ["--allow-network", "10.0.0.0/8"])
    assert changed.exit_code == 2 and "different config" in changed.output and "allow_networks" in changed.output
    bad = runner.invoke(app, unguarded + ["--allow-network", "127.0.0.1/8"])
    assert bad.exit_code == 2 and "127.0.0.1/8" in bad.output
    result = runner.invoke(app, args + ["--retry-failed"])
    assert result.exit_code == 0, result.output
    after = _ledger_by_caption(out)
    assert set(after) == set(by_caption)  # still every input row exactly once
    assert after["flaky_503"]["state"] == KEPT and after["flaky_503"]["key"].startswith("00002")
    for name in ("stalls_beyond_timeout", "trickles_forever", "trickles_headers", "connection_reset"):
        assert after[name]["state"] == FAILED and after[name]["key"].startswith("00002")
    assert {n: r for n, r in after.items() if n not in SLOW} == {n: r for n, r in by_caption.items() if n not in SLOW}
    for name in ("not_found_404.img", "good_after_slow.img", "decompression_bomb.img"):
        assert server.hits[name] == hits[name]  # permanent failures and kept rows are not re-queued
    final = json.loads((out / "_stats.json").read_text())
    assert final["kept"] == stats["kept"] + 1 and final["retry_shards"] == 1 and final["rows_in"] == stats["rows_in"]
    assert "kept" in result.output and "http_404" in result.output


def test_cli_help_and_user_errors(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, ["download", "--help"]).output
    for opt in ("--input", "--output", "--image-size", "--resize-mode", "--processes", "--threads", "--retry-failed",
                "--allow-network"):
        assert opt in help_text
    missing = runner.invoke(app, ["download", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "no input parquet files" in missing.output
    bad = runner.invoke(app, ["download", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--resize-mode", "stretch"])
    assert bad.exit_code == 2 and "resize_mode must be one of" in bad.output


def test_download_from_and_to_s3(server, s3, tmp_path, monkeypatch):
    """Input and output on S3 (moto, found through AWS_ENDPOINT_URL): img2dataset writes to local
    staging, each verified shard is uploaded, then its ledger, then its marker; readers find the
    shards through the completion record, and nothing stays on the local disk."""
    from core import atomic, rundir, storage

    monkeypatch.chdir(tmp_path)  # a relative path anywhere would land here
    names = ["good_jpeg", "not_found_404", "good_png"]
    atomic.write_parquet(f"{s3}/in/a.parquet", pa.table({
        "URL": [_url(server, n, FAST[n][0]) for n in names], "TEXT": names, "aesthetic": [5.5] * 3}))
    stats = dl.run(dl.DownloadConfig(**CFG), f"{s3}/in", f"{s3}/out")
    out = storage.path(f"{s3}/out")
    assert (stats["kept"], stats["failed"], stats["parts"]) == (2, 1, ["00000.tar"])
    assert json.loads((out / "_done" / "00000.json").read_text())["files"] == ["00000.tar", "00000.parquet", "00000_stats.json"]
    assert imageshard.list_shards(out) == [out / "00000.tar"] and rundir.check_finished(out)["complete"]
    samples = list(imageshard.iter_shard(out / "00000.tar"))  # streamed from S3
    assert sorted(s.caption for s in samples) == ["good_jpeg", "good_png"] and all(s.image for s in samples)
    assert sorted(p.suffix for p in (out / "_logs").iterdir()) == [".json", ".log"]
    ledger = pq.read_table(pa.BufferReader((out / "_ledger" / "00000.parquet").read_bytes()))
    assert ledger.column("state").to_pylist() == ["kept", "failed", "kept"]
    assert list(tmp_path.iterdir()) == [] and not any(dl.staging_root(dl.DownloadConfig(), rundir.RunDir(out, "download", "")).iterdir())
