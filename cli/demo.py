"""csp demo: the whole pipeline on the embedded default (this Python's stdlib, an
in-process Ray, ./csp-runs/): shards → a sweep of small models → prune fan-out over all
tasks → Parquet → summary table → frontier plot → circuit diagrams → report.html."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli._app import SHARED_FS_HELP


def demo(
    out: Annotated[str, typer.Option(help="Where every output goes (local path or s3://…).")] = "./csp-runs",
    quick: Annotated[bool, typer.Option(help="A minutes-scale run of every stage on tiny models (checks the plumbing).")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: an in-process Ray).")] = None,
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
) -> None:
    """Run the pipeline end to end on the embedded default; re-running resumes where it stopped."""
    from cluster import storage
    from jobs import demo as demo_lib

    t0 = time.monotonic()
    storage.resolve(out)  # a malformed URI fails before Ray starts
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=True) as p:
        shards = p.add_task("shards", total=None, info="", visible=False)
        steps = p.add_task("training steps", total=None, info="", visible=False)
        pairs = p.add_task("pairs", total=None, info="", visible=False)

        def shard_progress(done: int, total: int) -> None:
            p.update(shards, completed=done, total=total, visible=done < total)

        def train_progress(done: int, total: int) -> None:
            p.update(steps, completed=done, total=total, visible=done < total, info="checkpointed, all models")

        def prune_progress(done: int, total: int, row: dict) -> None:
            p.update(pairs, completed=done, total=total, visible=done < total, info=f"{row['task']}: {row['status']}")

        result = demo_lib.run(out, quick=quick, address=address, shared_fs=shared_fs, log=typer.echo, shard_progress=shard_progress,
                                  prune_progress=prune_progress, train_progress=train_progress)
    typer.echo(f"\ndone in {time.monotonic() - t0:.0f}s; open {result['report']}")
    if result["report"].startswith("s3://"):  # a browser cannot open s3:// URIs; the links inside are relative
        typer.echo(f"  (copy it down first, e.g. `aws s3 sync {result['out']} ./csp-demo` and open csp-demo/report.html)")
