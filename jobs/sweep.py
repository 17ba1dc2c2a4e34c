"""Sweeps: a Ray Tune grid over pfrac × ef (× afrac × lr × seed), each trial one training run.

A one-worker trial trains inside its Tune trial process (cluster/local_train.py) with the
CPUs (or the GPU) the trial holds; Tune reuses that process for the next trial, which then
skips the imports and, for the same dataset, the rows already read. A trial of N > 1
workers builds and fits a TorchTrainer (Ray 2.60's way), whose controller and worker group
start per trial. Measured per trial outside its steps (benchmarks/distributed.py, 2 CPU
cores): 23 s through a one-worker TorchTrainer; in the trial process 9.6 s for the first
trial and 2.6 s for each later one.

    SWEEP/sweep.json                    the grid and base config
    SWEEP/runs/<trial>/…                each trial's run directory (checkpoints, metrics)
    SWEEP/metrics/trial=<trial>/metrics.parquet   per-step metrics of every trial
    SWEEP/summary.parquet               one row per trial

A trial whose run already finished trains nothing, so re-running a finished sweep only
rebuilds the summary. Concurrency is bounded by the cluster: a one-worker trial needs one
CPU (torch runs on one thread), a trial of N workers one CPU per worker plus one for its
Train controller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable

import pyarrow as pa

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

AXES = {"pfrac": float, "ef": float, "afrac": float, "lr": float, "seed": int}

SUMMARY_SCHEMA = pa.schema([
    pa.field("trial", pa.string(), nullable=False),
    pa.field("pfrac", pa.float64()),
    pa.field("ef", pa.float64()),
    pa.field("afrac", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("lr", pa.float64()),
    pa.field("d_model", pa.int64()),
    pa.field("density", pa.float64()),  # of every block matrix (SparsityConfig.l0frac); absent in sweeps before it
    pa.field("steps", pa.int64()),
    pa.field("final_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("nonzeros", pa.int64()),
    pa.field("tokens_seen", pa.int64()),
    pa.field("wall_seconds", pa.float64()),
    pa.field("checkpoint_uri", pa.string()),
    pa.field("milestones", pa.list_(pa.int64())),  # milestone steps whose checkpoints the run keeps (absent in sweeps before them)
])

METRICS_SCHEMA = pa.schema([
    pa.field("trial", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("l0", pa.float64()),
    pa.field("nonzeros", pa.int64()),
    pa.field("tokens_per_s", pa.float64()),
])


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
                  optimizer: str = TrainConfig.optimizer, milestones: str | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The base model and training config of `csp sweep` on ``data_uri`` (its context unless
    ``n_ctx``), with every point of ``grid`` checked to make a valid run first (a bad point
    is refused naming it, before Ray starts). ``lr`` None: each trial takes csp's density
    rule (pass ``density_lr=lr is None`` to :func:`run_sweep`); 4 evaluations and 4
    checkpoints per trial, and the ``milestones`` kept (``--milestones``, see
    sparsity.config.milestone_steps)."""
    ctx = n_ctx or data.read_manifest(data_uri)["n_ctx"]
    base = ModelConfig.gpt(d_model, block_size=ctx, n_layer=n_layer, n_head=n_head)
    every = max(1, steps // 4)
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr or LR_DENSE[optimizer], optimizer=optimizer, ckpt_every=every,
                        eval_every=every, milestones=milestone_steps(milestones, steps) if milestones else ())
    for p in points(grid):
        try:
            trial_config(base, train, p, density_lr=lr is None)
        except ConfigError as e:
            raise ConfigError(f"--grid point {';'.join(f'{k}={v}' for k, v in p.items())}: {e}") from None
    return base, train


def points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


SUMMARY = "summary.parquet"  # SWEEP/summary.parquet: one row per trial
RUNS = "runs"  # SWEEP/runs/<trial>/: each trial's run directory
TIMINGS_FILE = "timings.json"  # SWEEP/runs/<trial>/timings.json: wall-clock marks of the trial (start, fit end, summary end)


def run_loc(sweep, trial: str) -> storage.Location:
    """A trial's run directory inside a sweep."""
    return storage.resolve(sweep).join(RUNS, trial)


def is_sweep(uri: str) -> bool:
    """Whether ``uri`` is a sweep directory (a summary beside its runs/), not a run, a
    checkpoint or a demo directory (whose summary.parquet is its models table)."""
    loc = storage.resolve(uri)
    return storage.exists(loc.join(SUMMARY)) and storage.exists(loc.join(RUNS))


