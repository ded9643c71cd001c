"""`curate report` over a small real run (conftest.chain): every section built from the folders'
files, folders found by their records, unfinished and missing data shown rather than crashing."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from curate.report.build import SECTIONS, build_report
from curate.report.context import ReportConfig
from curate.report.discover import discover


@pytest.fixture(scope="module")
def page(chain, tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    done = build_report(ReportConfig(), [chain["root"]], out)
    return out.read_text(), done


def section(html: str, sid: str) -> str:
    m = re.search(f'<section id="{sid}".*?</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(0)


def test_every_folder_is_found_by_its_record_and_pipeline_steps_keep_their_order(chain) -> None:
    inv = discover([chain["root"]])
    kinds = [(f.pipeline, f.kind) for f in inv.folders]
    assert kinds == [("t", "dedup"), ("t", "filter"), ("t", "captions"), (None, "download"), (None, "neardup"),
                     (None, "score"), (None, "pretokenize"), (None, "check"), (None, "train")]
    assert [f.fused_into for f in inv.folders[:2]] == [None, "dedup"]  # curate run fused filter into dedup
    assert not inv.problems  # laion/ (plain parquet) and vq/ hold no record and are passed over quietly


def test_a_folder_is_recognised_by_what_it_holds_not_its_name(chain, tmp_path) -> None:
    odd = tmp_path / "whatever"
    shutil.copytree(chain["meta"] / "filter", odd)
    (tmp_path / "plain").mkdir()
    inv = discover([odd, tmp_path / "plain"])
    assert [f.kind for f in inv.folders] == ["filter"]
    assert inv.problems == [f"{tmp_path / 'plain'}: no run folder found in it (no _config.yaml, _summary.json, "
                            "manifest.json, metrics.jsonl or check.json)"]


def test_the_page_has_every_section_and_is_self_contained(page) -> None:
    html, done = page
    assert done["sections"] == [sid for sid, _, _ in SECTIONS] and not done["problems"]
    assert "<script" not in html and "Content-Security-Policy" in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', html)


def test_funnel_counts_and_reasons_come_from_stats_and_ledgers(page, chain) -> None:
    funnel = section(page[0], "funnel")
    stats = json.loads((chain["meta"] / "filter" / "_stats.json").read_text())
    assert f"{stats['rows_in']:,}" in funnel and f"{stats['kept']:,}" in funnel
    assert f"aesthetic (filtered): {stats['reasons']['aesthetic']:,}" in funnel
    assert "http_404 (failed): 1" in funnel and "placeholder (filtered): 3" in funnel
    assert "in dedup" in funnel  # the fused step says where its time went


def test_histograms_are_exact_counts_on_shared_bins() -> None:
    import duckdb

    from curate.report.query import histograms

    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(5, 1, 5000), [np.nan] * 7]
    y = np.r_[rng.uniform(0, 1, 5005), [np.inf, None]].astype(float)
    con = duckdb.connect()
    con.register("t", {"x": x, "y": y, "z": np.full(5007, np.nan)})
    hs = histograms(con, {"before": "t", "after": "(SELECT * FROM t WHERE x >= 4.5)"}, {"x": "x", "y": "y", "z": "z"},
                    20, {"x": [4.5], "y": [1.5]})
    h = hs["x"]
    assert h.missing == {"before": 7, "after": 0} and h.rows["before"] == 5007 and hs["z"] is None
    finite = x[np.isfinite(x)]
    want, _ = np.histogram(finite, h.edges)
    assert np.array_equal(h.counts["before"], want) and h.counts["after"].sum() == (finite >= 4.5).sum()
    assert hs["y"].edges[-1] == 1.5 and hs["y"].missing["before"] == 2  # widened to the threshold; inf and NaN
    assert np.array_equal(hs["y"].counts["before"], np.histogram(y[np.isfinite(y)], hs["y"].edges)[0])


def test_scores_and_captions_sections(page) -> None:
    scores, captions = section(page[0], "scores"), section(page[0], "captions")
    assert scores.count('alt="') == 4  # aesthetic, pwatermark, punsafe, similarity
    assert "matched a long caption" in captions and captions.count("<img") == 2


def test_contact_sheets_show_the_images_nearest_each_threshold(page) -> None:
    sheets = section(page[0], "thresholds")
    # aesthetic >= 4.5 keeps 4.52 (retina), 4.55, 4.6 ... nearest first; drops 4.4, 4.3, 3.9.
    # Every downloaded image counts, near-duplicates too (4.55 is coffee's, dropped by neardup).
    kept = re.search(r"kept \(aesthetic ≥ 4.5\)(.*?)dropped \(aesthetic &lt; 4.5\)(.*?)</div></div>", sheets, re.S)
    assert kept, sheets[:2000]
    values = lambda s: [float(v) for v in re.findall(r"aesthetic ([0-9.]+) ·", s)]  # noqa: E731
    assert values(kept.group(1))[:3] == [4.52, 4.55, 4.6]
    assert values(kept.group(2)) == [4.4, 4.3, 3.9]
    assert "kept (punsafe ≤ 0.5)" in sheets  # Open-NSFW's image scores, from the score folder
    assert "scores from score" in sheets


def test_neardup_groups_put_kept_beside_dropped_and_show_placeholders(page) -> None:
    nd = section(page[0], "neardup")
    assert 'class="kept"' in nd and 'class="dropped"' in nd
    assert "placeholder groups (1)" in nd and "3 images, 3 hosts" in nd


def test_download_pretokenize_and_training_sections(page) -> None:
    html = page[0]
    assert "http_404" in section(html, "download") and "dead.org" in section(html, "download")
    pre = section(html, "pretokenize")
    assert "mean PSNR" in pre and "input | reconstruction" in pre and "codebook usage" in pre
    train = section(html, "training")
    assert "alt=\"loss curve\"" in train and "step 2" in train and "step 4" in train and "resolved config" in train


def test_unfinished_and_missing_data_are_shown_not_fatal(chain, tmp_path) -> None:
    root = tmp_path / "partial"
    for name in ("filter", "captions"):
        shutil.copytree(chain["meta"] / name, root / name)
    (root / "captions" / "_stats.json").unlink()  # the step did not finish
    for part in sorted((root / "captions" / "_ledger").glob("*.parquet"))[1:]:
        part.unlink()
    shutil.copytree(chain["download"], root / "download")
    (root / "download" / "_stats.json").unlink()
    html_path = tmp_path / "r.html"
    done = build_report(ReportConfig(), [root], html_path)
    html = html_path.read_text()
    assert "unfinished (" in section(html, "captions") and "unfinished (" in section(html, "funnel")
    assert "unfinished (2 units done; no _stats.json): failures recorded so far" in section(html, "download")
    assert "No `curate neardup` folder" in section(html, "neardup")
    assert "No train run folder" in section(html, "training")
    assert not done["problems"]


def test_damaged_file_is_named_in_the_page_and_the_rest_is_built(chain, tmp_path) -> None:
    root = tmp_path / "damaged"
    shutil.copytree(chain["neardup"], root / "neardup")
    (root / "neardup" / "_groups.parquet").write_bytes(b"not parquet")
    done = build_report(ReportConfig(), [root], tmp_path / "r.html")
    assert len(done["problems"]) == 1 and "_groups.parquet" in done["problems"][0]
    assert "Could not read" in section((tmp_path / "r.html").read_text(), "neardup")


def test_pretokenize_without_check_says_how_to_make_it(chain, tmp_path) -> None:
    codes = tmp_path / "codes"
    shutil.copytree(chain["codes"], codes, ignore=shutil.ignore_patterns("_check"))
    build_report(ReportConfig(), [codes], tmp_path / "r.html")
    assert f"pretokenize check --input {codes}" in section((tmp_path / "r.html").read_text(), "pretokenize")


def test_cli_writes_the_page_and_refuses_a_folder_without_records(chain, tmp_path) -> None:
    from curate.cli import app

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(chain["train"]), "-o", str(out), "--groups", "2"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and out.stat().st_size > 1000
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing-here"), "-o", str(out)])
    assert res.exit_code == 2 and f"{tmp_path / 'nothing-here'}: not a folder" in " ".join(res.output.split())
    (tmp_path / "plain").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "plain"), "-o", str(out)])
    assert res.exit_code == 2 and " ".join(res.output.split()).count("no run folder found") == 1


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="bins"):
        ReportConfig(bins=1)
    with pytest.raises(ValueError, match="groups"):
        ReportConfig(groups=-1)


def test_score_thresholds_follow_the_filter_rules() -> None:
    from curate.report.thresholds import score_thresholds

    got = [(t.column, t.value, t.keep_high) for t in score_thresholds(
        {"aesthetic": 4.5, "watermark": 0.5, "punsafe": None, "min_side": 256, "similarity": 0.28})]
    assert got == [("aesthetic", 4.5, True), ("pwatermark", 0.5, False), ("similarity", 0.28, True)]


def test_spread_takes_first_and_last() -> None:
    from curate.report.training import spread

    assert spread(10, 4) == [0, 3, 6, 9] and spread(3, 6) == [0, 1, 2] and spread(5, 1) == [4] and spread(0, 3) == []


def test_text_is_escaped() -> None:
    from curate.report.html import Html, esc, tag

    assert tag("td", "<b>") == "<td>&lt;b&gt;</td>"
    assert Html("<p>") + "<x>" == "<p>&lt;x&gt;" and isinstance(Html("a") + "b", Html)
    assert esc(Html("<i>")) == "<i>"



def test_a_copied_run_is_read_where_it_is_not_where_it_was_made(chain, tmp_path) -> None:
    # the original stays in place: a copy's summary and configs name the original's folders
    copy = tmp_path / "copy"
    shutil.copytree(chain["root"], copy)
    inv = discover([copy])
    assert len(inv.folders) == len(discover([chain["root"]]).folders)
    assert all(f.path.is_relative_to(copy) for f in inv.folders)
    neardup, score = inv.of("neardup")[0], inv.of("score")[0]
    assert neardup.input_path == score.input_path == copy / "web" / "download"
    assert inv.of("filter")[0].input_path == copy / "meta" / "dedup"
    html = section(build_report(ReportConfig(), [copy], tmp_path / "r.html") and (tmp_path / "r.html").read_text(),
                   "neardup")
    assert 'class="dropped"' in html  # the pictures were read from the copy's shards


@pytest.mark.parametrize("name,text", [("_stats.json", '{"rows_in": 3'), ("_stats.json", "[]"),
                                       ("_config.yaml", "step: [filter"), ("_summary.json", "{")])
def test_a_damaged_record_file_is_a_warning_not_a_traceback(chain, tmp_path, name, text) -> None:
    from curate.cli import app

    root = tmp_path / "run"
    shutil.copytree(chain["meta"], root / "meta")
    target = root / "meta" / (name if name == "_summary.json" else f"filter/{name}")
    target.write_text(text)
    res = CliRunner().invoke(app, ["report", str(root), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert f"warning: {target}: damaged" in " ".join(res.output.split())
    assert f"{target}: damaged" in section((tmp_path / "r.html").read_text(), "folders")


def test_a_damaged_ledger_costs_its_own_funnel_row_only(chain, tmp_path) -> None:
    root = tmp_path / "run"
    shutil.copytree(chain["meta"], root / "meta")
    (root / "meta" / "filter" / "_stats.json").unlink()  # unfinished: the funnel counts its ledger
    next((root / "meta" / "filter" / "_ledger").glob("*.parquet")).write_bytes(b"not parquet")
    done = build_report(ReportConfig(), [root], tmp_path / "r.html")
    funnel = section((tmp_path / "r.html").read_text(), "funnel")
    assert "Could not read Funnel:" in funnel and funnel.count("<tr>") == 4  # head + dedup, filter, captions
    assert [p.split(":")[0] for p in done["problems"]] == ["Funnel"]


def test_damaged_metrics_lines_are_left_out_of_the_curve_and_named(chain, tmp_path) -> None:
    run = tmp_path / "train"
    shutil.copytree(chain["train"], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    done = build_report(ReportConfig(), [run], tmp_path / "r.html")
    train = section((tmp_path / "r.html").read_text(), "training")
    assert 'alt="loss curve"' in train and "1 damaged line(s) (first: line 2)" in train
    assert len(done["problems"]) == 1 and "metrics.jsonl" in done["problems"][0]


def test_damaged_input_shards_and_a_killed_pretokenize_are_said(chain, tmp_path) -> None:
    codes = tmp_path / "codes"
    shutil.copytree(chain["codes"], codes)
    stats = json.loads((codes / "_stats.json").read_text())
    (codes / "_stats.json").write_text(json.dumps({**stats, "damaged_shards": {"00001": "cut short"}}))
    build_report(ReportConfig(), [codes], tmp_path / "r.html")
    assert "1 damaged input shard(s), their readable samples encoded: 00001: cut short" in \
        section((tmp_path / "r.html").read_text(), "pretokenize")
    (codes / "_stats.json").unlink()
    (codes / "manifest.json").unlink()  # as a run killed before its units all ran leaves it
    done = build_report(ReportConfig(), [codes], tmp_path / "r.html")
    pre = section((tmp_path / "r.html").read_text(), "pretokenize")
    assert "no manifest.json yet; rerun the same" in pre and "lists the shards" not in pre and not done["problems"]


def test_an_output_that_is_a_folder_or_under_a_file_is_one_line(chain, tmp_path) -> None:
    from curate.cli import app

    (tmp_path / "f").write_text("x")
    for out, says in ((tmp_path, "is a folder; -o names the HTML file to write"),
                      (tmp_path / "f" / "r.html", f"cannot be written: {tmp_path / 'f'} is a file")):
        res = CliRunner().invoke(app, ["report", str(chain["train"]), "-o", str(out)])
        assert res.exit_code == 2 and says in " ".join(res.output.split()) and "Traceback" not in res.output


def test_a_step_input_is_not_matched_to_an_unrelated_folder_of_the_same_name(chain, tmp_path) -> None:
    # the neardup folder alone, beside another run's download: its input is where it was recorded
    other = tmp_path / "other" / "run" / "download"
    shutil.copytree(chain["download"], other)
    inv = discover([chain["neardup"], other])
    assert inv.of("neardup")[0].input_path == chain["download"]
