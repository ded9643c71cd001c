"""`curate filter`: keep rows whose scores pass thresholds (Meissonic: aesthetic >= 4.5 and
pwatermark <= 0.5), one duckdb Ray task per input file.

Rules run in the fixed order of RULES; a dropped row records the *first* rule it fails and the
offending value. A rule's missing or NaN input drops the row as `missing:<column>` (fail
closed: an unscored image is not a good image). Null/blank URL or null TEXT rows are `failed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from curate.metadata import exec as mx
from curate.metadata import io as mio
from core.config import execution
from core.units import Resources, Unit, run_units
from curate.steps import Fusable, Step


@dataclass(frozen=True)
class Rule:
    columns: tuple[str, ...]  # input columns (a null/NaN one drops the row as missing:<column>)
    value: str  # SQL of the tested value
    op: str  # the row is dropped when `value op threshold`


# Rule name (= config field = ledger reason) -> rule, in evaluation order.
RULES: dict[str, Rule] = {
    "aesthetic": Rule(("aesthetic",), "aesthetic", "<"),
    "watermark": Rule(("pwatermark",), "pwatermark", ">"),
    "punsafe": Rule(("punsafe",), "punsafe", ">"),
    "min_side": Rule(("WIDTH", "HEIGHT"), "least(WIDTH, HEIGHT)", "<"),
    "max_aspect": Rule(("WIDTH", "HEIGHT"),
                       "CASE WHEN least(WIDTH, HEIGHT) > 0 THEN greatest(WIDTH, HEIGHT) / least(WIDTH, HEIGHT) "
                       "ELSE 'inf'::DOUBLE END", ">"),
    "similarity": Rule(("similarity",), "similarity", "<"),
    "min_words": Rule(("TEXT",), "CASE WHEN trim(TEXT) = '' THEN 0 "
                      "ELSE len(regexp_split_to_array(trim(TEXT), '\\s+')) END", "<"),
}


@dataclass
class FilterConfig:
    aesthetic: float = 4.5  # keep aesthetic (or AESTHETIC_SCORE) >= this; LAION's scale is 1-10
    watermark: float = 0.5  # keep pwatermark <= this (probability of a watermark)
    punsafe: float | None = None  # keep punsafe <= this (probability of NSFW); None = off
    min_side: int | None = None  # keep min(WIDTH, HEIGHT) >= this many pixels; None = off
    max_aspect: float | None = None  # keep max(W,H)/min(W,H) <= this; None = off
    similarity: float | None = None  # keep CLIP image-text similarity >= this; None = off
    min_words: int | None = None  # keep captions (TEXT) of >= this many words; None = off
    threads: int = execution(1)  # duckdb threads and Ray CPUs per task
    memory: str = execution("1GB")  # duckdb memory limit per task

    def __post_init__(self) -> None:
        for name in ("watermark", "punsafe"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a probability threshold in [0, 1], got {v}")
        if self.max_aspect is not None and self.max_aspect < 1.0:
            raise ValueError(f"max_aspect is max(W,H)/min(W,H) >= 1, got {self.max_aspect}")
        for name in ("min_side", "min_words"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def active(self) -> dict[str, float]:
        """Enabled rules and their thresholds, in evaluation order."""
        return {name: getattr(self, name) for name in RULES if getattr(self, name) is not None}


def missing_sql(col: str) -> str:
    """True when a rule's input is null, or NaN for a numeric column."""
    c = mio.ident(col)
    return f"({c} IS NULL)" if col == "TEXT" else f"({c} IS NULL OR isnan({c}::DOUBLE))"


def ledger_reasons(rules: dict[str, float]) -> list[str]:
    """Every reason the filter's ledger can hold with these rules, as decision_sql writes them."""
    reasons = list(mio.INVALID_REASONS)
    for name in rules:
        reasons += [f"missing:{col}" for col in RULES[name].columns] + [name]
    return reasons


def decision_sql(rules: dict[str, float]) -> tuple[str, str]:
    """(reason, value) SQL CASE expressions: the first failing rule, else NULL (kept)."""
    reasons, values = [], []
    for name, threshold in rules.items():
        rule = RULES[name]
        for col in rule.columns:
            reasons.append(f"WHEN {missing_sql(col)} THEN 'missing:{col}'")
            values.append(f"WHEN {missing_sql(col)} THEN NULL")
        fails = f"({rule.value}) {rule.op} {float(threshold)!r}"
        reasons.append(f"WHEN {fails} THEN '{name}'")
        values.append(f"WHEN {fails} THEN ({rule.value})::VARCHAR")
    if not reasons:
        return "NULL::VARCHAR", "NULL::VARCHAR"
    return f"CASE {' '.join(reasons)} END", f"CASE {' '.join(values)} END"


def required_columns(cfg: FilterConfig) -> list[str]:
    return ["URL", "TEXT"] + [c for name in cfg.active() for c in RULES[name].columns]


def _filter_file(f: mio.InputFile, idx: int, cfg: FilterConfig, columns: list[tuple[str, str]],
                 out: Path) -> dict[str, Any]:
    """One task: filter one input file (one read) into OUT/part-<idx>.parquet and its ledger."""
    con = mio.connect(cfg.threads, cfg.memory)
    info = write_part(con, cfg, f, mio.scan(f), columns, out, task_name(idx))
    con.close()
    return info


