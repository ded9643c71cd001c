"""What every command of the three CLIs (`curate`, `pretokenize`, `train`) shares.

    user_errors()      the one error handler: a UserError (or an OSError: a missing file, a full
                       or read-only disk, an unreachable bucket) prints one red
                       line and exits 2; StepIncomplete or a ledger mismatch prints one line
                       and exits 1 (rerun to finish). Errors raised inside Ray tasks arrive
                       wrapped: the handler prints the task's own message.
    ray_address(...)   the one rule for which Ray to use: --ray-address > RAY_ADDRESS >
                       pipelines.yaml `ray.address` > a local Ray started in-process.
    tidy_help(app)     --help texts as written: a docstring's hard-wrapped lines are joined
                       into paragraphs, `[default: x]` in an option's help is shown as is
                       (rich would take it for markup and drop it), and a word too long for
                       its column is folded onto the next line instead of cut with "…".
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from typing import Any, Iterator, Mapping

import typer
from rich.console import Console

from core.errors import StepIncomplete, UserError
from core.ledger import LedgerMismatchError

err = Console(stderr=True, soft_wrap=True, highlight=False)  # soft wrap: paths stay copyable


def _message(exc: BaseException) -> str:
    """The error's own words; a Ray task error carries the task's exception as `cause`."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


INTERRUPTED = "finished units are kept; rerun the same command to resume"


@contextlib.contextmanager
def user_errors(interrupted: str = INTERRUPTED) -> Iterator[None]:
    """One line and exit 2 for problems the user fixes (a bad setting or input, and what the
    machine refuses: a read-only or full disk, an unreachable bucket), one line and exit 1 for
    a step that did not finish; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (UserError, OSError) as exc:
        err.print(f"[red]error:[/red] {_message(exc)}", markup=True)
        raise typer.Exit(2) from None
    except (StepIncomplete, LedgerMismatchError) as exc:
        err.print(f"[red]incomplete:[/red] {_message(exc)}", markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: what is done is kept; say how to go on
        err.print(f"[red]interrupted:[/red] {interrupted}", markup=True)
        raise typer.Exit(130) from None


def ray_address(flag: str | None, doc: Mapping[str, Any] | None = None) -> str | None:
    """--ray-address > RAY_ADDRESS (set by `ray job submit`) > pipelines.yaml `ray.address`;
    None means a local Ray started in-process."""
    from core.config import section

    return flag or os.environ.get("RAY_ADDRESS") or (section(doc, "ray").get("address") if doc else None) or None


RAY_ADDRESS_HELP = ("Ray cluster to join, e.g. host:6379 [default: RAY_ADDRESS, then ray.address in "
                    "pipelines.yaml, else a local Ray]")


def unwrap(text: str | None) -> str:
    """A docstring as paragraphs: hard line breaks inside a paragraph become spaces."""
    paragraphs = inspect.cleandoc(text or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


_UNESCAPED_BRACKET = re.compile(r"(?<!\\)\[")


def _escape(help_text: str | None) -> str | None:
    return None if help_text is None else _UNESCAPED_BRACKET.sub(r"\\[", help_text)


def tidy_help(app: typer.Typer) -> typer.Typer:
    """Give every command of `app` (and its sub-apps) its unwrapped docstring as help, and
    escape the brackets of its options' help; returns `app`."""
    infos = list(app.registered_commands)
    if app.registered_callback is not None:
        infos.append(app.registered_callback)
    for info in infos:
        if info.help is None and info.callback is not None:
            info.help = unwrap(info.callback.__doc__)
        for param in inspect.signature(info.callback).parameters.values() if info.callback else ():
            default = param.default
            if isinstance(default, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
                default.help = _escape(default.help)
    for group in app.registered_groups:
        tidy_help(group.typer_instance)
    _fold_long_words()
    return app


class _Folding:
    """Wraps one of typer's text makers so that the Text it returns folds an over-long word."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from rich.text import Text

        text = self.make(*args, **kwargs)
        if isinstance(text, Text):
            text.overflow = "fold"
        return text


def _fold_long_words() -> None:
    """typer's options table gives each cell rich's default overflow, "ellipsis": on an
    80-column terminal `curate score --help` showed `--no-clip-quick-g…`. A Text's own overflow
    wins over its column's, so the option names and help texts typer makes are set to fold.
    (typer 0.29.2's rich_utils; tests/core/test_cli.py checks every command at 80 columns.)"""
    from typer import rich_utils

    for name in ("highlighter", "negative_highlighter", "_make_rich_text"):
        make = getattr(rich_utils, name)
        if not isinstance(make, _Folding):
            setattr(rich_utils, name, _Folding(make))
