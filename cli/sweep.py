"""csp sweep: a Ray Tune grid over sparsity × width; csp sweep status: its summary."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP, TAKE_OVER_HELP, Format, choice, emit, group, table_text
from sparsity.config import OPTIMIZERS, ModelConfig, TrainConfig

Optimizer = choice("Optimizer", OPTIMIZERS)

app = group("Sweep pfrac × ef (× afrac × seed) on Ray Tune, each trial a distributed training run.")
app.info.invoke_without_command = True
app.info.no_args_is_help = False


@app.callback()
def run(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Token shards from `csp data prepare`.")] = None,
    out: Annotated[str | None, typer.Option(help="Sweep directory (path or s3://).")] = None,
    grid: Annotated[str, typer.Option(help="Axes separated by ';', values by ',': 'pfrac=0.25,0.5;ef=1,2'.")] = "pfrac=0.25,0.5;ef=1,2",
    steps: Annotated[int, typer.Option(help="Optimizer steps per trial.")] = TrainConfig.steps,
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = TrainConfig.batch_size,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of every trial (default: csp's density rule, "
                                                  "LR_DENSE / sqrt(each trial's weight density); a grid lr axis wins).")] = None,
    optimizer: Annotated[Optimizer, typer.Option(help="adam (the paper's recipe) or muon (Muon on the block matrices, Adam on the rest).")] = TrainConfig.optimizer,
    n_layer: Annotated[int, typer.Option(help="Transformer blocks.")] = ModelConfig.n_layer,
    d_model: Annotated[int, typer.Option(help="Base width (ef multiplies it).")] = ModelConfig.d_model,
    n_head: Annotated[int, typer.Option(help="Base heads (ef multiplies them).")] = ModelConfig.n_head,
    n_ctx: Annotated[int | None, typer.Option(help="Context (default: the data's).")] = None,
    milestones: Annotated[str | None, typer.Option(help="Checkpoints every trial keeps for good beside the last 2: a count "
                                                   "(log-spaced from 1% of the run to its end) or steps, e.g. 100,500,2000.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha: stop trials whose val loss trails the others' part-way (Tune's ASHA); "
                                                  "stopped trials are marked in the summary and skipped by `csp prune`.")] = None,
    grace_period: Annotated[int | None, typer.Option(help="With --scheduler asha: steps before a trial can be stopped (default: a quarter of --steps).")] = None,
    reduction_factor: Annotated[int, typer.Option(help="With --scheduler asha: each rung keeps 1 in this many trials.")] = 2,
    workers_per_trial: Annotated[int, typer.Option(help="Ray Train workers per trial.")] = 1,
    gpus: Annotated[bool, typer.Option("--gpus", help="One GPU per worker.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: in-process Ray).")] = None,
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
    take_over: Annotated[bool, typer.Option("--take-over", help=TAKE_OVER_HELP)] = False,
) -> None:
    """Run (or resume) a sweep; a finished sweep trains nothing and reprints its summary."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None or out is None:
        raise typer.BadParameter("csp sweep needs --data and --out (or the subcommand `status URI`)")
    if workers_per_trial < 1:
        raise typer.BadParameter(f"--workers-per-trial must be ≥ 1, got {workers_per_trial}")
    from cluster import runtime, storage
    from jobs import sweep as sweep_job

    parsed = sweep_job.parse_grid(grid)
    storage.check_writable(out)  # a read-only or unreachable --out fails before Ray starts
    base, train = sweep_job.build_configs(data, parsed, n_ctx=n_ctx, n_layer=n_layer, d_model=d_model, n_head=n_head, steps=steps,
                                          batch_size=batch, lr=lr, optimizer=Optimizer(optimizer).value, milestones=milestones,
                                          evals=8 if scheduler else 4)
    sweep_job.check_scheduler(scheduler, workers_per_trial, train, grace_period, reduction_factor)  # before Ray starts
    if train.milestones:
        from jobs import train as train_job
        from sparsity.config import RunConfig

        n = len(sweep_job.points(parsed))  # per trial at the base width; wider trials take more
        typer.echo(f"each trial: {train_job.milestone_cost(RunConfig(model=base, train=train))} at the base width; {n} trials")
    runtime.init(address=address, num_cpus=None if address else max(workers_per_trial + 1, os.cpu_count() or 1),
                 storage={"--data": data, "--out": out}, shared_fs=shared_fs, state_api=True,
                 log_to_driver=False)  # no line per report from every trial's workers; failures still raise here
    df = sweep_job.run_sweep(data, out, parsed, base, train, workers_per_trial=workers_per_trial, gpus=gpus, take_over=take_over,
                             density_lr=lr is None, scheduler=scheduler, grace_period=grace_period, reduction_factor=reduction_factor)
    _print(df)


@app.command()
def status(
    uri: Annotated[str, typer.Argument(help="A sweep directory.")],
    fmt: Annotated[Format, typer.Option("--format", help="Output format (csv and json carry every column).")] = "table",
) -> None:
    """The sweep summary: one row per trial."""
    from jobs import sweep as sweep_job

    _print(sweep_job.read_summary(uri), fmt)


def _print(df, fmt="table") -> None:
    cols = ["trial", "pfrac", "ef", "d_model", "steps", "final_loss", "val_loss", "nonzeros", "wall_seconds"]
    shown = df[cols].copy()
    if "milestones" in df and df["milestones"].map(lambda m: m is not None and len(m) > 0).any():
        shown["milestones"] = df["milestones"].map(_milestones)
    if "stopped_at" in df and df["stopped_at"].notna().any():
        shown["stopped_at"] = df["stopped_at"]
    emit(df, fmt, table=table_text(shown, float_format=lambda v: f"{v:.4g}"))


def _milestones(m) -> str:
    """A trial's kept milestone steps in a table cell: '6: 28 … 2800'."""
    m = [] if m is None else list(m)
    return "—" if not m else f"{len(m)}: {m[0]}" + (f" … {m[-1]}" if len(m) > 1 else "")
