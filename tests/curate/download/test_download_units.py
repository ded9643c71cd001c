"""curate download, the parts that need no img2dataset call: limits, errors, plan, verify, ledger."""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import httpserver as hs  # noqa: E402

from core import atomic, imageshard  # noqa: E402
from core.config import ConfigError, merge  # noqa: E402
from core.rundir import RunDir  # noqa: E402
from curate.download import adopt, spec  # noqa: E402
from curate.download import step as dl  # noqa: E402
from curate.download import ledger as download_ledger  # noqa: E402
from curate.download.plan import ShardEntry, ShardPlan, make_plan  # noqa: E402
from curate.download.watchdog import supervise  # noqa: E402
from curate.download.engine import download_with_retry, read_rows  # noqa: E402
from curate.download.errors import classify, is_transient  # noqa: E402
from core.image import needs_normalize, normalize  # noqa: E402
from curate.download.addresses import AddressPolicy  # noqa: E402
from curate.download.deadline import Deadline  # noqa: E402
from curate.download.fetch import Client, read_capped  # noqa: E402
from curate.download.limits import LimitError, Limits, check_header, probe  # noqa: E402
from curate.download.verify import verify_shard  # noqa: E402

LIMITS = Limits(max_bytes=100_000, max_pixels=1_000_000, max_aspect_ratio=10.0, max_seconds=2.0)
LOOPBACK = AddressPolicy.from_cidrs(["127.0.0.0/8"])  # the test server's network, allowed explicitly


# ---------------------------------------------------------------- error categories


@pytest.mark.parametrize(
    "status,message,category,transient",
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404", False),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503", True),
        ("failed_to_download", "HTTP Error 429: Too Many Requests", "http_429", True),
        ("failed_to_download", "timed out", "timeout", True),
        ("failed_to_download", "<urlopen error timed out>", "timeout", True),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_refused", False),
        ("failed_to_download", "Remote end closed connection without response", "connection_reset", True),
        ("failed_to_download", "[Errno 104] Connection reset by peer", "connection_reset", True),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns", False),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "x_robots_tag", False),
        ("failed_to_download", "too_large:bytes>100", "too_large", False),
        ("failed_to_download", "bad_url: scheme 'file' is not fetched (only http and https)", "bad_url", False),
        ("failed_to_download", "blocked_address: 10.0.0.1 (private)", "blocked_address", False),
        ("failed_to_download", "blocked_address: a.test -> 169.254.169.254 (metadata)", "blocked_address", False),
        ("failed_to_download", "too_many_redirects: more than 10", "too_many_redirects", False),
        ("failed_to_download", "timed out: DNS lookup of a.test not done within the 1 s download deadline", "timeout", True),
        ("failed_to_download", "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", "tls", False),
        ("failed_to_resize", "too_many_pixels:30000x30000>100", "too_many_pixels", False),
        ("failed_to_resize", "aspect_ratio:1x20000>10", "aspect_ratio", False),
        ("failed_to_resize", "Image decoding error", "decode_error", False),
        ("failed_to_resize", "something new", "failed_to_resize", False),
    ],
)
def test_classify(status, message, category, transient):
    assert classify(status, message) == category
    assert is_transient(category) is transient


# ---------------------------------------------------------------- limits before decode


def test_probe_reads_the_header_only_and_limits_refuse():
    t0 = time.perf_counter()
    bomb = probe(hs.png_bomb(30000, 30000))  # 900 M pixels: decoding would take ~1 GB
    assert (bomb.width, bomb.height) == (30000, 30000)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(LimitError, match=r"^too_many_pixels:30000x30000>1000000$"):
        check_header(bomb, LIMITS)
    with pytest.raises(LimitError, match=r"^aspect_ratio:1x20000>10$"):
        check_header(probe(hs.thin_png()), LIMITS)
    check_header(probe(hs.jpeg()), LIMITS)  # a normal image passes
    for data in (b"", hs.HTML_PAGE):
        with pytest.raises(LimitError, match="Image decoding error"):
            probe(data)


def test_normalize_fixes_what_opencv_gets_wrong():
    rotated = probe(hs.exif_rotated_jpeg())
    assert rotated.orientation == 6 and needs_normalize(rotated)
    upright = Image.open(io.BytesIO(normalize(hs.exif_rotated_jpeg())))
    assert upright.size == (60, 120)  # stored 120x60, displayed portrait
    deep = probe(hs.png16())
    assert needs_normalize(deep)
    grey = np.asarray(Image.open(io.BytesIO(normalize(hs.png16()))))
    assert grey.dtype == np.uint8 and grey.min() < 5 and grey.max() > 250 and 120 < grey.mean() < 135
    assert not needs_normalize(probe(hs.jpeg())) and not needs_normalize(probe(hs.cmyk_jpeg()))


