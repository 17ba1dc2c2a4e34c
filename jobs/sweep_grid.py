"""A sweep's points: the grid as `csp sweep --grid` spells it, each point's training config,
and its trial's name and run directory (SWEEP/runs/<trial>/). jobs/sweep.py runs them."""

from __future__ import annotations

import dataclasses
import itertools

from cluster import data, storage
from sparsity.config import (
    LR_DENSE,
    ModelConfig,
    RunConfig,
    SparsityConfig,
    TrainConfig,
    milestone_steps,
)
from sparsity.errors import ConfigError, CspError

RUNS = "runs"  # SWEEP/runs/<trial>/: each trial's run directory


AXES = {"pfrac": float, "ef": float, "afrac": float, "lr": float, "seed": int}


class SweepError(CspError):
    pass


def parse_grid(text: str) -> dict[str, list]:
    """'pfrac=0.25,0.5;ef=1,2' → {'pfrac': [0.25, 0.5], 'ef': [1.0, 2.0]}."""
    grid: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep:
            raise SweepError(f"bad grid axis {part!r}: write key=v1,v2 (axes separated by ';')")
        if key not in AXES:
            raise SweepError(f"unknown grid key {key!r}; choose from {', '.join(AXES)}")
        if key in grid:
            raise SweepError(f"grid key {key!r} appears twice")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise SweepError(f"grid key {key!r} has no values")
        try:
            grid[key] = [AXES[key](v) for v in items]
        except ValueError:
            raise SweepError(f"grid key {key!r}: {values!r} are not all {AXES[key].__name__}s") from None
    if not grid:
        raise SweepError("empty grid: give at least one axis, e.g. 'pfrac=0.25,0.5;ef=1,2'")
    return grid


def trial_name(point: dict, cfg: RunConfig) -> str:
    """A trial's name, from what its run is: ``d<width>-<density>`` then the point's other
    axes — ``-a<afrac>`` (``-aoff``), ``-lr<lr>``, ``-s<seed>`` — when the point sets them.
    Density is ``dense`` or ``p1_<n>`` for 1/n (else ``p<fraction>``). E.g. ``d128-dense``,
    ``d128-p1_8``, ``d64-dense-lr0.03-s1``. ``cfg`` is the point's :func:`trial_config`."""
    d = cfg.sparsity.l0frac
    inv = 1 / d
    density = "dense" if cfg.sparsity.dense else f"p1_{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"p{d:.4g}"
    parts = [f"d{cfg.model.d_model}", density]
    if "afrac" in point:
        parts.append("aoff" if cfg.model.afrac is None else f"a{cfg.model.afrac:g}")
    if "lr" in point:
        parts.append(f"lr{point['lr']:g}")
    if "seed" in point:
        parts.append(f"s{point['seed']}")
    return "-".join(parts)


def legacy_trial_name(point: dict) -> str:
    """The name sweeps before readable names gave a trial (``pfrac=0.5_ef=2_lr=0.0424``):
    resuming such a sweep keeps its trials under their names."""
    return "_".join(f"{k}={point[k]:g}" for k in AXES if k in point)


def trial_names(sweep_uri: str, pts: list[dict], cfgs: list[RunConfig]) -> list[str]:
    """Each point's trial name in the sweep at ``sweep_uri``: :func:`trial_name`, or the
    :func:`legacy_trial_name` its run already has there. Two points that would share a name
    (the same run twice) are refused naming both."""
    from cluster import checkpoints

    sweep = storage.resolve(sweep_uri)
    names, seen = [], {}
    for p, cfg in zip(pts, cfgs, strict=True):
        old = legacy_trial_name(p)
        name = old if storage.exists(sweep.join("trials", f"{old}.json")) or storage.exists(run_loc(sweep, old).join(checkpoints.RUN_FILE)) \
            else trial_name(p, cfg)
        if name in seen:
            raise SweepError(f"grid points {seen[name]} and {p} are the same run ({name}); drop one of them")
        seen[name] = p
        names.append(name)
    return names


def trial_config(base: ModelConfig, train: TrainConfig, point: dict, density_lr: bool = False,
                 sparsity: dict | None = None) -> RunConfig:
    """The RunConfig of one grid point: width scaled by ef, density pfrac/ef², and the
    sweep-wide ``sparsity`` settings (other SparsityConfig fields, e.g. ``anneal_end``). Its
    lr: the point's own, else with ``density_lr`` csp's density rule
    (sparsity.config.density_lr, from ``train.optimizer``), else ``train.lr``."""
    if "afrac" in point:
        base = dataclasses.replace(base, afrac=ModelConfig.afrac_or_off(point["afrac"]))
    tc = dataclasses.replace(train, seed=point.get("seed", train.seed), lr=point.get("lr", train.lr))
    cfg = RunConfig.at_width(base, tc, pfrac=point.get("pfrac", SparsityConfig.pfrac), ef=point.get("ef", 1.0), **(sparsity or {}))
    return cfg.with_density_lr() if density_lr and "lr" not in point else cfg


def build_configs(data_uri: str, grid: dict[str, list], *, n_ctx: int | None = None, n_layer: int = ModelConfig.n_layer,
                  d_model: int = ModelConfig.d_model, n_head: int = ModelConfig.n_head, steps: int = TrainConfig.steps,
                  batch_size: int = TrainConfig.batch_size, lr: float | None = None,
                  optimizer: str = TrainConfig.optimizer, milestones: str | None = None, evals: int = 4) -> tuple[ModelConfig, TrainConfig]:
    """The base model and training config of `csp sweep` on ``data_uri`` (its context unless
    ``n_ctx``), with every point of ``grid`` checked to make a valid run first (a bad point
    is refused naming it, before Ray starts). ``lr`` None: each trial takes csp's density
    rule (pass ``density_lr=lr is None`` to :func:`run_sweep`); ``evals`` evaluations (a
    scheduler judges trials at them) and 4 checkpoints per trial, and the ``milestones`` kept
    (``--milestones``, see sparsity.config.milestone_steps)."""
    ctx = n_ctx or data.read_manifest(data_uri)["n_ctx"]
    base = ModelConfig.gpt(d_model, block_size=ctx, n_layer=n_layer, n_head=n_head)
    every = max(1, steps // 4)
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr or LR_DENSE[optimizer], optimizer=optimizer, ckpt_every=every,
                        eval_every=max(1, steps // evals), milestones=milestone_steps(milestones, steps) if milestones else ())
    for p in points(grid):
        try:
            trial_config(base, train, p, density_lr=lr is None)
        except ConfigError as e:
            raise ConfigError(f"--grid point {';'.join(f'{k}={v}' for k, v in p.items())}: {e}") from None
    return base, train


def points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_loc(sweep, trial: str) -> storage.Location:
    """A trial's run directory inside a sweep."""
    return storage.resolve(sweep).join(RUNS, trial)
