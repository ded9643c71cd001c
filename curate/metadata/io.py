"""Reading LAION-style metadata inputs: listing, validation, column resolution, duckdb helpers.

Inputs and outputs may be local paths, `file://`, `s3://` or `gs://` (core.storage). Every
metadata step (dedup, filter, captions, join) checks *all* of its inputs' footers here before it
writes anything, so a bad file (unreadable, a required column missing, two columns of one name)
stops the run with a message naming the file instead of leaving a half-written output folder.
A step's output folder is read by its completion record (`_stats.json` names its parts), never
by listing it. Rows that no step can use are `failed` rows in the ledger, with the reason
(`invalid_reason_sql`): a bad row is a row, not a crash.

A task reads one input file through `Scan`: duckdb's own parquet reader for a local file (the
fast path), or pyarrow in bounded batches registered on the connection for a file on an object
store, a file whose LAION `hash` must be computed, or a file in which duckdb met invalid UTF-8
(then every text value is checked and repaired batch by batch, see `safe_retry`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import laion, rundir, storage
from core.errors import UserError
from core.laion import AESTHETIC_NAMES
from core.storage import AnyPath

T = TypeVar("T")


class MetadataError(UserError):
    """An input problem the user can fix (missing column, unreadable file, no files)."""


@dataclass(frozen=True)
class InputFile:
    """One validated input parquet file."""

    path: str  # absolute local path or URI (s3://...); with the row index it identifies a row in the ledger
    rows: int  # row count from the parquet footer
    size: int  # bytes stored (part of the input fingerprint)
    schema: pa.Schema  # columns as stored (dictionary types as their values)
    ranges: tuple[tuple[str, float, float], ...] = ()  # (column, min, max) of numeric columns, from footer statistics

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    def column(self, name: str) -> str | None:
        """The stored name of `name`, matched case-insensitively as duckdb does; None if absent."""
        lower = name.lower()
        return next((c for c in self.columns if c.lower() == lower), None)

    def stored(self, name: str) -> str | None:
        """The stored name of column `name`, `aesthetic` also as AESTHETIC_SCORE; None if absent."""
        return self.aesthetic if name == "aesthetic" else self.column(name)

    def type_of(self, name: str) -> pa.DataType | None:
        stored = self.stored(name)
        return None if stored is None else self.schema.field(stored).type

    @property
    def aesthetic(self) -> str | None:
        """The stored name of the aesthetic score column, if any (core.laion.stored_name)."""
        return laion.stored_name(self.columns, "aesthetic")

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.path)


# ---------------------------------------------------------------- finding and checking inputs


def list_inputs(spec: str | os.PathLike, allow_incomplete: bool = False) -> list[AnyPath]:
    """Parquet files of a file, a folder (recursively, skipping `_`/`.` names) or a glob,
    sorted by path so every run and worker sees the same order. A step's output folder gives
    the parts its completion record names (an unfinished one is refused unless
    `allow_incomplete`: then the parts its task markers name)."""
    record = None if any(ch in str(spec) for ch in "*?[") else rundir.check_finished(spec, allow_incomplete)
    if record is not None:
        return _recorded_parts(storage.path(spec), record["complete"])
    try:
        files = storage.expand(spec, ".parquet")
    except FileNotFoundError:
        raise MetadataError(f"input not found: {spec}") from None
    if not files:
        raise MetadataError(f"no parquet files in {spec} (names starting with '_' or '.' are skipped)")
    return files


def _recorded_parts(folder: AnyPath, complete: bool) -> list[AnyPath]:
    """The data parts a step's output folder names: in its `_stats.json` (finished), else in
    its task markers (data = a top-level .parquet file a marker names)."""
    if complete:
        stats = rundir.read_stats(folder)
        if "parts" in stats:
            return rundir.require_present(folder, [folder / name for name in stats["parts"]])
        return sorted(storage.expand(folder, ".parquet"), key=str)  # a folder of an older format: its files
    names = {n for info in _marker_infos(folder) for n in info.get("files", ()) if "/" not in n and n.endswith(".parquet")}
    return rundir.require_present(folder, [folder / n for n in sorted(names)])


def _marker_infos(folder: AnyPath) -> list[dict[str, Any]]:
    found = (rundir.read_marker(p) for p in sorted((folder / rundir.DONE).glob("*.json"), key=str))
    return [m for m in found if m is not None]


def plain_type(t: pa.DataType) -> pa.DataType:
    """The type a reader gives back: a dictionary type as its values' type, float16 as float32
    (duckdb reads a parquet Float16 column as FLOAT and has no Arrow half-float); others as they are."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.float32() if pa.types.is_float16(t) else t


