"""curate run: planning (validation before work), generic step lookup, chaining, summary."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest
from rich.console import Console

from core.config import ConfigError
from curate import pipeline, steps
from curate.metadata import synth
from curate.steps import Step
from metadata_data import read_out


def _doc(tmp_path, steps_list, **curate):
    return {"curate": curate, "pipelines": {"p": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "steps": steps_list}}}


@pytest.fixture
def data(tmp_path):
    synth.run(synth.SynthConfig(rows=3000, files=3, seed=5), tmp_path / "in", tmp_path / "caps.parquet")
    return tmp_path


def test_plan_merges_defaults_yaml_and_entry_overrides(tmp_path):
    doc = _doc(tmp_path, ["dedup", {"step": "filter", "aesthetic": 6.0}, "filter"], filter={"aesthetic": 5.0, "watermark": 0.3})
    _, planned = pipeline.plan(doc, "p")
    assert [p.out.name for p in planned] == ["dedup", "filter", "filter-2"]
    assert (planned[1].cfg.aesthetic, planned[1].cfg.watermark) == (6.0, 0.3)  # entry > yaml section
    assert (planned[2].cfg.aesthetic, planned[2].cfg.watermark) == (5.0, 0.3)  # yaml > code default


@pytest.mark.parametrize("steps_list,match", [
    (["dedupe"], r"steps\[0\]: unknown curate step 'dedupe'"),
    ([{"step": "filter", "aesthetics": 5}], r"steps\[0\]: unknown key 'aesthetics' \(allowed: aesthetic, "),
    ([{"name": "filter"}], "a step is a name or a mapping with a `step` key"),
    ([], "at least one entry"),
])
def test_plan_errors(tmp_path, steps_list, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.plan(_doc(tmp_path, steps_list), "p")


def test_unknown_pipeline_lists_defined(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown pipeline 'q' \(defined: p\)"):
        pipeline.plan(_doc(tmp_path, ["dedup"]), "q")


@dataclass
class CountConfig:
    suffix: str = "x"  # a test step's only setting


def _count_run(cfg, inp, out):
    from pathlib import Path
    Path(out).mkdir(parents=True, exist_ok=True)
    n = len(read_out(Path(inp)))
    stats = {"step": "count", "rows_in": n, "kept": n, "filtered": 0, "duplicate": 0, "failed": 0, "suffix": cfg.suffix}
    (Path(out) / "_stats.json").write_text(json.dumps(stats))
    return stats


def test_run_chains_steps_and_knows_nothing_about_them(ray_local, data, monkeypatch):
    module = types.ModuleType("tessera_test_count_step")
    module.STEP = Step("count", CountConfig, _count_run)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(steps.STEP_MODULES, "count", module.__name__)
    doc = _doc(data, ["dedup", "filter", {"step": "captions", "captions": str(data / "caps.parquet")}, {"step": "count", "suffix": "y"}])
    console = Console(record=True, width=200)
    results = pipeline.run(doc, "p", console)
    assert [r["step"] for r in results] == ["dedup", "filter", "captions", "count"]
    for prev, nxt in zip(results, results[1:]):
        assert nxt["rows_in"] == prev["kept"]  # each step reads the previous one's output
    assert results[-1]["suffix"] == "y"
    summary = json.loads((data / "out" / "_summary.json").read_text())
    assert [s["output"] for s in summary["steps"]] == [str(data / "out" / n) for n in ("dedup", "filter", "captions", "count")]
    text = console.export_text()
    assert "pipeline p" in text and f"{results[0]['rows_in']:,}" in text
    again = pipeline.run(doc, "p", Console(record=True))  # a rerun: every task is done
    assert [r["kept"] for r in again] == [r["kept"] for r in results]


def _tree(folder):
    """Every file of a step folder (staged leftovers excluded) -> comparable content."""
    import pyarrow.parquet as pq
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir() or rel.startswith("_staged-") or rel == "_lock":
            continue
        out[rel] = pq.read_table(p) if p.suffix == ".parquet" else p.read_text()
        if rel.startswith("_done/"):  # a task's own timing and place, and its files' sizes (a ledger's row
            # order, so its compressed size, depends on duckdb's threads), are all that may differ
            out[rel] = {k: v for k, v in json.loads(out[rel]).items()
                        if k not in ("task_seconds", "task_cpu_seconds", "node", "bytes")}
        if rel.startswith("_ledger/"):  # a ledger part is a set of rows (order: duckdb threads)
            out[rel] = out[rel].sort_by([("source", "ascending"), ("row", "ascending")])
    return out


def _assert_same_folders(a, b):
    for step in ("dedup", "filter"):
        ta, tb = _tree(a / step), _tree(b / step)
        assert sorted(ta) == sorted(tb), step
        for rel in ta:
            if isinstance(ta[rel], (str, dict)):
                same = ta[rel] == tb[rel]
            else:  # pandas equality: NaN scores in the same places count as equal
                same = ta[rel].schema == tb[rel].schema and ta[rel].to_pandas().equals(tb[rel].to_pandas())
            assert same, f"{step}/{rel} differs"


def _unfused(monkeypatch):
    import dataclasses
    from curate.metadata import dedup
    monkeypatch.setattr(dedup, "STEP", dataclasses.replace(dedup.STEP, fuse_next=None))


def _run_both(data, monkeypatch, doc):
    """Run `doc` unfused into out and move that to ref; returns (unfused stats, ref, out)."""
    out, ref = data / "out", data / "ref"
    with monkeypatch.context() as m:
        _unfused(m)
        unfused = pipeline.run(doc, "p", Console(record=True))
    assert "fused_into" not in unfused[1]
    out.rename(ref)
    return unfused, ref, out


def _count_adopted(monkeypatch) -> list[int]:
    """Record what each filter run adopted from staged parts."""
    from curate.metadata import exec as mx
    counts, real = [], mx.adopt_staged
    monkeypatch.setattr(mx, "adopt_staged", lambda *a: counts.append(real(*a)) or counts[-1])
    return counts


def test_fused_dedup_filter_equals_unfused(ray_local, data, monkeypatch):
    # Files (data, ledgers, markers, _config.yaml, _stats.json) are identical, byte for byte in
    # content, whether filter runs in dedup's part tasks or on its own; buckets=5 spreads each
    # part's kept rows over several buckets; 2 threads exercise duckdb's ordering.
    doc = _doc(data, ["dedup", {"step": "filter", "aesthetic": 5.0}], dedup={"buckets": 5, "threads": 2})
    unfused, ref, out = _run_both(data, monkeypatch, doc)
    adopted = _count_adopted(monkeypatch)
    fused = pipeline.run(doc, "p", Console(record=True))
    assert adopted == [3] and fused[1]["fused_into"] == "dedup" and not list((out / "filter").glob("_staged-*"))
    assert [r["kept"] for r in fused] == [r["kept"] for r in unfused]
    _assert_same_folders(ref, out)


def test_fused_empty_bucket_and_crash_before_adoption(ray_local, data, monkeypatch):
    # A crash after dedup, before filter adopts the staged parts, then a rerun: the staged
    # parts are adopted and the output is identical.
    doc = _doc(data, ["dedup", "filter"], dedup={"buckets": 40})
    unfused, ref, out = _run_both(data, monkeypatch, doc)
    from curate.metadata import filter as flt

    def crash(*a, **k):
        raise RuntimeError("killed")
    with monkeypatch.context() as m:
        m.setattr(flt.mx, "adopt_staged", crash)
        with pytest.raises(RuntimeError, match="killed"):
            pipeline.run(doc, "p", Console(record=True))
    assert len(list((out / "filter").glob("_staged-*/_done/*.json"))) == 3  # one per input file
    pipeline.run(doc, "p", Console(record=True))
    _assert_same_folders(ref, out)


def test_fused_rerun_with_other_settings_never_adopts_stale_parts(ray_local, data, monkeypatch):
    # Staged parts made for aesthetic 4.5 must not be adopted by a rerun with aesthetic 6.0.
    doc = _doc(data, ["dedup", {"step": "filter", "aesthetic": 6.0}])
    unfused, ref, out = _run_both(data, monkeypatch, doc)
    stale = _doc(data, ["dedup", {"step": "filter", "aesthetic": 4.5}])
    from curate.metadata import filter as flt
    with monkeypatch.context() as m:
        m.setattr(flt, "observed_ranges", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError):  # killed after dedup, before filter opens its folder
            pipeline.run(stale, "p", Console(record=True))
    assert list((out / "filter").glob("_staged-*/_done/*.json"))  # staged for 4.5, never adopted
    pipeline.run(doc, "p", Console(record=True))
    _assert_same_folders(ref, out)


def test_fused_with_empty_buckets_equals_unfused(ray_local, tmp_path, monkeypatch):
    # 3 rows in 8 buckets: at least 5 buckets are empty and still give identical parts/ledgers.
    from metadata_data import row, write
    write(tmp_path / "in" / "a.parquet", [row("http://a"), row("http://a", aesthetic=6.0), row("http://b", aesthetic=3.0)])
    doc = _doc(tmp_path, ["dedup", "filter"], dedup={"buckets": 8})
    unfused, ref, out = _run_both(tmp_path, monkeypatch, doc)
    adopted = _count_adopted(monkeypatch)
    fused = pipeline.run(doc, "p", Console(record=True))
    assert adopted == [1]  # the filter part came from dedup's task, not refiltered
    assert [r["kept"] for r in fused] == [r["kept"] for r in unfused] == [2, 1]
    assert len(list((out / "filter").glob("part-*.parquet"))) == 1  # parts are per input file
    _assert_same_folders(ref, out)