def task_name(idx: int) -> str:
    """Task (and output part) name of input file number `idx`."""
    return f"part-{idx:05d}"


def write_part(con: Any, cfg: FilterConfig, f: mio.InputFile, src: str, columns: list[tuple[str, str]],
               out: Path, task: str) -> dict[str, Any]:
    """Decide every row of relation `src` (the rows of input `f`, with `file_row_number`): kept
    rows -> OUT/<task>.parquet, every row -> OUT/_ledger/<task>.parquet. Also the kernel dedup
    runs for a fused filter (curate.steps.Fusable). `src` is scanned twice rather than
    materialised: a parquet or in-memory scan costs less than copying every row into a table,
    and the decision is the same deterministic SQL both times."""
    reason, value = decision_sql(cfg.active())
    bad = mio.invalid_reason_sql(f)
    project = mio.project_sql(mio.relation_columns(con, src), columns)
    # No ORDER BY: duckdb keeps insertion order (preserve_insertion_order), i.e. input order.
    mx.copy_to(con, f"SELECT {project} FROM {src} WHERE ({bad}) IS NULL AND ({reason}) IS NULL", out / f"{task}.parquet")
    key, key_type = mio.ledger_key_sql(f, columns)
    decided = f"SELECT file_row_number AS _row, {key} AS _key, {bad} AS _bad, {reason} AS _reason, {value} AS _value FROM {src}"
    state = "CASE WHEN _bad IS NOT NULL THEN 'failed' WHEN _reason IS NOT NULL THEN 'filtered' ELSE 'kept' END"
    select = mx.ledger_select("filter", mio.sql_str(f.path), "_row", "_key", state,
                              "coalesce(_bad, _reason)", "CASE WHEN _bad IS NULL THEN _value END",
                              key_type=key_type, sources=[f.path], reasons=ledger_reasons(cfg.active()))
    mx.write_ledger(con, f"SELECT {select} FROM ({decided})", out, task)
    return {"rows": f.rows}


def observed_ranges(files: list[mio.InputFile], rules: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Rule -> (min, max) of its value over all inputs, NaN ignored (one cheap column scan)."""
    if not rules or not files:
        return {}
    con = mio.connect(threads=2)
    union = " UNION ALL BY NAME ".join(f"SELECT * FROM {mio.scan(f)}" for f in files)
    num = lambda name: f"CASE WHEN isnan(({RULES[name].value})::DOUBLE) OR ({RULES[name].value}) = 'inf'::DOUBLE THEN NULL ELSE ({RULES[name].value})::DOUBLE END"  # noqa: E731
    aggs = ", ".join(f"min({num(n)}), max({num(n)})" for n in rules)
    row = con.execute(f"SELECT {aggs} FROM ({union})").fetchone()
    con.close()
    return {n: (row[2 * i], row[2 * i + 1]) for i, n in enumerate(rules) if row[2 * i] is not None}


def range_warnings(cfg: FilterConfig, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """A message per threshold outside its column's observed range (it keeps all or nothing;
    0.5 on LAION's 1-10 aesthetic scale is the classic mistake)."""
    out = []
    for name, (lo, hi) in ranges.items():
        t = getattr(cfg, name)
        if t < lo or t > hi:
            out.append(f"filter {name}={t} lies outside the observed range [{lo:.4g}, {hi:.4g}] of "
                       f"{'/'.join(RULES[name].columns)}: check the scale of the threshold")
    return out


def run(cfg: FilterConfig, inp: str, out: str, staged: Path | None = None) -> dict[str, Any]:
    """Filter every parquet file of `inp` into `out`; returns the stats. Parts a fused previous
    step already filtered into `staged` are adopted, not recomputed (curate.steps)."""
    files = mio.load_inputs(inp, required_columns(cfg))
    warnings = range_warnings(cfg, observed_ranges(files, cfg.active()))
    console = Console(stderr=True)
    for w in warnings:
        console.print(f"[yellow]warning: {w}[/yellow]", soft_wrap=True, highlight=False)
    columns = mio.unified_columns(files, mio.connect())
    out_path = Path(out)
    rd = mx.open_run(out_path, "filter", cfg, inp, files)
    units = [Unit(task_name(i), (f, i, cfg, columns, out_path)) for i, f in enumerate(files)]
    mx.adopt_staged(rd, {u.name: f.path for u, f in zip(units, files)}, staged)
    run_units(rd, units, _filter_file, "filter", Resources(cpus=cfg.threads))
    mx.clean_staged(out_path)  # adopted (or stale): the ledger and markers are in place
    reasons = _reason_counts(out_path)
    return mx.finish(out_path, "filter", files, rules=cfg.active(), reasons=reasons, warnings=warnings)


def _reason_counts(out: Path) -> dict[str, int]:
    con = mio.connect(threads=2)
    rows = con.execute(
        f"SELECT reason, count(*) FROM read_parquet({mio.sql_str(str(out / '_ledger' / '*.parquet'))}) "
        "WHERE state = 'filtered' GROUP BY reason ORDER BY reason"
    ).fetchall()
    con.close()
    return {r: int(n) for r, n in rows}


STEP = Step("filter", FilterConfig, run, fusable=Fusable(required_columns, write_part, task_name))