def _run_trial(config: dict) -> None:
    """The Tune trial: one distributed training run, then its metrics and summary row."""
    from ray import tune

    from cluster import local_train, ray_train

    cfg = RunConfig.from_dict(config["cfg"])
    sweep = storage.resolve(config["sweep"])
    name = config["trial"]
    out = run_loc(sweep, name)
    t0, t_start = time.perf_counter(), time.time()
    owner = f"{config['owner']}:{name}"  # a retried trial re-takes its run's lease
    marks: dict = {}
    if config["workers"] == 1:
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        local_train.train_local(config["data"], out.uri, cfg, device="cuda" if config["gpus"] else "cpu", owner=owner,
                                keep_rows=True, marks=marks)
    else:
        ray_train.train_distributed(config["data"], out.uri, cfg, workers=config["workers"], use_gpu=config["gpus"], owner=owner)
    t_fit = time.time()
    row = summarize_trial(sweep, name, config["point"], cfg, time.perf_counter() - t0)
    # wall-clock marks of the trial's phases (with RUN/placement's): benchmarks/distributed.py
    storage.write_json(out.join(TIMINGS_FILE), {"t_trial_start": t_start, **marks, "t_fit_end": t_fit, "t_summary_end": time.time()})
    tune.report({k: v for k, v in row.items() if isinstance(v, int | float) and v is not None})


def summarize_trial(sweep, name: str, point: dict, cfg: RunConfig, wall: float) -> dict:
    from cluster import checkpoints

    out = run_loc(sweep, name)
    ckpt = checkpoints.load(out.uri, with_train_state=False)
    history = checkpoints.read_metrics(out.uri)
    rows = [{"trial": name, **{f.name: m.get(f.name) for f in METRICS_SCHEMA if f.name != "trial"}} for m in history]
    storage.write_parquet(sweep.join("metrics", f"trial={name}", "metrics.parquet"),
                          pa.Table.from_pylist([{k: v for k, v in r.items() if k != "trial"} for r in rows],
                                               schema=pa.schema([f for f in METRICS_SCHEMA if f.name != "trial"])))
    meta = ckpt.meta.get("metrics", {})
    summary = {
        "trial": name, "pfrac": cfg.sparsity.pfrac, "ef": cfg.sparsity.ef, "afrac": cfg.model.afrac, "seed": cfg.train.seed,
        "lr": cfg.train.lr, "d_model": cfg.model.d_model, "density": cfg.sparsity.l0frac, "steps": ckpt.step, "final_loss": meta.get("loss"), "val_loss": meta.get("val_loss"),
        "nonzeros": meta.get("nonzeros"), "tokens_seen": ckpt.step * cfg.train.batch_size * cfg.model.block_size,
        "wall_seconds": wall, "checkpoint_uri": checkpoints.checkpoint_dir(out.uri),
        "milestones": [m for m in checkpoints.steps(out.uri) if m in cfg.train.milestones],
    }
    storage.write_json(sweep.join("trials", f"{name}.json"), summary)
    return summary


