"""`curate captions`: merge a long-caption table (ShareGPT4V, PixelProse, Recap-DataComp
style) into the metadata as `long_caption`, by the partitioned join of `curate join`
(curate.metadata.partjoin): both sides hash-partitioned by the normalised key, so a caption
table of a billion rows is joined with bounded memory per task.

The caption table's rows are read in bounded batches: text normalised (Unicode NFC, every run
of whitespace -> one space, trimmed); captions with fewer than `min_words` words are not used
(counted as `too_short`). Keys with several different captions are resolved deterministically:
the longest caption wins, then the lexicographically smallest (counted as `one_to_many_keys`;
the row's ledger entry says `ambiguous`). Every input row is `kept` (rows in = rows out);
unmatched rows keep the `long_caption` they had, or null (ledger reason `unmatched`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from core import storage
from core.config import execution
from curate.metadata import exec as mx
from curate.metadata import io as mio
from curate.metadata import partjoin
from curate.steps import Step

# join_on -> (metadata column, SQL normalising a key expression `{}` the same way on both sides).
JOINS: dict[str, tuple[str, str]] = {
    "url": ("URL", mio.trim_sql("{}::VARCHAR")),
    "hash": ("hash", "TRY_CAST({} AS BIGINT)::VARCHAR"),
    "sha256": ("sha256", "lower(trim({}::VARCHAR))"),
    "key": ("key", "trim({}::VARCHAR)"),
}
# Caption columns looked for when `caption_column` is empty (ShareGPT4V/Recap/PixelProse names).
CAPTION_NAMES = ("long_caption", "caption", "re_caption", "vlm_caption", "text")


@dataclass
class CaptionsConfig:
    captions: str = ""  # the caption table: a parquet file, folder, glob or s3:// / gs:// URI (required)
    join_on: str = "url"  # url | hash | sha256 | key: the metadata column to match
    captions_key: str = ""  # the caption table's key column; "" = the same name as join_on
    caption_column: str = ""  # the caption table's text column; "" = first of CAPTION_NAMES present
    min_words: int = 50  # captions with fewer words (after normalisation) are not used
    partitions: int = 0  # hash partitions; 0 = ceil((rows + caption rows) / rows_per_partition)
    rows_per_partition: int = 2_000_000  # sizes partitions when `partitions` is 0 (one task joins one)
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task
    allow_incomplete: bool = execution(False)  # read an unfinished upstream step's folder as it is

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("captions: the path of the caption table is required (--captions)")
        if self.join_on not in JOINS:
            raise ValueError(f"join_on must be one of {', '.join(JOINS)}, got {self.join_on!r}")
        if self.min_words < 0 or self.threads < 1:
            raise ValueError("min_words must be >= 0 and threads >= 1")
        if self.partitions < 0 or self.rows_per_partition < 1:
            raise ValueError("partitions must be >= 0 and rows_per_partition >= 1")


def normalise(texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """(normalised text, word count): Unicode NFC, every run of (Unicode) whitespace -> one
    space, trimmed. Clean ASCII text (the bulk of English caption dumps) only needs the trim,
    so the costly NFC and split/join run on the other rows alone (3x faster on such dumps)."""
    text = pc.utf8_trim_whitespace(texts)
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    messy = pc.fill_null(pc.or_(pc.invert(pc.string_is_ascii(text)),
                                pc.match_substring_regex(text, r"\s\s|[\t\n\r\x0b\x0c\x1c-\x1f]")), False)
    if pc.any(messy).as_py():
        subset = pc.utf8_normalize(text.filter(messy), "NFC")
        subset = pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(subset)), " ")
        text = pc.replace_with_mask(text, messy, subset)
    words = pc.if_else(pc.equal(text, ""), 0, pc.add(pc.count_substring(text, " "), 1))
    return text, words.cast(pa.int64())


def caption_columns(cfg: CaptionsConfig, f: mio.InputFile) -> tuple[str, str]:
    """(key column, caption column) of a caption file; MetadataError naming what is missing."""
    key = cfg.captions_key or cfg.join_on
    text = cfg.caption_column or next((n for n in CAPTION_NAMES if f.column(n)), CAPTION_NAMES[0])
    mio.require(f, [key, text])
    t = f.type_of(text)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or str(t) == "string_view"):
        raise mio.MetadataError(f"{f.path}: caption column {f.column(text)!r} is {t}, not text; name the text "
                                f"column with --caption-column")
    return f.column(key), f.column(text)


def table_rows(cfg: CaptionsConfig, con: Any, f: mio.InputFile, j: int, safe: bool) -> partjoin.TableRows:
    """One caption file's usable rows: normalised key and caption, captions of at least
    `min_words` words with a key (the others counted), batch by batch."""
    key, text = caption_columns(cfg, f)
    scan = mio.Scan(f, con, columns=[key, text], safe=True)  # every caption checked for UTF-8
    counts = {"too_short": 0}
    schema = pa.schema([("_key", mio.plain_type(f.schema.field(key).type)), ("long_caption", pa.string()),
                        ("_trow", pa.int64())])

    def rows() -> Iterator[pa.RecordBatch]:
        for batch in scan.batches():
            caption, words = normalise(batch.column(text).cast(pa.string()))
            usable = pc.and_(pc.is_valid(batch.column(key)), pc.is_valid(caption))
            long_enough = pc.greater_equal(words, cfg.min_words)
            counts["too_short"] += pc.sum(pc.and_(usable, pc.invert(long_enough))).as_py() or 0
            keep = pc.fill_null(pc.and_(usable, long_enough), False)
            cols = [batch.column(key), caption, batch.column("file_row_number")]
            yield pa.RecordBatch.from_arrays([c.filter(keep) for c in cols], schema=schema)

    name = "captions_" + mx.attempt()
    con.register(name, pa.RecordBatchReader.from_batches(schema, rows()))
    norm = JOINS[cfg.join_on][1].format("_key")
    sql = f"SELECT {norm} AS _jk, long_caption, {j}::INTEGER AS _tsrc, _trow FROM {name}"
    return partjoin.TableRows(sql, lambda: dict(counts))


def run(cfg: CaptionsConfig, inp: str, out: str) -> dict[str, Any]:
    """Merge long captions into every parquet file of `inp`, written to `out`; returns the stats."""
    meta_key, norm = JOINS[cfg.join_on]
    files = mio.load_inputs(inp, [] if meta_key == "hash" else [meta_key], cfg.allow_incomplete)
    caps = mio.load_inputs(cfg.captions)
    for f in caps:
        caption_columns(cfg, f)  # validate every caption file before writing anything
    con = mio.connect()
    meta_columns = mio.unified_columns(files, con)
    if meta_key == "hash" and "hash" not in {c.lower() for c, _ in meta_columns}:
        meta_columns.append(("hash", "BIGINT"))  # computed for files that lack it (LAION's definition)
    has_caption = any(c.lower() == "long_caption" for c, _ in meta_columns)
    parts = partjoin.partitions(sum(f.rows for f in files) + sum(f.rows for f in caps), cfg.rows_per_partition,
                                cfg.partitions)
    merge = partjoin.Merge(
        step="captions", key_norm=norm, key_type="VARCHAR", meta_key=meta_key,
        table_rows=functools.partial(table_rows, cfg), values=(("long_caption", "VARCHAR"),),
        meta_columns=tuple(meta_columns), clash=(("long_caption", "replace"),) if has_caption else (),
        order="length(long_caption) DESC, long_caption ASC", distinct="long_caption",
        threads=cfg.threads, memory=cfg.memory)
    out_path = storage.path(out)
    rd = mx.open_run(out_path, "captions", cfg, inp, files, (str(cfg.captions),), captions=mio.fingerprint(caps), partitions=parts)
    tmaps, infos = partjoin.run(rd, merge, files, caps, parts, "captions")
    t = partjoin.totals(tmaps, "rows", "used", "too_short")
    j = partjoin.totals(infos, "matched", "table_keys", "table_duplicate_keys")
    rows = sum(f.rows for f in files)
    rate = j["matched"] / rows if rows else 0.0
    Console(soft_wrap=True).print(f"captions: {j['matched']:,} of {rows:,} rows matched a long caption ({100 * rate:.1f}%), "
                                  f"{j['table_duplicate_keys']:,} keys had several candidate captions (longest kept)")
    return mx.finish(out_path, "captions", files, infos, matched=j["matched"], match_rate=round(rate, 6),
                     caption_rows=t["rows"], too_short=t["too_short"], keys=j["table_keys"],
                     one_to_many_keys=j["table_duplicate_keys"], partitions=parts)


STEP = Step("captions", CaptionsConfig, run)
