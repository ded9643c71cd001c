"""core.cli: one error handler, one Ray-address rule, help texts as written (no mid-sentence
line breaks from hard-wrapped docstrings, `[default: x]` kept)."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from core import cli
from core.errors import StepIncomplete, UserError


def test_unwrap_joins_hard_wrapped_lines_but_keeps_paragraphs() -> None:
    doc = """First line of a sentence
        that goes on here.

        Second paragraph,
        wrapped too."""
    assert cli.unwrap(doc) == "First line of a sentence that goes on here.\n\nSecond paragraph, wrapped too."


@pytest.mark.parametrize("app_path", ["curate.cli", "pretokenize.cli", "train.cli"])
def test_help_lists_whole_sentences(app_path: str) -> None:
    """Each command's summary in the app's --help is its docstring's first paragraph on one
    line (a wide terminal shows no break where the docstring was hard-wrapped)."""
    import importlib

    app = importlib.import_module(app_path).app
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "500"}).output
    lines = [line.strip(" │") for line in out.splitlines()]
    for info in app.registered_commands:
        first = cli.unwrap(info.callback.__doc__).split("\n\n")[0]
        assert any(first in line for line in lines), first


def test_option_defaults_in_brackets_are_shown() -> None:
    from curate.cli import app

    out = CliRunner().invoke(app, ["filter", "--help"], env={"COLUMNS": "300"}).output
    assert "[default: 4.5]" in out and "[default: 1GB]" in out  # kept, not eaten as markup


def test_one_error_handler_and_one_address_rule(monkeypatch) -> None:
    app = typer.Typer()

    @app.command()
    def fail(kind: str) -> None:
        with cli.user_errors():
            raise {"user": UserError("bad column"), "step": StepIncomplete("2 of 5 units failed")}[kind]

    r = CliRunner().invoke(app, ["user"])
    assert r.exit_code == 2 and "error: bad column" in r.output
    r = CliRunner().invoke(app, ["step"])
    assert r.exit_code == 1 and "incomplete: 2 of 5 units failed" in r.output
    doc = {"ray": {"address": "yaml:6379"}}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.ray_address(None, doc) == "yaml:6379" and cli.ray_address(None, {}) is None
    monkeypatch.setenv("RAY_ADDRESS", "env:6379")
    assert cli.ray_address(None, doc) == "env:6379" and cli.ray_address("flag:6379", doc) == "flag:6379"


def _command_paths(app: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for info in app.registered_commands:
        paths.append((*prefix, info.name or info.callback.__name__.replace("_", "-")))
    for group in app.registered_groups:
        paths += _command_paths(group.typer_instance, (*prefix, group.name))
    return paths


@pytest.mark.parametrize("app_path", ["curate.cli", "pretokenize.cli", "train.cli"])
def test_no_help_text_is_cut_on_an_80_column_terminal(app_path: str) -> None:
    """A word too long for its column folds onto the next line; rich's default would cut it
    with "…" (`curate score --help` showed `--no-clip-quick-g…`)."""
    import importlib

    app = importlib.import_module(app_path).app
    paths = _command_paths(app)
    assert len(paths) >= 3
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, (path, [line for line in result.output.splitlines() if "…" in line])