def run_sweep(data_uri: str, sweep_uri: str, grid: dict[str, list] | None, base: ModelConfig, train: TrainConfig,
              workers_per_trial: int = 1, gpus: bool = False, extra_points: list[dict] | None = None, take_over: bool = False,
              density_lr: bool = False, sparsity: dict | None = None):
    """Run (or resume) a sweep; returns the summary as a pandas DataFrame.

    The sweep directory has one writer at a time (SWEEP/lease.json, held while this runs;
    ``take_over`` displaces a writer whose heartbeat stopped); each trial's run directory
    has its own lease, held by the trial.

    ``extra_points`` are trials beside (or instead of) the grid, e.g. a dense baseline
    ``{"pfrac": 4, "ef": 2}`` (pfrac = ef² is dense at that width), or points with their
    own ``lr``. ``density_lr``: trials without an lr of their own take csp's density rule.
    ``sparsity``: SparsityConfig fields for every trial besides pfrac and ef.

    A sweep directory holds one sweep: resuming it with another base, training or sparsity
    config is refused (its trials would be skipped as done while meaning something else)."""
    from ray import tune

    from cluster import local_train, runtime

    pts = points(grid) if grid else []
    pts += [p for p in (extra_points or []) if p not in pts]
    if not pts:
        raise SweepError("nothing to train: give a grid or extra points")
    sweep = storage.resolve(sweep_uri)
    configs = [trial_config(base, train, p, density_lr, sparsity) for p in pts]  # validates every point
    names = trial_names(sweep.uri, pts, configs)
    cfgs = dict(zip(names, configs, strict=True))
    point_of = dict(zip(names, pts, strict=True))
    data_uri = storage.resolve(data_uri).uri  # absolute: a trial runs in Tune's working directory, not this one
    record = {"base": dataclasses.asdict(base), "train": RunConfig(train=train).to_dict()["train"], "sparsity": sparsity or {}}
    _check_same_sweep(sweep, record)
    need = 1 if workers_per_trial == 1 else workers_per_trial + 1
    cpus = runtime.cluster_cpus()
    if cpus < need:
        raise SweepError(f"each trial needs {need} CPUs ({workers_per_trial} workers + a controller); the cluster declares {cpus:g}")
    if gpus and workers_per_trial == 1 and runtime.cluster_gpus() < 1:
        raise SweepError("--gpus: each trial needs a GPU and the cluster declares none")
    with local_train.run_lease(sweep, "csp sweep", take_over) as held:
        owner = held.owner  # trials get the id (a str: the lease itself stays in this process)
        storage.write_json(sweep.join("sweep.json"), {"grid": grid or {}, "extra_points": extra_points or [], **record, "data": data_uri,
                                                       "workers_per_trial": workers_per_trial})
        todo = [n for n in names if not storage.exists(sweep.join("trials", f"{n}.json"))]
        if todo:
            space = {"trial": tune.grid_search(todo)}

            def trial_fn(config: dict) -> None:
                name = config["trial"]
                _run_trial({"trial": name, "point": point_of[name], "cfg": cfgs[name].to_dict(), "data": data_uri,
                            "sweep": sweep.uri, "workers": workers_per_trial, "gpus": gpus, "owner": owner})

            tune_store = sweep.join("tune")
            tuner = tune.Tuner(
                # one worker: the trial trains itself; more: it only drives its TorchTrainer
                tune.with_resources(trial_fn, {"CPU": 1, "GPU": int(gpus)} if workers_per_trial == 1 else {"CPU": 0.01}),
                param_space=space,
                # the next trial runs in a finished trial's process: no process start, no imports, rows kept
                tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(cpus // need)), reuse_actors=True),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=tune_store.uri if not sweep.is_s3 else tune_store.path,
                    storage_filesystem=tune_store.pa_fs if sweep.is_s3 else None,
                    failure_config=tune.FailureConfig(max_failures=1),
                    verbose=0,
                ),
            )
            results = tuner.fit()
            errors = [r.error for r in results if r.error is not None]
            if errors:
                raise SweepError(f"{len(errors)} trial(s) failed; first: {type(errors[0]).__name__}: {str(errors[0]).splitlines()[0][:200]}")
        return write_summary(sweep_uri)


def _check_same_sweep(sweep: storage.Location, record: dict) -> None:
    """SweepError naming the first setting that differs from the sweep already stored here."""
    loc = sweep.join("sweep.json")
    if not storage.exists(loc):
        return
    old = storage.read_json(loc)
    for part in ("base", "train", "sparsity"):
        before, now = old.get(part, {}), record[part]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                raise SweepError(f"{sweep.uri} holds a sweep with {part}.{key}={before.get(key)!r}, not {now.get(key)!r}; "
                                 "resume it with its own settings, or give another --out")


def write_summary(sweep_uri: str):
    sweep = storage.resolve(sweep_uri)
    rows = [storage.read_json(u) for u in storage.ls(sweep.join("trials"), suffix=".json")]
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    storage.write_parquet(sweep.join(SUMMARY), table)
    return table.to_pandas()


def read_summary(sweep_uri: str):
    loc = storage.resolve(sweep_uri).join(SUMMARY)
    if not storage.exists(loc):
        raise SweepError(f"no sweep summary at {storage.resolve(sweep_uri).uri}; run `csp sweep --out {storage.resolve(sweep_uri).uri}` first")
    return storage.read_parquet(loc).to_pandas()


def _runs(sw) -> list[str]:
    """The run directories under a sweep's runs/ that have checkpointed (``RUN/checkpoints/latest.json``)."""
    from cluster import checkpoints

    tail = f"/{checkpoints.CHECKPOINTS}/{checkpoints.LATEST}"
    return sorted(u[: -len(tail)] for u in storage.ls(storage.resolve(sw).join(RUNS), suffix=checkpoints.LATEST) if u.endswith(tail))


@contextlib.contextmanager
def watch_steps(sw, pts: list[dict], steps: int, progress: Callable[[int, int], None] | None, every: float = 5.0):
    """While the sweep of ``pts`` trains, report the steps checkpointed over all its trials
    (each run's ``checkpoints/latest.json`` under ``SWEEP/runs/``), from a polling thread:
    Tune itself stays quiet."""
    from cluster import checkpoints

    if progress is None:
        yield
        return
    total = steps * len(pts)
    stop = threading.Event()

    def poll() -> None:
        while True:
            done = 0
            for run in _runs(sw):
                try:
                    done += checkpoints.recorded_step(run) or 0
                except Exception:  # noqa: BLE001 - a checkpoint being replaced; the next poll reads it
                    pass
            progress(min(done, total), total)
            if stop.wait(every):
                return

    t = threading.Thread(target=poll, name="csp-sweep-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
