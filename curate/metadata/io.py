"""Reading LAION-style metadata inputs: listing, validation, column resolution, duckdb helpers.

Every metadata step (dedup, filter, captions) validates *all* of its inputs here before it
writes anything, so a bad file stops the run with a message naming the file and column
instead of leaving a half-written output folder.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import laion
from core.errors import UserError
from core.laion import AESTHETIC_NAMES


class MetadataError(UserError):
    """An input problem the user can fix (missing column, unreadable file, no files)."""


@dataclass(frozen=True)
class InputFile:
    """One validated input parquet file."""

    path: str  # absolute path; with the row index it identifies a row in the ledger
    rows: int  # row count from the parquet footer
    size: int  # bytes on disk (part of the input fingerprint)
    columns: tuple[str, ...]  # column names as stored

    def column(self, name: str) -> str | None:
        """The stored name of `name`, matched case-insensitively as duckdb does; None if absent."""
        lower = name.lower()
        return next((c for c in self.columns if c.lower() == lower), None)

    @property
    def aesthetic(self) -> str | None:
        """The stored name of the aesthetic score column, if any (core.laion.stored_name)."""
        return laion.stored_name(self.columns, "aesthetic")


def _is_data_name(name: str) -> bool:
    # Bookkeeping (`_ledger`, `_tmp.*`, `_SUCCESS`) and hidden files are not data, as in Spark/Hive.
    return not name.startswith(("_", "."))


def list_inputs(spec: str | os.PathLike) -> list[Path]:
    """Parquet files of a file, a folder (recursively, skipping `_`/`.` names) or a glob,
    sorted by path so every run and worker sees the same order."""
    spec = str(spec)
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in globlib.glob(spec, recursive=True)]
        files = [p for p in paths if p.is_file() and _is_data_name(p.name)]
    elif Path(spec).is_dir():
        files = [p for p in _walk(Path(spec)) if p.suffix == ".parquet"]
    elif Path(spec).is_file():
        files = [Path(spec)]
    else:
        raise MetadataError(f"input not found: {spec}")
    if not files:
        raise MetadataError(f"no parquet files in {spec} (names starting with '_' or '.' are skipped)")
    return sorted(p.resolve() for p in files)


def _walk(folder: Path) -> Iterable[Path]:
    for entry in sorted(folder.iterdir()):
        if not _is_data_name(entry.name):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def inspect(path: Path) -> InputFile:
    """Read one file's footer; an unreadable or empty-bytes file raises MetadataError naming it."""
    size = path.stat().st_size
    if size == 0:
        raise MetadataError(f"{path}: empty file (0 bytes), not a parquet file; remove it or regenerate it")
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise MetadataError(f"{path}: unreadable parquet file ({exc})") from exc
    return InputFile(str(path), meta.num_rows, size, tuple(meta.schema.to_arrow_schema().names))


def load_inputs(spec: str | os.PathLike, required: Iterable[str] = ()) -> list[InputFile]:
    """List, inspect and check every input file before any work starts."""
    files = [inspect(p) for p in list_inputs(spec)]
    for f in files:
        require(f, required)
    return files


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


