"""csp demo: the whole pipeline on the embedded default (this Python's stdlib, an
in-process Ray, ./csp-runs/): shards → a sweep of small models → prune fan-out over all
tasks → Parquet → summary table → frontier plot → circuit diagrams → report.html."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP
from cli._progress import bars


class Preset(StrEnum):
    """The demo's plans (jobs.demo.PRESETS)."""

    default = "default"
    paper = "paper"
    quick = "quick"


def demo(
    out: Annotated[str, typer.Option(help="Where every output goes (local path or s3://…).")] = "./csp-runs",
    quick: Annotated[bool, typer.Option(help="A minutes-scale run of every stage on tiny models (checks the plumbing); same as --preset quick.")] = False,
    preset: Annotated[Preset, typer.Option(help="default: five models, about 20–30 min on 2 CPU cores; paper: both frontier directions at two seeds, "
                                                  "~2 h on 2 cores (resumable); quick: tiny models, minutes.")] = Preset.default,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: an in-process Ray).")] = None,
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
) -> None:
    """Run the pipeline end to end on the embedded default; re-running resumes where it stopped."""
    from cluster import storage
    from jobs import demo as demo_lib

    if quick and preset not in (Preset.default, Preset.quick):
        raise typer.BadParameter(f"--quick and --preset {preset.value} ask for different runs; give one of them")
    t0 = time.monotonic()
    storage.check_writable(out)  # a malformed, read-only or unreachable --out fails before Ray starts
    with bars() as b:
        shards = b.add("shards", hide_when_done=True)
        steps = b.add("training steps", hide_when_done=True)
        pairs = b.add("pairs", hide_when_done=True)

        def train_progress(done: int, total: int) -> None:
            steps(done, total, "checkpointed, all models")

        def prune_progress(done: int, total: int, row: dict) -> None:
            pairs(done, total, f"{row['task']}: {row['status']}")

        result = demo_lib.run(out, preset="quick" if quick else preset.value, address=address, shared_fs=shared_fs, log=typer.echo, shard_progress=shards,
                                  prune_progress=prune_progress, train_progress=train_progress)
    typer.echo(f"\ndone in {time.monotonic() - t0:.0f}s; open {result['report']}")
    if result["report"].startswith("s3://"):  # a browser cannot open s3:// URIs; the links inside are relative
        typer.echo(f"  (copy it down first, e.g. `aws s3 sync {result['out']} ./csp-demo` and open csp-demo/report.html)")
