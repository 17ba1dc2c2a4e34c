"""csp train: parse the flags, hand the run to jobs/train.py, print what it did."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP, TAKE_OVER_HELP, choice
from cli._progress import bar
from sparsity.config import (
    OPTIMIZERS,
    PLACEMENTS,
    ModelConfig,
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
    afrac: Annotated[float, typer.Option(help="AbsTopK activation fraction at all 8 locations (1 = off).")] = ModelConfig.afrac,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = TrainConfig.steps,
    batch: Annotated[int, typer.Option(help="Sequences per optimizer step.")] = TrainConfig.batch_size,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: csp's density rule, "
                                                  "LR_DENSE / sqrt(weight density); printed).")] = None,
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
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = TrainConfig.ckpt_every,
    milestones: Annotated[str | None, typer.Option(help="Checkpoints kept for good beside the last 2, for circuits over training: "
                                                   "a count (log-spaced from 1% of the run to its end) or steps, e.g. 100,500,2000.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (one process).")] = "auto",
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP); 1 = one process, no Ray.")] = 1,
    cpus_per_worker: Annotated[int, typer.Option(help="CPUs (and torch threads) each --workers worker holds.")] = 1,
    gpus: Annotated[bool, typer.Option("--gpus", help="One GPU per worker, NCCL (with --workers).")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for --workers (default: in-process Ray).")] = None,
    placement: Annotated[Placement, typer.Option(help="Where --workers go: spread (one per node where there is room, packed when not: "
                                                 "a run survives losing a node), strict_spread (one per node, or wait) or pack.")] = "spread",
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
    take_over: Annotated[bool, typer.Option("--take-over", help=TAKE_OVER_HELP)] = False,
) -> None:
    """Train a weight-sparse GPT; re-running the same command resumes from the last checkpoint."""
    if workers < 1:
        raise typer.BadParameter(f"--workers must be ≥ 1, got {workers}")
    if cpus_per_worker < 1:
        raise typer.BadParameter(f"--cpus-per-worker must be ≥ 1, got {cpus_per_worker}")
    if gpus and device == "cpu":
        raise typer.BadParameter("--gpus trains on GPUs and --device cpu on the CPU; drop one of them")
    from cluster import storage
    from jobs import train as train_job

    storage.check_writable(out)  # a read-only or unreachable --out fails before any compute
    cfg = train_job.build_config(data, n_ctx=n_ctx, n_layer=n_layer, d_model=d_model, n_head=n_head, d_head=d_head, afrac=afrac,
                                 sink=sink, bigram=bigram, pfrac=pfrac, ef=ef, ef_mlp=ef_mlp, steps=steps, batch_size=batch, lr=lr,
                                 optimizer=Optimizer(optimizer).value, seed=seed, eval_every=eval_every, ckpt_every=ckpt_every,
                                 milestones=milestones)
    if lr is None:
        typer.echo(cfg.lr_rule())
    if cost := train_job.milestone_cost(cfg):
        typer.echo(cost)
    if cfg.model.afrac and not gpus:
        from sparsity import abstopk

        if abstopk.backend() == "torch":  # the same result, ~5x slower on CPU: say so
            typer.echo("AbsTopK runs on torch ops on CPU (the C kernel is not built or CSP_ABSTOPK=torch is set); "
                       "reinstall csp where a C compiler is found for a ~5x faster forward")
    opts = dict(workers=workers, gpus=gpus, address=address, placement=Placement(placement).value, shared_fs=shared_fs, device=device,
                take_over=take_over, cpus_per_worker=cpus_per_worker)
    if train_job.distributed(workers, gpus, address):
        r = train_job.run(data, out, cfg, **opts)
    else:
        with _bar(steps) as progress:
            r = train_job.run(data, out, cfg, progress=progress, **opts)
    if r is None:
        typer.echo(f"{storage.resolve(out).uri} already finished {steps} steps; nothing to do")
        return
    on = f" on {r['workers']} workers" if r["workers"] > 1 else ""
    nz = f", {r['nonzeros']:,} nonzero weights" if r.get("nonzeros") else ""
    typer.echo(f"trained {r['step']} steps{on}: loss {r.get('loss', float('nan')):.4f}, val loss {r.get('val_loss', float('nan')):.4f}"
               f"{nz} → {r['out']}")


@contextlib.contextmanager
def _bar(steps: int):
    """A transient progress bar on stderr fed by the run's reports."""
    last: dict = {}
    with bar("train", total=steps, eta=True) as update:

        def progress(m: dict) -> None:
            last.update(m)
            info = f"loss {last.get('loss', float('nan')):.3f}"
            if "val_loss" in last:
                info += f" val {last['val_loss']:.3f}"
            info += f" L0 {last.get('l0', 1.0):.3f} {last.get('tokens_per_s', 0):,.0f} tok/s"
            update(m["step"], info=info)

        yield progress