def sql_str(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def sql_list(items: Iterable[str]) -> str:
    """A SQL list literal of strings."""
    return "[" + ", ".join(sql_str(i) for i in items) + "]"


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def scan(f: InputFile, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """A duckdb relation over one file: the aesthetic column renamed to `aesthetic` and the
    row index in the file as `file_row_number` (with the path, the row's ledger identity).
    With `con`, a file without `hash` gets LAION's hash computed (registered on `con`)."""
    rename = ""
    if f.aesthetic and f.aesthetic != "aesthetic" and f.column("aesthetic") is None:
        rename = f" RENAME ({ident(f.aesthetic)} AS aesthetic)"
    base = f"read_parquet({sql_str(f.path)}, file_row_number=true)"
    if con is not None and f.column("hash") is None:
        base = _register_with_hash(f, con)
    return f"(SELECT *{rename} FROM {base})"


def _register_with_hash(f: InputFile, con: duckdb.DuckDBPyConnection) -> str:
    try:
        table = pq.read_table(f.path)
    except (pa.ArrowException, OSError) as exc:
        raise MetadataError(f"{f.path}: unreadable parquet file ({exc})") from exc
    table = table.append_column("hash", laion.hash64(table[f.column("URL")], table[f.column("TEXT")]))
    table = table.append_column("file_row_number", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    name = "src_" + hashlib.sha1(f.path.encode()).hexdigest()[:12]
    con.register(name, table)
    return name


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


# Whitespace around URLs (spaces, tabs, newlines) is a scraping artefact, not identity.
URL_WHITESPACE = " \t\n\r\x0b\x0c"


def trim_sql(expr: str) -> str:
    """`expr` without surrounding URL_WHITESPACE (duckdb's plain trim removes spaces only)."""
    return f"trim({expr}, {sql_str(URL_WHITESPACE)})"


def blank_sql(expr: str) -> str:
    """`trim_sql(expr) = ''` without trimming most rows: only a string that starts with one of
    URL_WHITESPACE can be blank (trimming every row cost ~0.35 us/row, this ~0.03)."""
    codes = ", ".join(str(ord(c)) for c in URL_WHITESPACE)
    return (f"(CASE WHEN {expr} = '' THEN true WHEN ascii({expr}) NOT IN ({codes}) THEN false "
            f"ELSE {trim_sql(expr)} = '' END)")


# The `failed` reasons of rows no step can use, as invalid_reason_sql writes them.
INVALID_REASONS = ("null URL", "empty URL", "null TEXT")


def invalid_reason_sql(f: InputFile) -> str:
    """SQL for the `failed` reason of rows no step can use (null/blank URL or null TEXT)."""
    url, text = ident(f.column("URL") or "URL"), ident(f.column("TEXT") or "TEXT")
    null_url, empty_url, null_text = (sql_str(r) for r in INVALID_REASONS)
    return (
        f"CASE WHEN {url} IS NULL THEN {null_url} "
        f"WHEN {blank_sql(url)} THEN {empty_url} "
        f"WHEN {text} IS NULL THEN {null_text} END"
    )


def ledger_key_sql(f: InputFile, columns: list[tuple[str, str]]) -> tuple[str, str]:
    """(SQL, duckdb type) of a row's ledger `key` in a step over inputs with unified `columns`:
    its LAION `hash` as typed there when the inputs have one (NULL in a file that lacks it),
    else its URL. One type for all of a step's parts, so its ledger reads as one table."""
    types = {c.lower(): t for c, t in columns}
    if "hash" in types:
        return (ident(f.column("hash")) if f.column("hash") else "NULL"), types["hash"]
    return (ident(f.column("URL")) if f.column("URL") else "NULL"), "VARCHAR"


def num_sql(col: str) -> str:
    """A score column with NaN mapped to NULL (duckdb sorts NaN above every number)."""
    c = ident(col)
    return f"(CASE WHEN isnan({c}::DOUBLE) THEN NULL ELSE {c}::DOUBLE END)"


def unified_columns(files: list[InputFile], con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(name, duckdb type) of the union of all inputs' columns (after the aesthetic rename),
    with duckdb's common supertypes; an output written with these columns is uniform."""
    union = " UNION ALL BY NAME ".join(f"SELECT * EXCLUDE (file_row_number) FROM {scan(f)}" for f in files)
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {union}").fetchall()]


def relation_columns(con: duckdb.DuckDBPyConnection, relation: str) -> set[str]:
    """Lower-cased column names of a SQL relation (duckdb matches names case-insensitively)."""
    return {r[0].lower() for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}


def project_sql(have: set[str], columns: list[tuple[str, str]]) -> str:
    """SELECT list casting a relation with (lower-cased) columns `have` onto `columns`;
    absent ones become typed NULLs, so every output part has the same schema."""
    parts = []
    for name, typ in columns:
        expr = f"{ident(name)}::{typ}" if name.lower() in have else f"NULL::{typ}"
        parts.append(f"{expr} AS {ident(name)}")
    return ", ".join(parts)
