"""The ``csp`` command line: thin commands that parse, call a library function, print.

    csp --help
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import cluster, data, model, results, s3, sweep, tasks, tokenizer, viz
from cli._app import group, version
from cli.demo import demo
from cli.prune import prune
from cli.train import train

app = group("csp: train weight-sparse transformers, sweep them on Ray, prune them to circuits.", completion=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(version())
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", help="Print csp's version (and git commit) and exit.",
                                               callback=_version, is_eager=True)] = False,
) -> None:
    """csp: train weight-sparse transformers, sweep them on Ray, prune them to circuits."""
app.command()(demo)
app.command()(train)
app.command()(prune)
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(data.app, name="data")
app.add_typer(model.app, name="model")
app.add_typer(tasks.app, name="tasks")
app.add_typer(sweep.app, name="sweep")
app.add_typer(results.app, name="results")
app.add_typer(viz.app, name="viz")
app.add_typer(cluster.cluster_app, name="cluster")
app.add_typer(cluster.jobs_app, name="jobs")
app.command()(cluster.submit)
app.add_typer(s3.app, name="s3")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
