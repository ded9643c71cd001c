"""The metadata commands through typer's test runner: help, a full chain, precedence, errors."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from curate.cli import app
from metadata_data import read_out, row, write

runner = CliRunner()


@pytest.mark.parametrize("cmd", ["synth", "dedup", "filter", "captions", "join", "run"])
def test_help(cmd):
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_filter_help_lists_every_option():
    out = runner.invoke(app, ["filter", "--help"], env={"COLUMNS": "200"}).output
    for opt in ("--aesthetic", "--watermark", "--punsafe", "--min-side", "--max-aspect", "--similarity", "--min-words", "--ray-address", "--config"):
        assert opt in out


def test_chain_through_the_cli_with_yaml_and_flag_precedence(ray_local, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"curate": {"filter": {"aesthetic": 6.0}}}))
    r = runner.invoke(app, ["synth", "--rows", "2000", "--files", "2", "-o", str(tmp_path / "in"), "--captions-output", str(tmp_path / "c.parquet")])
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["dedup", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "d"), "--key", "url"]).exit_code == 0
    r = runner.invoke(app, ["filter", "-i", str(tmp_path / "d"), "-o", str(tmp_path / "f"), "--config", str(cfg), "--watermark", "0.4"])
    assert r.exit_code == 0, r.output
    written = yaml.safe_load((tmp_path / "f" / "_config.yaml").read_text())["config"]["settings"]
    assert (written["aesthetic"], written["watermark"]) == (6.0, 0.4)  # yaml section, then the flag
    assert all(x["aesthetic"] >= 6.0 and x["pwatermark"] <= 0.4 for x in read_out(tmp_path / "f"))
    r = runner.invoke(app, ["captions", "-i", str(tmp_path / "f"), "-o", str(tmp_path / "c"), "--captions", str(tmp_path / "c.parquet"), "--min-words", "30"])
    assert r.exit_code == 0, r.output
    assert "rows matched a long caption" in r.output
    stats = json.loads((tmp_path / "c" / "_stats.json").read_text())
    assert stats["rows_in"] == stats["kept"] == len(read_out(tmp_path / "f"))


def test_run_pipeline_from_config(ray_local, tmp_path):
    write(tmp_path / "in" / "a.parquet", [row("u", aesthetic=5.0), row("u", aesthetic=6.0), row("v", aesthetic=1.0)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": {"mini": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "steps": ["dedup", "filter"]}}}))
    r = runner.invoke(app, ["run", "--config", str(cfg), "--pipeline", "mini"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "pipeline mini" in r.output
    assert [x["aesthetic"] for x in read_out(tmp_path / "out" / "filter")] == [6.0]


@pytest.mark.parametrize("args,message", [
    (["dedup", "-i", "{tmp}/nope", "-o", "{tmp}/o"], "input not found"),
    (["dedup", "-i", "{tmp}/in", "-o", "{tmp}/o", "--key", "md5"], "key must be one of"),
    (["filter", "-i", "{tmp}/in", "-o", "{tmp}/o", "--watermark", "3"], "watermark is a probability"),
    (["captions", "-i", "{tmp}/in", "-o", "{tmp}/o"], "caption table is required"),
    (["run", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["dedup", "-i", "{tmp}/bad", "-o", "{tmp}/o"], "required column 'TEXT' is missing"),
])
def test_user_errors_exit_2_with_one_line(ray_local, tmp_path, args, message):
    write(tmp_path / "in" / "a.parquet", [row("u")])
    write(tmp_path / "bad" / "a.parquet", [{"URL": "u"}], schema=None)
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_an_incomplete_step_is_one_line_and_exit_1(capsys) -> None:
    """A step that could not finish every task (e.g. a download shard) must not end in a
    traceback under `curate run`: one line, exit status 1, rerun to finish."""
    import typer

    from core.cli import user_errors
    from curate.download.step import DownloadIncomplete

    with pytest.raises(typer.Exit) as exit_info:
        with user_errors():
            raise DownloadIncomplete("2 of 5 shards unfinished; rerun the same command")
    assert exit_info.value.exit_code == 1
    assert "incomplete: 2 of 5 shards unfinished" in capsys.readouterr().err


def test_a_misspelt_curate_section_is_an_error(tmp_path):
    """`curate: {filtr: {aesthetic: 9}}` ran the filter at 4.5 without a word."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"curate": {"filtr": {"aesthetic": 9.0}},
                                   "pipelines": {"p": {"input": str(tmp_path / "in"), "output": str(tmp_path / "o"),
                                                       "steps": ["filter"]}}}))
    for args in (["run", "--pipeline", "p"], ["filter", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o")]):
        result = runner.invoke(app, [*args, "--config", str(cfg)])
        assert result.exit_code == 2 and "curate: unknown section 'filtr' (known: dedup, filter" in result.output
    assert not (tmp_path / "o").exists()