def test_read_capped_stops_at_the_cap_and_the_deadline():
    assert read_capped(io.BytesIO(b"x" * 100), 100, Deadline(5)) == b"x" * 100
    with pytest.raises(LimitError, match=r"^too_large:bytes>99$"):
        read_capped(io.BytesIO(b"x" * 100), 99, Deadline(5))
    with pytest.raises(TimeoutError):
        read_capped(io.BytesIO(b"x" * 100), 1000, Deadline(-1))


def test_fetch_caps_trickles_and_names_us():
    client = Client(5, "tessera", LIMITS, LOOPBACK)
    with hs.ImageServer() as s:
        big = s.add("big.jpg", hs.Route(b"x" * 200_000))  # Content-Length over the cap
        trickle = s.add("slow.jpg", hs.Route(hs.jpeg(), trickle=0.2))
        ok = s.add("ok.jpg", hs.Route(hs.jpeg()))
        with pytest.raises(LimitError, match="too_large"):
            client.get(big, Deadline(2))
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            client.get(trickle, Deadline(2))
        assert time.perf_counter() - t0 < 2.5  # the 2 s deadline, not the trickle's ~4 minutes
        assert client.get(ok, Deadline(2)) == hs.jpeg()
        assert all("(compatible; tessera;" in ua for ua in s.user_agents)


def test_download_with_retry_retries_transient_failures_only():
    with hs.ImageServer() as s:
        flaky = s.add("flaky.jpg", hs.Route(hs.jpeg(), fail_first=2))
        busy = s.add("busy.jpg", hs.Route(hs.jpeg(), fail_first=99))
        gone = s.url("gone.jpg")
        blocked = s.add("blocked.jpg", hs.Route(location="http://10.0.0.1/x.jpg"))
        key, stream, err = download_with_retry((0, flaky), 5, 2, "tessera", None, LIMITS, LOOPBACK)
        assert err is None and stream.getvalue() == hs.jpeg() and s.hits["flaky.jpg"] == 3
        _, stream, err = download_with_retry((1, busy), 5, 2, "tessera", None, LIMITS, LOOPBACK)
        assert stream is None and "503" in err and s.hits["busy.jpg"] == 3
        _, stream, err = download_with_retry((2, gone), 5, 2, "tessera", None, LIMITS, LOOPBACK)
        assert "404" in err and s.hits["gone.jpg"] == 1  # permanent: asked once
        _, stream, err = download_with_retry((2, blocked), 5, 2, "tessera", None, LIMITS, LOOPBACK)
        assert classify("failed_to_download", err) == "blocked_address" and s.hits["blocked.jpg"] == 1
        _, stream, err = download_with_retry((2, flaky), 5, 2, "tessera", None, LIMITS, AddressPolicy())
        assert classify("failed_to_download", err) == "blocked_address" and s.hits["flaky.jpg"] == 3  # default: refused
        for empty in (None, " ", "file:///etc/hostname"):  # a null URL is a ledger entry, not a crash
            _, stream, err = download_with_retry((3, empty), 5, 2, "tessera", None, LIMITS, LOOPBACK)
            assert stream is None and classify("failed_to_download", err) == "bad_url"


# ---------------------------------------------------------------- config and plan


def test_config_validation_and_precedence():
    cfg = merge(dl.DownloadConfig, {"image_size": 256, "threads": 8}, {"image_size": 128, "processes": None})
    assert (cfg.image_size, cfg.threads, cfg.processes) == (128, 8, None)
    with pytest.raises(ConfigError, match="unknown key 'imagesize'"):
        merge(dl.DownloadConfig, {"imagesize": 1})
    for bad in ({"resize_mode": "stretch"}, {"max_bytes": 0}, {"max_aspect_ratio": 0.5},
                {"user_agent_token": " "}, {"metadata_columns": ["status"]}, {"retries": -1},
                {"allow_networks": ["127.0.0.1/8"]}, {"allow_networks": ["localhost"]}):
        with pytest.raises(ConfigError):
            merge(dl.DownloadConfig, bad)


