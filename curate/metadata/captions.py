"""`curate captions`: left-join a long-caption table (ShareGPT4V, PixelProse, Recap-DataComp
style) onto the metadata as `long_caption`.

1. One Ray task resolves the caption table once: text normalised (Unicode NFC, every run of
   whitespace -> one space, trimmed), captions with fewer than `min_words` words dropped,
   and keys with several candidates resolved deterministically: the longest caption wins,
   then the lexicographically smallest. Written to OUT/_work/captions.parquet.
2. One Ray task per input file left-joins it, keeping the file's row order. Every input row
   is `kept` (rows in = rows out); unmatched rows keep the `long_caption` they had (or null).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console

from curate.metadata import exec as mx
from curate.metadata import io as mio
from core.config import execution
from core.units import Resources, Unit, run_units
from curate.steps import Step

# join_on -> (metadata column, SQL normalising a key expression `{}` the same way on both sides).
JOINS: dict[str, tuple[str, str]] = {
    "url": ("URL", mio.trim_sql("{}")),
    "hash": ("hash", "TRY_CAST({} AS BIGINT)::VARCHAR"),
    "sha256": ("sha256", "lower(trim({}))"),
    "key": ("key", "trim({}::VARCHAR)"),
}
# Caption columns looked for when `caption_column` is empty (ShareGPT4V/Recap/PixelProse names).
CAPTION_NAMES = ("long_caption", "caption", "re_caption", "vlm_caption", "text")


@dataclass
class CaptionsConfig:
    captions: str = ""  # the caption table: a parquet file, folder or glob (required)
    join_on: str = "url"  # url | hash | sha256 | key: the metadata column to match
    captions_key: str = ""  # the caption table's key column; "" = the same name as join_on
    caption_column: str = ""  # the caption table's text column; "" = first of CAPTION_NAMES present
    min_words: int = 50  # captions with fewer words (after normalisation) are not used
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("captions: the path of the caption table is required (--captions)")
        if self.join_on not in JOINS:
            raise ValueError(f"join_on must be one of {', '.join(JOINS)}, got {self.join_on!r}")
        if self.min_words < 0 or self.threads < 1:
            raise ValueError("min_words must be >= 0 and threads >= 1")


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
    return f.column(key), f.column(text)


def candidates(cfg: CaptionsConfig, f: mio.InputFile) -> pa.Table:
    """One caption file as (_k, c, w): normalised key, normalised caption, word count."""
    key, text = caption_columns(cfg, f)
    try:
        t = pq.read_table(f.path, columns=[key, text])
    except (pa.ArrowException, OSError) as exc:
        raise mio.MetadataError(f"{f.path}: unreadable parquet file ({exc})") from exc
    caption, words = normalise(t[text].cast(pa.string()))
    return pa.table({"_key": t[key], "c": caption, "w": words})


def _resolve(cfg: CaptionsConfig, caps: list[mio.InputFile], work: Path) -> dict[str, Any]:
    """Task 1: the caption table, normalised, filtered, one caption per key."""
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    con.execute("CREATE TEMP TABLE cand (_k VARCHAR, c VARCHAR, w BIGINT)")
    norm_key = JOINS[cfg.join_on][1].format("_key")
    for f in caps:  # one file at a time: memory stays at one file's captions
        con.register("part", candidates(cfg, f))
        con.execute(f"INSERT INTO cand SELECT {norm_key}, c, w FROM part WHERE _key IS NOT NULL AND c IS NOT NULL")
        con.unregister("part")
    mx.copy_to(con, f"SELECT _k, c AS long_caption FROM cand WHERE w >= {cfg.min_words} AND _k IS NOT NULL "
               "QUALIFY row_number() OVER (PARTITION BY _k ORDER BY length(c) DESC, c ASC) = 1", work / "captions.parquet")
    total, short, keys, multi = con.execute(
        f"SELECT (SELECT count(*) FROM cand), (SELECT count(*) FROM cand WHERE w < {cfg.min_words}), "
        f"count(*), count(*) FILTER (WHERE n > 1) FROM (SELECT _k, count(DISTINCT c) AS n FROM cand "
        f"WHERE w >= {cfg.min_words} AND _k IS NOT NULL GROUP BY _k)").fetchone()
    con.close()
    return {"caption_rows": int(total), "too_short": int(short), "keys": int(keys), "one_to_many_keys": int(multi)}


def _join_file(f: mio.InputFile, idx: int, cfg: CaptionsConfig, columns: list[tuple[str, str]],
               work: Path, out: Path) -> dict[str, Any]:
    """Task 2: left join one metadata file, row order kept; ledger: every row kept."""
    con = mio.connect(cfg.threads, cfg.memory, str(work / "_duckdb"))
    src = mio.scan(f)
    have = mio.relation_columns(con, src)
    base = [(c, t) for c, t in columns if c.lower() != "long_caption"]
    old = "s.long_caption" if "long_caption" in have else "NULL::VARCHAR"
    key = JOINS[cfg.join_on][1].format("s." + mio.ident(f.column(JOINS[cfg.join_on][0])))
    con.execute(f"CREATE TEMP VIEW s AS SELECT * FROM {src}")
    joined = (f"SELECT {mio.project_sql(have, base)}, coalesce(c.long_caption, {old}) AS long_caption, "
              f"c.long_caption IS NOT NULL AS _matched, s.file_row_number AS _row FROM s "
              f"LEFT JOIN read_parquet({mio.sql_str(str(work / 'captions.parquet'))}) c ON c._k = {key}")
    con.execute(f"CREATE TEMP TABLE j AS {joined}")
    cols = ", ".join(mio.ident(c) for c, _ in base + [("long_caption", "VARCHAR")])
    mx.copy_to(con, f"SELECT {cols} FROM j ORDER BY _row", out / f"part-{idx:05d}.parquet")
    key, key_type = mio.ledger_key_sql(f, base)
    select = mx.ledger_select("captions", mio.sql_str(f.path), "_row", key, "'kept'", key_type=key_type, sources=[f.path])
    mx.write_ledger(con, f"SELECT {select} FROM j", out, f"part-{idx:05d}")
    matched = con.execute("SELECT count(*) FILTER (WHERE _matched) FROM j").fetchone()[0]
    con.close()
    return {"rows": f.rows, "matched": int(matched)}


def run(cfg: CaptionsConfig, inp: str, out: str) -> dict[str, Any]:
    """Merge long captions into every parquet file of `inp`, written to `out`; returns the stats."""
    files = mio.load_inputs(inp, [JOINS[cfg.join_on][0]])
    caps = mio.load_inputs(cfg.captions)
    for f in caps:
        caption_columns(cfg, f)  # validate every caption file before writing anything
    columns = mio.unified_columns(files, mio.connect())
    out_path = Path(out)
    rd = mx.open_run(out_path, "captions", cfg, inp, files, captions=mio.fingerprint(caps))
    mx.clean_temp_dirs(out_path / "_work")
    work = out_path / "_work"
    res = Resources(cpus=cfg.threads)
    (table,) = run_units(rd, [Unit("captions-table", (cfg, caps, work))], _resolve, "captions: resolve table", res)
    units = [Unit(f"part-{i:05d}", (f, i, cfg, columns, work, out_path)) for i, f in enumerate(files)]
    infos = run_units(rd, units, _join_file, "captions: join", res)
    matched, rows = sum(i["matched"] for i in infos), sum(f.rows for f in files)
    rate = matched / rows if rows else 0.0
    Console(soft_wrap=True).print(f"captions: {matched:,} of {rows:,} rows matched a long caption ({100 * rate:.1f}%), "
                    f"{table['one_to_many_keys']:,} keys had several candidate captions (longest kept)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the resolved table is consumed; markers stay
    table_stats = {k: table[k] for k in ("caption_rows", "too_short", "keys", "one_to_many_keys")}
    return mx.finish(out_path, "captions", files, matched=matched, match_rate=round(rate, 6), **table_stats)


STEP = Step("captions", CaptionsConfig, run)
