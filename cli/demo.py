"""csp demo: the whole pipeline on the embedded default (this Python's stdlib, an
in-process Ray, ./csp-runs/). It grows with the project; today it builds the tokenizer
and the token shards."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cli._progress import bar
from cluster import data, runtime, storage


def demo(
    out: Annotated[str, typer.Option(help="Where every output goes (local path or s3://…).")] = "./csp-runs",
    quick: Annotated[bool, typer.Option(help="A minute-scale run that checks the plumbing.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: an in-process Ray).")] = None,
) -> None:
    """Run the pipeline end to end on the embedded default; re-running resumes."""
    t0 = time.monotonic()
    root = storage.resolve(out)
    runtime.init(address=address)
    ds = root.join("data")
    typer.echo(f"[1/1] corpus → tokenizer → token shards ({'stdlib, n_ctx 128' if not quick else 'stdlib, n_ctx 64'})")
    with bar("shards") as update:
        result = data.prepare(None, ds.uri, n_ctx=64 if quick else 128, progress=update)
    typer.echo(f"      {result.shards_written} shards written, {result.shards_skipped} already done → {ds.uri}")
    typer.echo("\n".join("      " + line for line in data.manifest_summary(result.manifest).splitlines()))
    typer.echo(f"done in {time.monotonic() - t0:.0f}s. Training, sweeps and pruning arrive in later releases.")