def _input(folder: Path, name: str, n: int, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cols = {"URL": [f"http://x/{name}/{i}.jpg" for i in range(n)], "TEXT": [f"c{i}" for i in range(n)], **extra}
    path = folder / name
    pq.write_table(pa.table(cols), path, row_group_size=3)
    return path


def test_plan_cuts_files_into_numbered_shards(tmp_path):
    a, b = _input(tmp_path, "a.parquet", 7), _input(tmp_path, "b.parquet", 3)
    _input(tmp_path, "_skip.parquet", 2)
    files = dl.list_inputs(tmp_path)
    assert files == [a, b]
    plan = make_plan(files, 4)
    assert [(e.id, e.source, e.start, e.stop) for e in plan.shards] == [
        (0, "a.parquet", 0, 4), (1, "a.parquet", 4, 7), (2, "b.parquet", 0, 3)]
    assert plan.key_digits == 1 and plan.digits == 5 and plan.name(2) == "00002"
    plan.save(tmp_path / "_plan.json")
    assert ShardPlan.load(tmp_path / "_plan.json") == plan
    assert read_rows(str(a), 2, 6, ["TEXT"]).column("TEXT").to_pylist() == ["c2", "c3", "c4", "c5"]
    cols = dl.input_columns(dl.DownloadConfig(), files)
    assert cols["extra"] == ["hash"] and cols["compute_hash"]
    with pytest.raises(ConfigError, match="no column 'url'"):
        dl.input_columns(dl.DownloadConfig(url_col="url"), files)
    with pytest.raises(ConfigError, match="no input parquet"):
        dl.list_inputs(tmp_path / "empty")


# ---------------------------------------------------------------- verification and ledger


def _shard(folder: Path, name: str, shard_id: int, outcomes: list[str], source_shard: int | None = None) -> None:
    """A shard as img2dataset writes it: rows with `outcomes` ("success" or an error)."""
    keys = [f"{shard_id}{i}" for i in range(len(outcomes))]
    ok = [o == "success" for o in outcomes]
    samples = [imageshard.Sample(k, hs.jpeg(seed=i), "jpg", f"c{i}", {"sha256": "x", "original_width": 96})
               for i, (k, good) in enumerate(zip(keys, ok)) if good]
    folder.mkdir(parents=True, exist_ok=True)
    imageshard.write_shard(folder / f"{name}.tar", samples)
    table = pa.table({
        "source_row": list(range(len(outcomes))),
        "source_shard": [shard_id if source_shard is None else source_shard] * len(outcomes),
        "key": keys,
        "status": ["success" if g else "failed_to_download" for g in ok],
        "error_message": [None if g else o for o, g in zip(outcomes, ok)],
    })
    pq.write_table(table, folder / f"{name}.parquet")
    atomic.write_json(folder / f"{name}_stats.json", {"count": len(outcomes), "successes": sum(ok)})


def test_verify_shard_accepts_whole_shards_and_names_each_defect(tmp_path):
    _shard(tmp_path, "00000", 0, ["success", "HTTP Error 404: Not Found", "success"])
    assert verify_shard(tmp_path, "00000", 3).ok
    assert "the plan has 4" in " ".join(verify_shard(tmp_path, "00000", 4).problems)
    tar = tmp_path / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:1500])  # cut inside the first sample's image
    problems = " ".join(verify_shard(tmp_path, "00000", 3).problems)
    assert "tar unreadable to the end" in problems and "missing" in problems
    (tmp_path / "00000_stats.json").unlink()
    assert "no _stats.json" in verify_shard(tmp_path, "00000", 3).problems[0]


def test_failed_verification_is_not_promoted_and_stays_pending(tmp_path):
    out = tmp_path / "out"
    rd = RunDir.open(out, "download", {"t": 1})
    plan = ShardPlan(5, 1, [ShardEntry(0, "a.parquet", 0, 2, source="a.parquet")])
    staging = out / "_staging" / "attempt-1"
    _shard(staging, "00000", 0, ["success", "success"])
    (staging / "00000.tar").write_bytes((staging / "00000.tar").read_bytes()[:700])
    check = adopt.adopt(rd, plan, plan.shards[0], staging, caption=True)
    assert not check.ok and not rd.is_done("00000") and not (out / "00000.tar").exists()
    assert adopt.pending(rd, plan) == plan.shards
    _shard(staging, "00000", 0, ["success", "timed out"])  # a good shard is promoted and marked
    assert adopt.adopt(rd, plan, plan.shards[0], staging, caption=True).ok
    assert rd.is_done("00000") and (out / "00000.tar").is_file() and adopt.pending(rd, plan) == []
    with open(out / "00000.tar", "ab") as f:  # a done shard whose file changed later is redone
        f.write(b"junk")
    assert adopt.pending(rd, plan) == plan.shards and not rd.is_done("00000")


