"""csp results …: query the circuit tables with filter pushdown; the frontier."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import Format, emit, group

app = group("Query stored circuits (pandas + pyarrow filter pushdown on the task partition).")
@app.command()
def circuits(
    uri: Annotated[str, typer.Argument(help="Results URI given to `csp prune --out`.")],
    task: Annotated[str | None, typer.Option(help="Only this task (partition pruning).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model: its id, its trial name, or a unique prefix of the id.")] = None,
    target: Annotated[float | None, typer.Option(help="Only circuits pruned to this target (a run stores one row per target; default: all).")] = None,
    where: Annotated[str | None, typer.Option(help="A pandas query on the rows, e.g. 'n_edges < 100 and status == \"ok\"'.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
    all_columns: Annotated[bool, typer.Option("--all-columns", help="Every column, not the summary ones.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="Every row: unverified circuits, verdicts, controls and every run of a --search "
                                           "too (default: verified circuits only, the best run of each search).")] = False,
) -> None:
    """Verified circuits, one row per (checkpoint, task, pruning config); --all for every row."""
    from jobs import results as results_lib

    results_lib.check_store(uri, task=task)
    if model is not None:
        model = results_lib.find_model(uri, model, task)
    # Verified real circuits only, unless --all: that filter is pushed down to the row groups.
    only_ok = None if all_rows else results_lib.VERIFIED_FILTER
    df = results_lib.at_target(results_lib.circuits(uri, task=task, model=model, filters=only_ok,
                                                    searches="all" if all_rows else "best"), target)
    stored = len(df) if all_rows or len(df) else len(results_lib.at_target(results_lib.circuits(uri, task=task, model=model), target))
    if where:
        df = _where(df, where)
    if not all_columns:
        df = df[["model_id", "task", "target", "control", "status", "n_nodes", "n_edges", "full_loss", "sufficiency_loss",
                 "random_keep_best", "beats_random_keep", "partial_ablation_loss", "necessity_loss", "necessity_random_loss",
                 "ablation", "prune_key", "pfrac", "ef"]]
    hint = f"(no verified circuits among {stored} stored rows; --all shows every row)" if stored and not all_rows else "(no rows)"
    emit(df, fmt, empty=hint)


def _where(df, where: str):
    """The rows where ``where`` (a pandas expression over the columns) is true; a bad
    expression, or one that is not a true/false condition per row, is a usage error."""
    import pandas as pd

    example = "e.g. 'n_edges < 100 and status == \"ok\"'"
    try:
        mask = df.eval(where)
    except Exception as e:  # pandas raises many types for a bad expression
        detail = " ".join(str(e).split())
        raise typer.BadParameter(f"--where {where!r}: {type(e).__name__}: {detail[:160]}; write a condition on the columns, {example}") from None
    if not isinstance(mask, pd.Series) or not (pd.api.types.is_bool_dtype(mask.dtype) or (len(mask) == 0)):
        raise typer.BadParameter(f"--where {where!r} is not a true/false condition on each row; {example}")
    return df[mask.fillna(False).astype(bool)]


@app.command()
def controls(
    uri: Annotated[str, typer.Argument(help="Results URI.")],
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Faithfulness controls beside the circuits they check (random-init model and rule-based
    nonsense tasks must not verify; a control that never reached the test pairs is not run,
    passes empty; seed and ablation variants with their node-set Jaccard overlap)."""
    from jobs import results as results_lib

    results_lib.check_store(uri, task=task)
    emit(results_lib.controls(uri, task=task), fmt)


@app.command()
def frontier(
    uri: Annotated[str, typer.Argument(help="Results URI.")],
    target: Annotated[float | None, typer.Option(help="Only circuits pruned to this target (default: a row per model and target).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Per model: val loss (capability) vs geometric-mean circuit edges over tasks (interpretability)."""
    from jobs import results as results_lib

    results_lib.check_store(uri)
    emit(results_lib.frontier(uri, target), fmt)


@app.command()
def compact(
    uri: Annotated[str, typer.Argument(help="Results URI.")],
    task: Annotated[list[str] | None, typer.Option(help="Only this task's partition (repeatable; default: every partition).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Merge each task partition's one-result files into a few large ones (a fan-out does this
    when it ends). Safe while fan-outs write and readers read: each row stays readable once."""
    from jobs import compact as compact_lib
    from jobs import results as results_lib
    from sparsity import tasks as task_lib

    for name in task or []:
        task_lib.get(name)
    results_lib.check_store(uri)
    got = compact_lib.compact(uri, tasks=task)
    rows = [{"table": t, "files_before": got["files_before"][t], "files_after": got["files_after"][t]} for t in got["files_before"]]
    emit(rows, fmt)
    busy = f"; {len(got['busy'])} being compacted by another process: {', '.join(got['busy'])}" if got["busy"] else ""
    typer.echo(f"compacted {got['partitions']} partition(s){busy}", err=True)


@app.command("over-training")
def over_training(
    uri: Annotated[str, typer.Argument(help="Results URI of `csp prune --checkpoints milestones|all|STEPS`.")],
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this run: its trial name, or a model id (or unique prefix) of one of its checkpoints.")] = None,
    target: Annotated[float | None, typer.Option(help="Only circuits pruned to this target (default: all).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Circuits over training: per run, task and checkpoint step, the full model's task loss,
    the verdict, the circuit's nodes and edges, and the Jaccard overlap of its nodes with the
    run's circuit at the previous step."""
    from jobs import results as results_lib

    results_lib.check_store(uri, task=task)
    df = results_lib.over_training(uri, task=task, model=model, target=target)
    emit(df.drop(columns=["model_id", "prune_key"]) if getattr(fmt, "value", fmt) == "table" else df, fmt)
