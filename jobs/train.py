"""The train workflow behind `csp train`: one RunConfig from the user's choices, then one
run — in this process, or on Ray Train workers (in-process Ray or a cluster) — resumed
from its last checkpoint, or nothing when it already finished."""

from __future__ import annotations

import os
from collections.abc import Callable

from cluster import data, storage
from sparsity.config import ModelConfig, RunConfig, TrainConfig, milestone_steps


def build_config(data_uri: str, *, n_ctx: int | None = None, n_layer: int = ModelConfig.n_layer, d_model: int = ModelConfig.d_model,
                 n_head: int = ModelConfig.n_head, d_head: int = ModelConfig.d_head, afrac: float | None = ModelConfig.afrac,
                 sink: bool = False, bigram: bool = False, pfrac: float = 0.125, ef: float = 1.0, ef_mlp: float | None = None,
                 lr: float | None = None, milestones: str | None = None, **train) -> RunConfig:
    """The RunConfig of one run on ``data_uri`` (its context unless ``n_ctx``); ``afrac``
    as :meth:`ModelConfig.afrac_or_off` reads it (1 or None: AbsTopK off); ``lr`` None takes csp's density rule
    (sparsity.config.density_lr); ``milestones`` as ``--milestones`` spells it
    (sparsity.config.milestone_steps); ``train`` are the other TrainConfig fields."""
    if milestones:
        train["milestones"] = milestone_steps(milestones, train.get("steps", TrainConfig.steps))
    ctx = n_ctx or data.read_manifest(data_uri)["n_ctx"]
    base = ModelConfig.gpt(d_model, block_size=ctx, n_layer=n_layer, n_head=n_head, d_head=d_head,
                           afrac=ModelConfig.afrac_or_off(afrac), sink=sink,
                           enable_bigram_table=bigram, learnable_bigram_table=bigram)
    cfg = RunConfig.at_width(base, TrainConfig(**train, **({} if lr is None else {"lr": lr})), pfrac=pfrac, ef=ef, ef_mlp=ef_mlp)
    return cfg.with_density_lr() if lr is None else cfg


def milestone_cost(cfg: RunConfig) -> str | None:
    """One line on what a run's milestones keep, and the storage they take (None: none)."""
    ms = cfg.train.milestones
    if not ms:
        return None
    import torch

    from sparsity.model import GPT

    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(cfg.model).parameters())
    each = 4 * n  # fp32 weights; the optimizer state is dropped once a milestone is not among the last 2 checkpoints
    steps = ", ".join(map(str, ms[:8])) + (f", … ({len(ms)} in all)" if len(ms) > 8 else "")
    return (f"keeping {len(ms)} milestone checkpoint{'s' if len(ms) > 1 else ''} (steps {steps}) beside the last 2: "
            f"~{each / 1e6:.1f} MB each (weights and config), ~{len(ms) * each / 1e6:.1f} MB in all")


def distributed(workers: int = 1, gpus: bool = False, address: str | None = None) -> bool:
    """Whether a run goes to Ray Train (several workers, GPUs or a cluster) rather than
    this process."""
    return workers > 1 or bool(address) or gpus


def run(data_uri: str, out_uri: str, cfg: RunConfig, *, workers: int = 1, gpus: bool = False, address: str | None = None,
        placement: str = "spread", shared_fs: bool = False, device: str = "auto",
        progress: Callable[[dict], None] | None = None, take_over: bool = False, cpus_per_worker: int = 1) -> dict | None:
    """Train (or resume) the run; None when it had already finished. Without workers,
    GPUs or an address it runs here with ``progress`` per report; otherwise on Ray Train.
    Returns step, workers and the final metrics (loss, val_loss, nonzeros…)."""
    if distributed(workers, gpus, address):
        from cluster import ray_train, runtime

        runtime.init(address=address, num_cpus=None if address else max(workers * cpus_per_worker + 1, os.cpu_count() or 1),
                     storage={"--data": data_uri, "--out": out_uri}, shared_fs=shared_fs, state_api=True,
                     log_to_driver=False)  # no line per report from every worker; failures still raise here
        result = ray_train.train_distributed(data_uri, out_uri, cfg, workers=workers, use_gpu=gpus, placement=placement,
                                             take_over=take_over, cpus_per_worker=cpus_per_worker)
        if result is None:
            return None
        m = dict(result.metrics or {})
        return {**m, "step": m.get("step", cfg.train.steps), "workers": workers, "out": storage.resolve(out_uri).uri}
    from cluster import local_train

    result = local_train.train_local(data_uri, out_uri, cfg, device=device, progress=progress, take_over=take_over)
    if result is None:
        return None
    return {**result.metrics, "step": result.step, "workers": 1, "out": storage.resolve(out_uri).uri}
