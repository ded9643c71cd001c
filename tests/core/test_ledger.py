"""core.ledger: schema, parts, counts, reconciliation, the printed table."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from rich.console import Console

from core import ledger


def _records():
    return [
        {"row": 0, "key": 11, "state": "kept"},
        {"row": 1, "key": 12, "state": "filtered", "reason": "aesthetic", "value": 3.2},
        {"row": 2, "key": 13, "state": "duplicate", "reason": "url", "ref": 11},
        {"row": 3, "key": None, "state": "failed", "reason": "null URL"},
    ]


def test_rows_build_the_schema():
    t = ledger.rows("filter", "/in/a.parquet", _records())
    assert t.schema == ledger.LEDGER_SCHEMA
    r = t.to_pylist()
    assert r[1] == {"step": "filter", "source": "/in/a.parquet", "row": 1, "key": "12", "state": "filtered",
                    "reason": "aesthetic", "value": "3.2", "ref": None}
    assert r[2]["ref"] == "11" and r[3]["key"] is None


def test_conform_fills_optional_and_rejects_bad():
    t = pa.table({"step": ["s"], "source": ["f"], "row": pa.array([0], pa.int32()), "state": ["kept"]})
    out = ledger.conform(t)
    assert out.schema == ledger.LEDGER_SCHEMA and out.column("reason").null_count == 1
    with pytest.raises(ValueError, match="lacks required column 'state'"):
        ledger.conform(pa.table({"step": ["s"], "source": ["f"], "row": [0]}))
    with pytest.raises(ValueError, match="ledger states must be one of"):
        ledger.conform(pa.table({"step": ["s"], "source": ["f"], "row": [0], "state": ["dropped"]}))


def test_write_counts_and_stats(tmp_path):
    assert ledger.counts(tmp_path) == {"kept": 0, "filtered": 0, "duplicate": 0, "failed": 0}
    ledger.write(tmp_path, "part-0", ledger.rows("s", "a", _records()))
    ledger.write(tmp_path, "part-1", ledger.rows("s", "b", _records()[:1]))
    (tmp_path / "_ledger" / "_tmp.x.parquet").write_bytes(b"half-written")  # readers skip temp names
    counts = ledger.counts(tmp_path)
    assert counts == {"kept": 2, "filtered": 1, "duplicate": 1, "failed": 1}
    stats = ledger.write_stats(tmp_path, "s", 5, counts, extra=1)
    assert json.loads((tmp_path / "_stats.json").read_text()) == stats
    assert stats["rows_in"] == 5 and stats["extra"] == 1
    with pytest.raises(ledger.LedgerMismatchError, match="6 rows in but the ledger accounts for 5"):
        ledger.write_stats(tmp_path, "s", 6, counts)


def test_print_counts():
    console = Console(record=True, width=100)
    ledger.print_counts({"step": "dedup", "rows_in": 4, "kept": 3, "duplicate": 1}, console)
    text = console.export_text()
    assert "dedup: 4 rows in" in text and "75.00%" in text and "25.00%" in text
