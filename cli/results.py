"""csp results …: query the circuit tables with filter pushdown; the frontier."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import Format, emit, group

app = group("Query stored circuits (pandas + pyarrow filter pushdown on the task partition).")
def _emit(df, fmt) -> None:
    emit(df, fmt)


@app.command()
def circuits(
    uri: Annotated[str, typer.Argument(help="Results URI given to `csp prune --out`.")],
    task: Annotated[str | None, typer.Option(help="Only this task (partition pruning).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model id.")] = None,
    target: Annotated[float | None, typer.Option(help="Only circuits pruned to this target (a run stores one row per target; default: all).")] = None,
    where: Annotated[str | None, typer.Option(help="A pandas query on the rows, e.g. 'n_edges < 100 and status == \"ok\"'.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
    all_columns: Annotated[bool, typer.Option("--all-columns", help="Every column, not the summary ones.")] = False,
    all_rows: Annotated[bool, typer.Option("--all", help="Every row: unverified circuits, verdicts and controls too (default: verified circuits only).")] = False,
) -> None:
    """Verified circuits, one row per (checkpoint, task, pruning config); --all for every row."""
    from jobs import results as results_lib

    results_lib.check_store(uri, task=task, model=model)
    df = results_lib.at_target(results_lib.circuits(uri, task=task, model=model), target)
    if not all_rows:
        df = results_lib.verified(df)
    if where:
        try:
            df = df.query(where)
        except Exception as e:  # pandas raises many types for a bad expression
            raise typer.BadParameter(f"--where {where!r}: {type(e).__name__}: {e}") from None
    if not all_columns:
        df = df[["model_id", "task", "target", "control", "status", "n_nodes", "n_edges", "full_loss", "sufficiency_loss",
                 "random_keep_best", "beats_random_keep", "partial_ablation_loss", "necessity_loss", "necessity_random_loss",
                 "ablation", "prune_key", "pfrac", "ef"]]
    _emit(df, fmt)


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
    _emit(results_lib.controls(uri, task=task), fmt)


@app.command()
def frontier(
    uri: Annotated[str, typer.Argument(help="Results URI.")],
    target: Annotated[float | None, typer.Option(help="Only circuits pruned to this target (default: a row per model and target).")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Per model: val loss (capability) vs geometric-mean circuit edges over tasks (interpretability)."""
    from jobs import results as results_lib

    results_lib.check_store(uri)
    _emit(results_lib.frontier(uri, target), fmt)