def test_a_rerun_adopts_verified_shards_a_killed_attempt_left_in_staging(tmp_path):
    out = tmp_path / "out"
    rd = RunDir.open(out, "download", {"t": 2})
    plan = ShardPlan(5, 1, [ShardEntry(i, "a.parquet", 2 * i, 2 * i + 2, source="a.parquet") for i in range(3)])
    old = out / "_staging" / "killed-attempt"
    _shard(old, "00000", 0, ["success", "success"])  # finished, never adopted
    _shard(old, "00001", 1, ["success", "success"])
    (old / "00001_stats.json").unlink()  # still being written when the run died
    assert adopt.adopt_leftovers(rd, plan, caption=True, root=out / "_staging") == 1
    assert rd.is_done("00000") and not rd.is_done("00001") and not old.exists()
    assert [e.id for e in adopt.pending(rd, plan)] == [1, 2]


def test_ledger_part_takes_the_latest_outcome_exactly_once(tmp_path):
    _shard(tmp_path, "00000", 0, ["success", "timed out", "HTTP Error 404: Not Found"])
    _shard(tmp_path, "00001", 1, ["success"], source_shard=0)
    retry = pq.read_table(tmp_path / "00001.parquet").to_pydict()
    retry["source_row"] = [1]  # the retry shard re-did row 1 of shard 0
    pq.write_table(pa.table(retry), tmp_path / "00001.parquet")
    entry = ShardEntry(0, "a.parquet", 0, 3, source="a.parquet")
    part = download_ledger.build_part(entry, tmp_path / "00000.parquet", [tmp_path / "00001.parquet"]).to_pylist()
    assert [(r["row"], r["key"], r["state"], r["reason"]) for r in part] == [
        (0, "00", "kept", None), (1, "10", "kept", None), (2, "02", "failed", "http_404")]
    assert part[2]["value"] == "failed_to_download: HTTP Error 404: Not Found"
    with pytest.raises(Exception, match="do not match"):
        download_ledger.build_part(ShardEntry(0, "a.parquet", 0, 4, source="a.parquet"), tmp_path / "00000.parquet", [])


def test_ray_distributor_is_chosen_by_the_one_address_rule(monkeypatch, tmp_path):
    import core.ray_util as ru

    cols = {"extra": ["hash"]}
    plan = ShardPlan(5, 1)
    kw = spec.i2d_kwargs(dl.DownloadConfig(), tmp_path, cols, plan, "f.parquet", None)
    assert kw["distributor"] == "multiprocessing" and kw["retries"] > 0 and kw["compute_hash"] == "sha256"
    assert kw["user_agent_token"] == "tessera" and "disallowed_header_directives" not in kw
    assert kw["save_additional_columns"] == ["hash", "source_file", "source_row", "source_shard"]
    assert spec.i2d_kwargs(dl.DownloadConfig(), tmp_path, cols, plan, "f", "10.0.0.1:6379")["distributor"] == "ray"
    monkeypatch.setattr(ru, "_JOINED", [])
    assert spec.distributor_address("auto") is None  # no cluster joined: local processes
    monkeypatch.setattr(ru, "_JOINED", ["10.0.0.1:6379"])  # the command joined a cluster
    entries = [ShardEntry(0, "f", 0, 1, source="f")]
    doc = spec.worker_spec(dl.DownloadConfig(), tmp_path, cols, plan, entries)
    assert doc["ray_address"] == "10.0.0.1:6379" and doc["i2d"]["distributor"] == "ray"
    assert spec.worker_spec(dl.DownloadConfig(distributor="multiprocessing"), tmp_path, cols, plan, entries)["ray_address"] is None
    assert doc["network"] == {"allow_networks": []}  # the guard refuses private ranges unless told
    allowed = dl.DownloadConfig(allow_networks=["127.0.0.0/8", "0::1/128"])
    assert spec.worker_spec(allowed, tmp_path, cols, plan, entries)["network"] == {"allow_networks": ["127.0.0.0/8", "::1/128"]}
    json.dumps(doc)  # the worker reads it back as JSON


