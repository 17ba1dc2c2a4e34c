"""csp train: train one weight-sparse GPT from token shards (one process)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP, choice
from sparsity.config import (
    OPTIMIZERS,
    PLACEMENTS,
    ModelConfig,
    RunConfig,
    SparsityConfig,
    TrainConfig,
)

Optimizer = choice("Optimizer", OPTIMIZERS)
Placement = choice("Placement", PLACEMENTS)


def train(
    data: Annotated[str, typer.Option(help="Token shards from `csp data prepare` (path or s3://).")],
    out: Annotated[str, typer.Option(help="Run directory for checkpoints and metrics (path or s3://).")],
    pfrac: Annotated[float, typer.Option(help="Weight density at ef=1; each matrix keeps pfrac/(ef·ef_mlp). 1 = dense.")] = SparsityConfig.pfrac,
    ef: Annotated[float, typer.Option(help="Width multiplier of d_model, n_head and d_mlp over the base shape.")] = 1.0,
    ef_mlp: Annotated[float | None, typer.Option(help="Separate width multiplier for d_mlp (default: ef).")] = None,
    afrac: Annotated[float, typer.Option(help="AbsTopK activation fraction at all 8 locations (1 = off).")] = 0.25,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = TrainConfig.steps,
    batch: Annotated[int, typer.Option(help="Sequences per optimizer step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = TrainConfig.lr,
    optimizer: Annotated[Optimizer, typer.Option(help="adam (the paper's recipe) or muon (Muon on the block matrices, Adam on the rest).")] = TrainConfig.optimizer,
    n_layer: Annotated[int, typer.Option(help="Transformer blocks.")] = ModelConfig.n_layer,
    d_model: Annotated[int, typer.Option(help="Base residual width (before ef).")] = ModelConfig.d_model,
    n_head: Annotated[int, typer.Option(help="Base attention heads (before ef).")] = ModelConfig.n_head,
    d_head: Annotated[int, typer.Option(help="Width of each head.")] = ModelConfig.d_head,
    n_ctx: Annotated[int | None, typer.Option(help="Context length (default: the data's n_ctx).")] = None,
    sink: Annotated[bool, typer.Option(help="Per-head attention sink.")] = False,
    bigram: Annotated[bool, typer.Option(help="Learnable dense bigram logit table.")] = False,
    seed: Annotated[int, typer.Option(help="Initialisation and data-order seed.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between validation losses.")] = TrainConfig.eval_every,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = TrainConfig.ckpt_every,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (one process).")] = "auto",
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP); 1 = one process, no Ray.")] = 1,
    gpus: Annotated[bool, typer.Option("--gpus", help="One GPU per worker, NCCL (with --workers).")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for --workers (default: in-process Ray).")] = None,
    placement: Annotated[Placement, typer.Option(help="Where --workers go: spread (one per node where there is room, packed when not: "
                                                 "a run survives losing a node), strict_spread (one per node, or wait) or pack.")] = "spread",
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
) -> None:
    """Train a weight-sparse GPT; re-running the same command resumes from the last checkpoint."""
    if not 0 < afrac <= 1:
        raise typer.BadParameter(f"--afrac must be in (0, 1] (1 = no activation sparsity), got {afrac}")
    from cluster import data as data_lib
    from cluster import storage, training

    storage.resolve(out)
    ctx = n_ctx or data_lib.read_manifest(data)["n_ctx"]
    base = ModelConfig(block_size=ctx, n_layer=n_layer, d_model=d_model, n_head=n_head, d_head=d_head, d_mlp=4 * d_model,
                       afrac=None if afrac >= 1.0 else afrac, sink=sink,
                       enable_bigram_table=bigram, learnable_bigram_table=bigram)
    cfg = RunConfig(
        model=base.scaled(ef, ef_mlp),
        sparsity=SparsityConfig(pfrac=pfrac, ef=ef, ef_mlp=ef_mlp),
        train=TrainConfig(steps=steps, batch_size=batch, lr=lr, optimizer=Optimizer(optimizer).value, seed=seed, eval_every=eval_every, ckpt_every=ckpt_every),
    )
    if workers < 1:
        raise typer.BadParameter(f"--workers must be ≥ 1, got {workers}")
    if workers > 1 or address or gpus:
        from cluster import runtime, trainer

        runtime.init(address=address, num_cpus=None if address else max(workers + 1, os.cpu_count() or 1),
                     storage={"--data": data, "--out": out}, shared_fs=shared_fs, state_api=True,
                     log_to_driver=False)  # no line per report from every worker; failures still raise here
        result = trainer.train_distributed(data, out, cfg, workers=workers, use_gpu=gpus, placement=Placement(placement).value)
        loc = storage.resolve(out)
        if result is None:
            typer.echo(f"{loc.uri} already finished {steps} steps; nothing to do")
            return
        m = result.metrics or {}
        typer.echo(f"trained {m.get('step', steps)} steps on {workers} workers: loss {m.get('loss', float('nan')):.4f}, "
                   f"val loss {m.get('val_loss', float('nan')):.4f} → {loc.uri}")
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    last: dict = {}
    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task("train", total=steps, info="")

        def progress(m: dict) -> None:
            last.update(m)
            info = f"loss {last.get('loss', float('nan')):.3f}"
            if "val_loss" in last:
                info += f" val {last['val_loss']:.3f}"
            info += f" L0 {last.get('l0', 1.0):.3f} {last.get('tokens_per_s', 0):,.0f} tok/s"
            p.update(task, completed=m["step"], info=info)

        result = training.train_local(data, out, cfg, device=device, progress=progress)
    loc = storage.resolve(out)
    if result is None:
        typer.echo(f"{loc.uri} already finished {steps} steps; nothing to do")
        return
    m = result.metrics
    typer.echo(f"trained {result.step} steps: loss {m.get('loss', float('nan')):.4f}, val loss {m.get('val_loss', float('nan')):.4f}, "
               f"{m.get('nonzeros', 0):,} nonzero weights → {loc.uri}")
