"""Rich progress bars shared by every long step."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


def track(items: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
    """Iterate `items` with a progress bar."""
    with make_progress() as progress:
        yield from progress.track(items, total=total, description=description)


def ray_results(refs: list[Any], description: str) -> list[Any]:
    """`ray.get` every ref, advancing a bar as each finishes; results in the order of `refs`.

    A task's exception is raised here (after the bar closes) as Ray raises it."""
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with make_progress() as progress:
        bar = progress.add_task(description, total=len(refs))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                progress.advance(bar)
    return results
