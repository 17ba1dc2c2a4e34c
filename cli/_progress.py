"""Progress bars for long commands (rich, on stderr so stdout stays parseable), transient:
they disappear when the command ends. One look for every command: label, bar, done/total,
an info column, elapsed (and, where asked, remaining) time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Update = Callable[..., None]  # update(done, total=None, info="")


class Bars:
    """Several bars in one live display (the demo's shards, steps and pairs)."""

    def __init__(self, progress):
        self._p = progress

    def add(self, label: str, total: int | None = None, hide_when_done: bool = False) -> Update:
        """A new bar; returns ``update(done, total=None, info="")``. ``hide_when_done``
        keeps it out of sight until work starts and once ``done`` reaches ``total``."""
        p = self._p
        task = p.add_task(label, total=total, info="", visible=not hide_when_done)
        known = {"total": total}

        def update(done: int, total: int | None = None, info: str = "") -> None:
            if total is not None:
                known["total"] = total
            total = known["total"]
            fields = {"visible": total is None or done < total} if hide_when_done else {}
            p.update(task, completed=done, total=total, info=info, **fields)

        return update


@contextlib.contextmanager
def bars(eta: bool = False) -> Iterator[Bars]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*cols, *([TimeRemainingColumn()] if eta else []), console=Console(stderr=True), transient=True) as p:
        yield Bars(p)


@contextlib.contextmanager
def bar(label: str, total: int | None = None, eta: bool = False) -> Iterator[Update]:
    """One bar; yields ``update(done, total=None, info="")``."""
    with bars(eta) as b:
        yield b.add(label, total)
