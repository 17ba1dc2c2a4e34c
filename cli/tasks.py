"""csp tasks …: the 20 hand-crafted tasks: list them, show examples, evaluate a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import Format, emit, group

app = group("The 20 next-token tasks that circuits are pruned for.")


@app.command("list")
def list_(fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table") -> None:
    """Every task with what it probes."""
    from sparsity import tasks as task_lib

    rows = [{"task": name, "probes": t.description.split(". Example")[0].split(" Example")[0]} for name, t in task_lib.REGISTRY.items()]
    width = max(map(len, task_lib.REGISTRY))
    emit(rows, fmt, table="\n".join(f"{r['task']:<{width}}  {r['probes']}" for r in rows))


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Task name (see `csp tasks list`).")],
    n: Annotated[int, typer.Option(help="How many example pairs.")] = 3,
    seed: Annotated[int | None, typer.Option(help="Pair seed (default: the train pairs' seed).")] = None,
) -> None:
    """Print example contrast pairs of a task."""
    from sparsity import tasks as task_lib

    seed = task_lib.TRAIN_SEED if seed is None else seed
    if n < 1:
        raise typer.BadParameter(f"--n must be ≥ 1, got {n}")
    t = task_lib.get(name)
    typer.echo(t.description)
    for i, p in enumerate(t.pairs(n, seed)):
        typer.echo(f"\n--- pair {i}: clean → {p.target!r}")
        typer.echo(p.clean + "▌")
        typer.echo(f"--- corrupt → {p.alt!r}")
        typer.echo(p.corrupt + "▌")


@app.command("eval")
def eval_(
    ckpt: Annotated[str, typer.Argument(help="A run or checkpoint directory.")],
    task: Annotated[list[str] | None, typer.Option(help="Task to evaluate (repeatable; default: all).")] = None,
    data_uri: Annotated[str | None, typer.Option("--data", help="Dataset whose tokenizer to use (default: the run's).")] = None,
    n: Annotated[int, typer.Option(help="Held-out pairs per task.")] = 64,
) -> None:
    """Held-out loss (two-sided binary CE per pair) and accuracy of a checkpoint on each task."""
    from jobs import loader
    from sparsity import tasks as task_lib

    if n < 1:
        raise typer.BadParameter(f"--n must be ≥ 1, got {n}")
    names = task or list(task_lib.REGISTRY)
    tasks = [task_lib.get(x) for x in names]
    opened = loader.LoadedModel(ckpt, data_uri)  # the tokenizer of its data, checked against the model's vocabulary
    model, tok = opened.model, opened.tok
    width = max(map(len, names))
    typer.echo(f"{'task':<{width}}  {'loss':>7}  {'accuracy':>8}")
    for t in tasks:
        r = task_lib.evaluate(model, t, tok, n=n)
        typer.echo(f"{t.name:<{width}}  {r['loss']:7.4f}  {r['accuracy']:8.3f}")
    typer.echo(f"(loss summed over a pair's two prompts: chance {task_lib.CHANCE_LOSS:.3f}; `csp prune` prunes a task whose "
               "loss is ≤ its target, 0.15 and 0.30 by default)")