def test_a_hung_worker_is_stopped_with_its_children(tmp_path, monkeypatch):
    """A pool that lost a shard waits forever: no file change for stall_seconds stops the group
    (before the first file appears, the longer start-up allowance applies)."""
    import psutil

    from curate.download import watchdog

    pid_file = tmp_path / "child.pid"
    staging = tmp_path / "staging"
    staging.mkdir()
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(1.5)\n"
        f"open({str(staging / '00000.tar')!r}, 'w').write('started')\n"  # a first shard file: progress
        "time.sleep(120)\n"
    )
    monkeypatch.setattr(watchdog, "STARTUP_SECONDS", 4.0)
    t0 = time.perf_counter()
    rc = supervise([sys.executable, "-c", script], {}, tmp_path / "log", staging, lambda: 0, 1, stall_seconds=2)
    assert rc != 0 and time.perf_counter() - t0 < 30
    assert "no progress for 2 s" in (tmp_path / "log").read_text()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_slow_start_is_not_a_stall(tmp_path, monkeypatch):
    from curate.download import watchdog

    staging = tmp_path / "staging"
    staging.mkdir()
    script = f"import time; time.sleep(3); open({str(staging / '00000.tar')!r}, 'w').write('x'); time.sleep(0.5)"
    monkeypatch.setattr(watchdog, "STARTUP_SECONDS", 6.0)
    assert supervise([sys.executable, "-c", script], {}, tmp_path / "log", staging, lambda: 0, 1, stall_seconds=2) == 0


def test_retry_shards_are_joined_from_the_ledger_in_tasks_on_s3(s3):
    """--retry-failed on an object store: each original shard's transient failures are looked up
    by key in its shards' parquets (a unit per original shard), then cut into retry shards as a
    stream; permanent failures and successes are not re-queued."""
    from core import ledger, storage

    rd = RunDir.open(f"{s3}/dl", "download", {"t": 3})
    plan = ShardPlan(5, 1, [ShardEntry(0, "a.parquet", 0, 4, source="a.parquet"),
                            ShardEntry(1, "a.parquet", 4, 7, source="a.parquet")])
    outcomes = {0: ["success", "timed out", "HTTP Error 404: Not Found", "HTTP Error 503: Service Unavailable"],
                1: ["Connection reset by peer", "success", "timed out"]}
    for sid, outs in outcomes.items():
        n = len(outs)
        atomic.write_parquet(rd.path / f"0000{sid}.parquet", pa.table({
            "url": [f"http://x/{sid}/{i}" for i in range(n)], "caption": [f"c{sid}{i}" for i in range(n)],
            "hash": list(range(n)), "source_file": ["a.parquet"] * n,
            "source_row": [plan.shards[sid].start + i for i in range(n)], "source_shard": [sid] * n,
            "key": [f"{sid}{i}" for i in range(n)], "status": ["success" if o == "success" else "failed_to_download" for o in outs],
            "error_message": [None if o == "success" else o for o in outs]}))
        adopt.write_ledger_part(rd, plan, sid, [])  # read back from S3
    columns = {"url": "URL", "caption": "TEXT", "extra": ["hash"]}
    new = dl.plan_retries(rd, dl.DownloadConfig(samples_per_shard=3), columns, plan)
    assert [(e.id, e.rows, e.retry_of) for e in new] == [(2, 3, (0, 1)), (3, 1, (1,))]
    first = storage.read_parquet(rd.path / "_retry" / "00002.parquet")
    assert first.column_names == ["URL", "TEXT", "hash", "source_file", "source_row", "source_shard"]
    assert first["URL"].to_pylist() == ["http://x/0/1", "http://x/0/3", "http://x/1/0"]
    assert storage.read_parquet(rd.path / "_retry" / "00003.parquet")["source_row"].to_pylist() == [6]
    assert ShardPlan.load(rd.path / "_plan.json").shards[2:] == new
    assert not list((rd.path / "_retry" / "_select").glob("*")) and rd.done_tasks() == []
    assert ledger.counts(rd.path)["failed"] == 5


def test_a_bucket_output_on_a_multi_node_ray_distributor_needs_a_shared_staging(monkeypatch, tmp_path):
    import ray

    from core import storage

    rd = RunDir(storage.path("s3://bucket/out"), "download", "h")  # no I/O: only the check
    monkeypatch.setattr(dl, "distributor_address", lambda d: "10.0.0.1:6379")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(ConfigError, match="pass --staging with a folder every node sees"):
        dl.check_staging(dl.DownloadConfig(), rd)
    dl.check_staging(dl.DownloadConfig(staging=str(tmp_path)), rd)  # a shared folder given: fine
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    dl.check_staging(dl.DownloadConfig(), rd)  # one live node: its local staging is the driver's
    assert dl.staging_root(dl.DownloadConfig(), rd).parent.name == "tessera-download"
    assert dl.staging_root(dl.DownloadConfig(), RunDir(tmp_path / "o", "download", "h")) == tmp_path / "o" / "_staging"
