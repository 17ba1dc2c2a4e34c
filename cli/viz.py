"""csp viz …: the frontier plot and circuit diagrams from a results store."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import group

app = group("Figures from stored circuits: the frontier plot, circuits over training, circuit diagrams.")


@app.command()
def frontier(
    uri: Annotated[str, typer.Argument(help="Results URI (from `csp prune --out` or `csp demo`).")],
    out: Annotated[str | None, typer.Option(help="Directory for frontier.png and frontier.svg (default: URI/figures).")] = None,
    target: Annotated[float | None, typer.Option(help="Circuits at this target (default: the strictest stored).")] = None,
) -> None:
    """Val loss (capability) vs geometric-mean circuit edges (interpretability), one point per model."""
    from jobs import viz

    _check_out(out)
    for path in viz.plot_frontier(uri, out, target):
        typer.echo(path)


@app.command("over-training")
def over_training(
    uri: Annotated[str, typer.Argument(help="Results URI of `csp prune --checkpoints milestones|all|STEPS`.")],
    out: Annotated[str | None, typer.Option(help="Directory for over-training.png and .svg (default: URI/figures).")] = None,
    target: Annotated[float | None, typer.Option(help="Circuits at this target (default: the strictest stored).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this run: its trial name, or a model id (or prefix) of one of its checkpoints.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
) -> None:
    """Circuit size and the full model's task loss against the training step, a panel per task."""
    from jobs import viz

    _check_out(out)
    for path in viz.plot_over_training(uri, out, target, model, task):
        typer.echo(path)


@app.command()
def circuit(
    uri: Annotated[str, typer.Argument(help="Results URI.")],
    model: Annotated[str, typer.Option(help="The model: its id, its trial name (e.g. d128-dense), or a unique prefix of the id.")],
    task: Annotated[str, typer.Option(help="Task name (see `csp tasks list`).")],
    out: Annotated[str | None, typer.Option(help="Directory for the .svg and .html (default: URI/figures/circuits).")] = None,
    data: Annotated[str | None, typer.Option(help="Token shards for top-activating tokens (default: the model's training data).")] = None,
) -> None:
    """Draw one circuit: residual channels as vertical lines, q/k/v channels and neurons as nodes,
    signed weighted edges; hover a node for its id and top-activating tokens."""
    from jobs import viz

    _check_out(out)
    for path in viz.render_circuit(uri, model, task, out, data):
        typer.echo(path)


def _check_out(out: str | None) -> None:
    """A given --out that cannot take files (a file, read-only, unreachable) fails before drawing."""
    if out is not None:
        from cluster import storage

        storage.check_writable(out)
