"""img2dataset, wrapped: our limits in its workers, our shard numbering in its reader.

`run(spec)` calls `img2dataset.download(...)` (the public Python API) after swapping the
classes it builds by name in `img2dataset.main` (and its speed-printing logger process for
`QuietLogger`):

  * `PlannedReader` yields exactly the shards of our plan, with *our* shard ids (sample keys
    embed the shard id, so retry shards numbered after the existing ones get unique keys);
  * `LimitedResizer` reads the image header first (limits before decode, see
    `curate.download.limits`) and normalises the layouts OpenCV gets wrong;
  * `LimitedDownloader` swaps img2dataset's urllib fetch for ours while a shard runs
    (`curate.download.fetch`: http(s) only, the network guard, one deadline per URL, the
    byte cap), retrying only transient failures.

The classes live in this importable module, so img2dataset's spawn workers and Ray workers
unpickle them by reference and get the same behaviour. Call `run` only from a process that
is safe to spawn from (`curate.download.worker` is that process).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
from typing import Any, Iterator

import pyarrow as pa
from img2dataset.downloader import Downloader, is_disallowed
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from PIL import Image

from core import laion, storage
from curate.download.plan import SOURCE_COLUMNS, ShardEntry

from core.image import needs_normalize, normalize
from curate.download.addresses import AddressPolicy
from curate.download.deadline import Deadline
from curate.download.errors import classify, is_transient
from curate.download.fetch import Client
from curate.download.limits import LimitError, Limits, check_header, probe

# The modules, not the names `img2dataset/__init__` re-exports (`main` there is a function).
i2d_main = importlib.import_module("img2dataset.main")
i2d_downloader = importlib.import_module("img2dataset.downloader")



def download_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives, limits: Limits,
                        policy: AddressPolicy):
    """img2dataset's `download_image_with_retry` contract -> (key, BytesIO | None, error | None),
    through the guarded, capped fetch (curate.download.fetch). One deadline covers the URL,
    its retries included; only transient failures are retried (a 404 or a refusal is not)."""
    key, url = row
    robots = None
    if disallowed_header_directives:
        robots = functools.partial(is_disallowed, user_agent_token=user_agent_token,
                                   disallowed_header_directives=disallowed_header_directives)
    client = Client(timeout, user_agent_token, limits, policy, robots)
    deadline = Deadline(limits.max_seconds)
    err = None
    for _ in range(retries + 1):
        try:
            return key, io.BytesIO(client.get(url, deadline)), None
        except LimitError as exc:
            return key, None, str(exc)
        except Exception as exc:  # noqa: BLE001  (the network raises many kinds; all become a reason)
            err = str(exc) or type(exc).__name__
            if not is_transient(classify("failed_to_download", err)) or deadline.expired():
                break
    return key, None, err


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


class LimitedDownloader(Downloader):
    """img2dataset's Downloader with the capped fetch installed while a shard runs."""

    def __init__(self, *args: Any, limits: Limits, policy: AddressPolicy, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.policy = policy

    def download_shard(self, row):  # noqa: D401  (img2dataset's signature)
        apply_process_limits(self.limits)
        fetcher = functools.partial(download_with_retry, limits=self.limits, policy=self.policy)
        with _patched(i2d_downloader, "download_image_with_retry", fetcher):
            return super().download_shard(row)


class LimitedResizer(Resizer):
    """img2dataset's Resizer behind a header check: over-limit images never reach a decoder."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        try:
            header = probe(data)
            check_header(header, self.limits)
            if needs_normalize(header):
                img_stream = io.BytesIO(normalize(data))
        except LimitError as exc:
            return None, None, None, None, None, str(exc)
        except Exception as exc:  # noqa: BLE001  (PIL raises many kinds on corrupt data)
            return None, None, None, None, None, f"Image decoding error: {exc}"
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


def apply_process_limits(limits: Limits) -> None:
    """Bound every decoder of this process: PIL's bomb check and OpenCV's pixel limit."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(limits.max_pixels)


def read_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a parquet file (local or on an object store), reading only the
    row groups that hold them."""
    with storage.parquet_file(path) as pf:
        parts, offset = [], 0
        for i in range(pf.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                group = pf.read_row_group(i, columns=columns)
                parts.append(group.slice(max(0, start - offset), min(stop, offset + n) - max(start, offset)))
            offset += n
        if not parts:
            return pf.schema_arrow.empty_table().select(columns)
    return pa.concat_tables(parts)


class PlannedReader(Reader):
    """Yields our planned shards `(shard_id, feather)` instead of img2dataset's own split.

    Each entry is a `curate.download.plan.ShardEntry`: rows [start, stop) of a parquet file;
    entries of retry shards point at a file that already has SOURCE_COLUMNS."""

    def __init__(self, *args: Any, plan: list[ShardEntry], columns: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.columns = columns  # {"url", "caption", "extra": [...], "compute_hash": bool}

    def __iter__(self):
        for entry in self.plan:
            yield entry.id, self._write_feather(entry)

    def _write_feather(self, entry: ShardEntry) -> str:
        table = self._load(entry)
        rename = {self.columns["url"]: "url", self.columns["caption"]: "caption"}
        table = table.rename_columns([rename.get(c, c) for c in table.column_names]).select(self.column_list)
        path = f"{self.tmp_path}/{entry.id}.feather"
        with self.fs.open(path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        return path

    def _load(self, entry: ShardEntry) -> pa.Table:
        url, caption = self.columns["url"], self.columns["caption"]
        extra = [c for c in self.columns["extra"] if c not in SOURCE_COLUMNS]
        wanted = [url, caption] + [c for c in extra if not (c == "hash" and self.columns["compute_hash"])]
        if entry.is_retry:  # retry inputs carry everything, hash and provenance included
            return read_rows(entry.file, entry.start, entry.stop, [url, caption, *extra, *SOURCE_COLUMNS])
        table = read_rows(entry.file, entry.start, entry.stop, wanted)
        if self.columns["compute_hash"] and "hash" in extra:
            table = table.append_column("hash", laion.hash64(table.column(url), table.column(caption)))
        n = table.num_rows
        table = table.append_column("source_file", pa.array([entry.source] * n, pa.string()))
        table = table.append_column("source_row", pa.array(range(entry.start, entry.start + n), pa.int64()))
        return table.append_column("source_shard", pa.array([entry.id] * n, pa.int64()))


class QuietLogger:
    """Stands in for img2dataset's LoggerProcess, a spawned process that re-imports all of
    img2dataset (~5 s of CPU per call) only to print speed tables; `curate.download` shows
    its own progress and verifies every shard's `_stats.json` itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def run(spec: dict[str, Any]) -> None:
    """Run img2dataset on `spec` (curate.download.spec): plan, columns, limits, network, kwargs."""
    limits = Limits(**spec["limits"])
    apply_process_limits(limits)
    i2d_main.Resizer = functools.partial(LimitedResizer, limits=limits)
    policy = AddressPolicy.from_cidrs(spec["network"]["allow_networks"])
    i2d_main.Downloader = functools.partial(LimitedDownloader, limits=limits, policy=policy)
    plan = [ShardEntry(**{**e, "retry_of": tuple(e["retry_of"])}) for e in spec["plan"]]
    i2d_main.Reader = functools.partial(PlannedReader, plan=plan, columns=spec["columns"])
    i2d_main.LoggerProcess = QuietLogger
    if spec["i2d"].get("distributor") == "ray":
        from core.ray_util import init_ray

        init_ray(spec.get("ray_address"))
    i2d_main.download(**spec["i2d"])