def _remedy(path: AnyPath) -> str:
    """What to do about a damaged input file: a step's part is redone by rerunning that step
    (its marker recorded the part's size); any other file is the user's to replace."""
    step = rundir.folder_step(path.parent)
    if step is None:
        return "remove it or regenerate it"
    return f"rerun the `{step}` command that wrote {path.parent}, with the same arguments, to redo it"


def inspect(path: AnyPath) -> InputFile:
    """Read one file's footer; an unreadable or empty file, or two columns of one name (duckdb
    matches names case-insensitively), raises MetadataError naming it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MetadataError(f"{path}: file not found") from None
    if size == 0:
        raise MetadataError(f"{path}: empty file (0 bytes), not a parquet file; {_remedy(path)}")
    fs, key = storage.arrow_fs(path)
    try:
        meta = pq.read_metadata(key, filesystem=fs)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        raise MetadataError(f"{path}: unreadable parquet file ({exc}); {_remedy(path)}") from exc
    seen: dict[str, str] = {}
    for name in schema.names:
        if name.lower() in seen:
            raise MetadataError(f"{path}: two columns named {seen[name.lower()]!r} and {name!r} (names match "
                                "case-insensitively); rename one and rewrite the file")
        seen[name.lower()] = name
    schema = pa.schema([f.with_type(plain_type(f.type)) for f in schema])
    return InputFile(str(path), meta.num_rows, size, schema, footer_ranges(meta, schema))


def footer_ranges(meta: pq.FileMetaData, schema: pa.Schema) -> tuple[tuple[str, float, float], ...]:
    """(column, min, max) of each top-level numeric column whose every row group has min/max
    statistics (NaN is never in them; infinite bounds are left out). No row is read."""
    out = []
    for j in range(meta.num_columns):
        name = meta.schema.column(j).path
        if "." in name or name not in schema.names or not _is_number_type(schema.field(name).type):
            continue
        lo, hi = [], []
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(j).statistics
            if meta.row_group(g).num_rows == 0:
                continue
            if st is None or not st.has_min_max:
                break
            lo.append(_stat_number(st.min))
            hi.append(_stat_number(st.max))
        else:
            lo, hi = [x for x in lo if np.isfinite(x)], [x for x in hi if np.isfinite(x)]
            if lo and hi:
                out.append((name, min(lo), max(hi)))
    return tuple(out)


def _stat_number(value: Any) -> float:
    """A min/max statistic as a float. pyarrow gives a float16 column's as its 2 raw bytes
    (FIXED_LEN_BYTE_ARRAY, logical type Float16), little-endian."""
    if isinstance(value, bytes) and len(value) == 2:
        return float(np.frombuffer(value, "<f2")[0])
    return float(value)


def load_inputs(spec: str | os.PathLike, required: Iterable[str] = (), allow_incomplete: bool = False) -> list[InputFile]:
    """List, inspect and check every input file before any work starts (footers read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list_inputs(spec, allow_incomplete)
    with ThreadPoolExecutor(16) as pool:
        files = list(pool.map(inspect, paths))
    for f in files:
        require(f, required)
        _check_hash_type(f)
        _check_internal_names(f)
    return files


# Names the metadata steps' SQL gives its own columns (duckdb's `file_row_number`, aliases such
# as `_row`, `_key`); tests/curate/metadata/test_io.py keeps the list true against the sources.
# An input column of one of these names was ambiguous or overwritten mid-run (an incomplete step).
INTERNAL_COLUMNS = frozenset({
    "file_row_number", "_a", "_b", "_bad", "_h", "_invalid", "_jfail", "_jk", "_jmatched", "_jn", "_jp",
    "_jrow", "_jsrc", "_keep", "_key", "_pos", "_reason", "_ref", "_rn", "_row", "_s", "_src",
    "_trow", "_tsrc", "_value",
})


def _check_internal_names(f: InputFile) -> None:
    clash = sorted(c for c in f.columns if c.lower() in INTERNAL_COLUMNS)
    if clash:
        raise MetadataError(f"{f.path}: column {clash[0]!r} has a name the curate steps use for their own "
                            f"columns (also reserved: {', '.join(sorted(INTERNAL_COLUMNS - {clash[0].lower()}))}); "
                            f"rename it and rewrite the file")


def _check_hash_type(f: InputFile) -> None:
    """LAION's `hash` is a 64-bit integer: as a float, hashes above 2**53 collide and NaN would
    be one key. pandas writes an int64 column with nulls as float64, so this is met in practice."""
    t = f.type_of("hash")
    if t is not None and pa.types.is_floating(t):
        raise MetadataError(f"{f.path}: column {f.column('hash')!r} is {t}: a 64-bit hash does not fit a float "
                            f"exactly (pandas writes an int64 column with nulls as float64); write it as int64 "
                            f"(pandas: .astype('Int64'))")


def require(f: InputFile, names: Iterable[str]) -> None:
    """Raise MetadataError naming the file and the first missing column (`aesthetic`
    is satisfied by either of AESTHETIC_NAMES)."""
    for name in names:
        found = f.aesthetic if name == "aesthetic" else f.column(name)
        if found is None:
            alts = " or ".join(AESTHETIC_NAMES) if name == "aesthetic" else repr(name)
            raise MetadataError(
                f"{f.path}: required column {alts} is missing (columns: {', '.join(f.columns)})"
            )


def fingerprint(files: list[InputFile]) -> dict[str, Any]:
    """What identifies the input set in a run folder's config: count, rows and a digest of
    (path, size) pairs. A rerun over changed inputs is then refused, not silently mixed."""
    digest = hashlib.sha256("\n".join(f"{f.path}\t{f.size}" for f in files).encode()).hexdigest()
    return {"files": len(files), "rows": sum(f.rows for f in files), "digest": digest[:16]}


# ---------------------------------------------------------------- SQL helpers


def sql_str(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_list(items: Iterable[str]) -> str:
    """A SQL list literal of strings."""
    return "[" + ", ".join(sql_str(i) for i in items) + "]"


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def connect(threads: int = 1, memory: str = "1GB", temp_dir: str | None = None) -> duckdb.DuckDBPyConnection:
    """A duckdb connection sized for one Ray task (threads = the task's CPUs)."""
    con = duckdb.connect()
    con.execute(f"SET threads={int(threads)}")
    con.execute(f"SET memory_limit={sql_str(memory)}")
    # duckdb 2.0.1 folds isnan(col) to false from parquet min/max statistics, which exclude
    # NaN (pyarrow's writer): NaN scores would pass filters and win dedup. Keep it off.
    con.execute("SET disabled_optimizers = 'statistics_propagation'")
    if temp_dir:
        con.execute(f"SET temp_directory={sql_str(temp_dir)}")
    return con


@contextlib.contextmanager
def task_connection(threads: int = 1, memory: str = "1GB") -> Iterator[duckdb.DuckDBPyConnection]:
    """A task's duckdb connection, spilling to task-local scratch (never to the output folder,
    which may be an object store), removed with the connection."""
    with tempfile.TemporaryDirectory(prefix="tessera-duckdb-") as scratch:
        con = connect(threads, memory, scratch)
        try:
            yield con
        finally:
            con.close()


def is_text_type(t: pa.DataType | None) -> bool:
    return t is not None and (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _is_number_type(t: pa.DataType | None) -> bool:
    return t is not None and (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


# ---------------------------------------------------------------- reading one file


BATCH_ROWS = 65_536  # rows per batch of the pyarrow path: bounds a task's working copy


class Scan:
    """One input file as a duckdb relation: its columns (the aesthetic score as `aesthetic`),
    `file_row_number` (the row's index in the file), `_invalid` (`invalid UTF-8 in URL|TEXT`,
    else NULL) and, with `with_hash`, LAION's `hash` computed where the file has none.

    Call it for the SQL of the relation, once per statement: on the pyarrow path each call
    registers a fresh stream (a stream is read once). `columns` (stored names) limits what the
    pyarrow path reads (duckdb's own reader pushes projections down itself). The pyarrow path
    (forced by `safe`) checks every text value (one vectorised pass per batch): invalid UTF-8 in
    URL or TEXT makes the row `failed` (`_invalid`); in any other column the bad bytes are
    replaced (U+FFFD) and counted in `repaired`."""

    def __init__(self, f: InputFile, con: duckdb.DuckDBPyConnection, columns: Sequence[str] | None = None,
                 with_hash: bool = False, safe: bool = False) -> None:
        self.f, self.con, self.safe = f, con, safe
        self.compute_hash = with_hash and f.column("hash") is None
        self.columns = list(dict.fromkeys(columns if columns is not None else f.columns))
        self._repaired: list[int] = []  # per stream: text values repaired (a file read twice counts once)
        rename = ""
        if f.aesthetic and f.aesthetic != "aesthetic" and f.column("aesthetic") is None and f.aesthetic in self.columns:
            rename = f" RENAME ({ident(f.aesthetic)} AS aesthetic)"
        self._select = f"SELECT *{rename} FROM "

    @property
    def repaired(self) -> int:
        """Text values (not URL or TEXT) whose invalid UTF-8 was replaced, in one read of the file."""
        return max(self._repaired, default=0)

    @property
    def fast(self) -> bool:
        return not (self.f.remote or self.compute_hash or self.safe)

    def __call__(self) -> str:
        if self.fast:
            base = f"(SELECT *, NULL::VARCHAR AS _invalid FROM read_parquet({sql_str(self.f.path)}, file_row_number=true))"
        else:
            base = "src_" + uuid.uuid4().hex[:12]
            self.con.register(base, self._reader())
        return f"({self._select}{base})"

    def _reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, self.batches())

    @property
    def schema(self) -> pa.Schema:
        """The schema of `batches()`: the columns, file_row_number, _invalid (and a computed hash)."""
        fields = [pa.field(c, plain_type(self.f.schema.field(c).type)) for c in self.columns]
        extra = [pa.field("file_row_number", pa.int64()), pa.field("_invalid", pa.string())]
        return pa.schema(fields + extra + ([pa.field("hash", pa.int64())] if self.compute_hash else []))

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The file's rows read by pyarrow in bounded batches (the pyarrow path, whatever the
        file), for a task that transforms them in Python before duckdb sees them."""
        f = self.f
        read = list(self.columns)
        if self.compute_hash:
            read += [c for c in (f.column("URL"), f.column("TEXT")) if c and c not in read]
        return self._batches(read, self.schema)

    def _batches(self, read: list[str], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        fs, key = storage.arrow_fs(storage.path(self.f.path))
        offset, stream = 0, len(self._repaired)
        self._repaired.append(0)
        try:
            with fs.open_input_file(key) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=read, use_threads=False):
                    yield self._convert(batch, offset, schema, stream)
                    offset += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise MetadataError(f"{self.f.path}: unreadable parquet data near row {offset} ({exc})") from exc

    def _convert(self, batch: pa.RecordBatch, offset: int, schema: pa.Schema, stream: int) -> pa.RecordBatch:
        cols = {name: _decoded(batch.column(name)) for name in batch.schema.names}
        invalid = pa.nulls(batch.num_rows, pa.string())
        for name in list(cols):  # duckdb must never see invalid UTF-8 (seen: garbage rows from a stream)
            fixed, bad = repair_utf8(cols[name])
            if bad is None:
                continue
            cols[name] = fixed
            if name in (self.f.column("URL"), self.f.column("TEXT")):
                reason = pa.array(np.where(bad, f"invalid UTF-8 in {name.upper()}", None), pa.string())
                invalid = pc.coalesce(invalid, reason)
            else:
                self._repaired[stream] += int(bad.sum())
        out = [cols[c] for c in self.columns]
        out += [pa.array(np.arange(offset, offset + batch.num_rows, dtype=np.int64)), invalid]
        if self.compute_hash:
            url, text = (batch.column(c) if c else pa.nulls(batch.num_rows, pa.string())
                         for c in (self.f.column("URL"), self.f.column("TEXT")))
            out.append(laion.hash64(_as_bytes(url), _as_bytes(text)))  # LAION hashes the bytes as stored
        return pa.RecordBatch.from_arrays(out, schema=schema)


def _decoded(a: pa.Array) -> pa.Array:
    return a.dictionary_decode() if pa.types.is_dictionary(a.type) else a


def _as_bytes(a: pa.Array) -> pa.Array:
    """A column's values as bytes for hashing: text and binary as stored (no UTF-8 check),
    other types as their text."""
    a = _decoded(a)
    if pa.types.is_string(a.type):
        return a.view(pa.binary())
    if pa.types.is_large_string(a.type):
        return a.view(pa.large_binary())
    if pa.types.is_binary(a.type) or pa.types.is_large_binary(a.type):
        return a
    return a.cast(pa.string()).view(pa.binary())


def repair_utf8(a: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """(a with invalid UTF-8 replaced by U+FFFD, mask of the rows that had some), or (a, None)
    when `a` is not text or is valid (one vectorised check; rows decoded only in a bad batch)."""
    if not is_text_type(a.type):
        return a, None
    try:
        a.validate(full=True)
        return a, None
    except pa.ArrowInvalid:
        pass
    raw = a.view(pa.large_binary() if pa.types.is_large_string(a.type) else pa.binary()).to_pylist()
    bad = np.zeros(len(raw), bool)
    texts = []
    for i, b in enumerate(raw):
        if b is None:
            texts.append(None)
            continue
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            texts.append(b.decode("utf-8", errors="replace"))
    return pa.array(texts, a.type), bad


def is_encoding_error(exc: BaseException) -> bool:
    """duckdb refused a text value that is not valid UTF-8 (in a parquet file or an Arrow stream)."""
    text = str(exc)
    return isinstance(exc, duckdb.Error) and ("UTF8" in text or "UTF-8" in text or "Invalid unicode" in text)


def safe_retry(body: Callable[[bool], T]) -> T:
    """Run `body(safe=False)` (duckdb's fast reader); if duckdb meets invalid UTF-8 in an
    input, run it again with `safe=True` (every text value checked and repaired by pyarrow).
    `body` writes through temp names, so a second run replaces nothing half-written."""
    try:
        return body(False)
    except duckdb.Error as exc:
        if not is_encoding_error(exc):
            raise
    return body(True)


# ---------------------------------------------------------------- rows no step can use

# Whitespace around URLs (spaces, tabs, newlines) is a scraping artefact, not identity.
URL_WHITESPACE = " \t\n\r\x0b\x0c"
MAX_URL_BYTES = 4096  # longer "URLs" are not URLs (no browser or server takes them)
MAX_TEXT_BYTES = 65_536  # a caption is words, not a page: longer ones are scraping accidents
CONTROL = "[\\x00-\\x1f\\x7f]"  # RE2 class of ASCII control characters


def trim_sql(expr: str) -> str:
    """`expr` without surrounding URL_WHITESPACE (duckdb's plain trim removes spaces only)."""
    return f"trim({expr}, {sql_str(URL_WHITESPACE)})"


def blank_sql(expr: str) -> str:
    """`trim_sql(expr) = ''` without trimming most rows: only a string that starts with one of
    URL_WHITESPACE can be blank (trimming every row cost ~0.35 us/row, this ~0.03)."""
    codes = ", ".join(str(ord(c)) for c in URL_WHITESPACE)
    return (f"(CASE WHEN {expr} = '' THEN true WHEN ascii({expr}) NOT IN ({codes}) THEN false "
            f"ELSE {trim_sql(expr)} = '' END)")


def control_sql(expr: str) -> str:
    """True when `expr` holds an ASCII control character other than surrounding whitespace
    (a newline inside a URL is not a URL; one after it is trimmed). Most rows pay one regex."""
    return (f"(CASE WHEN regexp_matches({expr}, {sql_str(CONTROL)}) "
            f"THEN regexp_matches({trim_sql(expr)}, {sql_str(CONTROL)}) ELSE false END)")


NO_TEXT = "(NULL::VARCHAR)"  # a text column that is missing or of another type


def text_sql(f: InputFile, name: str) -> str:
    """A text column of `f` as SQL, or a typed NULL when it is missing or not text (its rows
    are `failed` as `<name> is not text`, see invalid_reason_sql)."""
    return ident(f.column(name)) if is_text_type(f.type_of(name)) else NO_TEXT


def number_sql(f: InputFile, name: str, double: bool = True) -> str:
    """A score column of `f` as a number: numbers as DOUBLE (or as stored, `double=False`, so
    a float32 value prints as written), text parsed (NULL if it is not a number), any other type
    NULL. Non-finite values stay (see finite_sql)."""
    t = f.type_of(name)
    col = ident("aesthetic" if name == "aesthetic" else (f.stored(name) or name))
    if _is_number_type(t):
        return f"{col}::DOUBLE" if double or pa.types.is_integer(t) or pa.types.is_decimal(t) else col
    if is_text_type(t):
        return f"TRY_CAST({col} AS DOUBLE)"
    return "NULL::DOUBLE"


def finite_sql(f: InputFile, name: str) -> str:
    """A score as DOUBLE with NULL for missing, NaN, +inf and -inf: a score that is not a real
    number never wins dedup and never passes a filter (duckdb sorts NaN above every number)."""
    n = number_sql(f, name)
    return f"(CASE WHEN isfinite({n}) THEN {n} END)"


def not_number_reasons(f: InputFile, numbers: Iterable[str]) -> list[tuple[str, str]]:
    """(SQL condition, reason) for score columns stored with a type that is not a number:
    a value that does not read as a number makes the row `failed` (`<column> is not a number`).
    Blank text ("", spaces: what a CSV export writes for an empty cell) is missing, as null and
    "NaN" are, not failed."""
    out = []
    for name in numbers:
        t, stored = f.type_of(name), f.stored(name)
        if stored is None or _is_number_type(t):
            continue
        col = ident("aesthetic" if name == "aesthetic" else stored)
        cond = (f"{col} IS NOT NULL AND trim({col}) <> '' AND TRY_CAST({col} AS DOUBLE) IS NULL" if is_text_type(t)
                else f"{col} IS NOT NULL")
        out.append((cond, f"{name} is not a number"))
    return out


def invalid_reasons(numbers: Iterable[str] = ()) -> list[str]:
    """Every `failed` reason invalid_reason_sql can write (for ledger ENUMs), in its order."""
    return ["invalid UTF-8 in URL", "invalid UTF-8 in TEXT", "URL is not text", "TEXT is not text", "null URL",
            "empty URL", f"URL over {MAX_URL_BYTES} bytes", "control character in URL", "null TEXT",
            f"TEXT over {MAX_TEXT_BYTES} bytes", *(f"{n} is not a number" for n in numbers)]


# The `failed` reasons of the commonest bad rows (also in invalid_reasons).
INVALID_REASONS = ("null URL", "empty URL", "null TEXT")


def invalid_reason_sql(f: InputFile, numbers: Iterable[str] = ()) -> str:
    """SQL for why a row of `f` is unusable (the first of invalid_reasons that applies), else
    NULL. `numbers`: the score columns the step reads."""
    url, text = text_sql(f, "URL"), text_sql(f, "TEXT")
    whens = ["WHEN _invalid IS NOT NULL THEN _invalid"]
    for name, expr in (("URL", url), ("TEXT", text)):
        if f.column(name) is not None and expr == NO_TEXT:
            whens.append(f"WHEN true THEN {sql_str(f'{name} is not text')}")
    whens += [
        f"WHEN {url} IS NULL THEN 'null URL'",
        f"WHEN {blank_sql(url)} THEN 'empty URL'",
        f"WHEN strlen({url}) > {MAX_URL_BYTES} THEN {sql_str(f'URL over {MAX_URL_BYTES} bytes')}",
        f"WHEN {control_sql(url)} THEN 'control character in URL'",
        f"WHEN {text} IS NULL THEN 'null TEXT'",
        f"WHEN strlen({text}) > {MAX_TEXT_BYTES} THEN {sql_str(f'TEXT over {MAX_TEXT_BYTES} bytes')}",
    ]
    whens += [f"WHEN {cond} THEN {sql_str(reason)}" for cond, reason in not_number_reasons(f, numbers)]
    return f"(CASE {' '.join(whens)} END)"


def ledger_key_sql(f: InputFile, columns: list[tuple[str, str]]) -> tuple[str, str]:
    """(SQL, duckdb type) of a row's ledger `key` in a step over inputs with unified `columns`:
    its LAION `hash` as typed there when the inputs have one (NULL in a file that lacks it),
    else its URL. One type for all of a step's parts, so its ledger reads as one table."""
    types = {c.lower(): t for c, t in columns}
    if "hash" in types:
        return (ident(f.column("hash") or "hash") if f.column("hash") else "NULL"), types["hash"]
    return text_sql(f, "URL"), "VARCHAR"


# ---------------------------------------------------------------- columns


def unified_columns(files: list[InputFile], con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(name, duckdb type) of the union of all inputs' columns (after the aesthetic rename),
    with duckdb's common supertypes; an output written with these columns is uniform. From the
    footers' schemas: no file is read."""
    selects = []
    for i, f in enumerate(files):
        schema = f.schema
        if f.aesthetic and f.aesthetic != "aesthetic" and f.column("aesthetic") is None:
            schema = schema.set(schema.get_field_index(f.aesthetic), schema.field(f.aesthetic).with_name("aesthetic"))
        name = f"_schema_{i}_{uuid.uuid4().hex[:8]}"
        con.register(name, schema.empty_table())
        selects.append(f"SELECT * FROM {name}")
    cols = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {' UNION ALL BY NAME '.join(selects)}").fetchall()]
    for sel in selects:
        con.unregister(sel.split()[-1])
    return cols


def relation_columns(con: duckdb.DuckDBPyConnection, relation: str) -> set[str]:
    """Lower-cased column names of a SQL relation (duckdb matches names case-insensitively)."""
    return {r[0].lower() for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}


def file_columns(f: InputFile) -> set[str]:
    """Lower-cased column names of `f` as a Scan shows them (aesthetic renamed)."""
    names = {c.lower() for c in f.columns}
    if f.aesthetic:
        names.add("aesthetic")
    return names


def project_sql(have: set[str], columns: list[tuple[str, str]]) -> str:
    """SELECT list casting a relation with (lower-cased) columns `have` onto `columns`;
    absent ones become typed NULLs, so every output part has the same schema."""
    parts = []
    for name, typ in columns:
        expr = f"{ident(name)}::{typ}" if name.lower() in have else f"NULL::{typ}"
        parts.append(f"{expr} AS {ident(name)}")
    return ", ".join(parts)
