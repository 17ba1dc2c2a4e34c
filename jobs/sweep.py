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
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from cluster import storage
from jobs.sweep_grid import (  # noqa: F401  (the grid's names, re-exported: sweep.parse_grid, sweep.points, …)
    AXES,
    RUNS,
    SweepError,
    build_configs,
    legacy_trial_name,
    parse_grid,
    points,
    run_loc,
    trial_config,
    trial_name,
    trial_names,
)
from sparsity.config import ModelConfig, RunConfig, TrainConfig

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
    pa.field("stopped_at", pa.int64()),  # the step at which --scheduler asha stopped the trial (null: it ran to the end)
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


SUMMARY = "summary.parquet"  # SWEEP/summary.parquet: one row per trial
TIMINGS_FILE = "timings.json"  # SWEEP/runs/<trial>/timings.json: wall-clock marks of the trial (start, fit end, summary end)


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
        last: dict = {}

        def progress(m: dict) -> None:
            # A scheduler (ASHA) judges a trial by its val loss part-way; stopping it raises
            # SystemExit from this report (Tune's way with a function trainable).
            if config.get("scheduler") and "val_loss" in m and m["step"] < cfg.train.steps:
                last.update(step=m["step"], val_loss=m["val_loss"])
                tune.report({"step": m["step"], "val_loss": m["val_loss"]})

        try:
            local_train.train_local(config["data"], out.uri, cfg, device="cuda" if config["gpus"] else "cpu", owner=owner,
                                    keep_rows=True, marks=marks, progress=progress)
        except SystemExit:  # stopped by the scheduler: recorded as such, so a re-run does not train it on
            summarize_trial(sweep, name, config["point"], cfg, time.perf_counter() - t0, stopped=last)
            raise
    else:
        ray_train.train_distributed(config["data"], out.uri, cfg, workers=config["workers"], use_gpu=config["gpus"], owner=owner)
    t_fit = time.time()
    row = summarize_trial(sweep, name, config["point"], cfg, time.perf_counter() - t0)
    # wall-clock marks of the trial's phases (with RUN/placement's): benchmarks/distributed.py
    storage.write_json(out.join(TIMINGS_FILE), {"t_trial_start": t_start, **marks, "t_fit_end": t_fit, "t_summary_end": time.time()})
    tune.report({k: v for k, v in row.items() if isinstance(v, int | float) and v is not None})


def summarize_trial(sweep, name: str, point: dict, cfg: RunConfig, wall: float, stopped: dict | None = None) -> dict:
    """A trial's summary row (SWEEP/trials/NAME.json) and its metrics table. ``stopped``: the
    step and val loss at which a scheduler stopped it (its last checkpoint may be earlier)."""
    from cluster import checkpoints

    out = run_loc(sweep, name)
    # A trial stopped before its first checkpoint has none: its row keeps the stop's numbers only.
    ckpt = checkpoints.load(out.uri, with_train_state=False) if not stopped or checkpoints.latest_step(out.uri) else None
    history = checkpoints.read_metrics(out.uri)
    rows = [{"trial": name, **{f.name: m.get(f.name) for f in METRICS_SCHEMA if f.name != "trial"}} for m in history]
    storage.write_parquet(sweep.join("metrics", f"trial={name}", "metrics.parquet"),
                          pa.Table.from_pylist([{k: v for k, v in r.items() if k != "trial"} for r in rows],
                                               schema=pa.schema([f for f in METRICS_SCHEMA if f.name != "trial"])))
    meta = ckpt.meta.get("metrics", {}) if ckpt else {}
    step = ckpt.step if ckpt else 0
    summary = {
        "trial": name, "pfrac": cfg.sparsity.pfrac, "ef": cfg.sparsity.ef, "afrac": cfg.model.afrac, "seed": cfg.train.seed,
        "lr": cfg.train.lr, "d_model": cfg.model.d_model, "density": cfg.sparsity.l0frac, "steps": step, "final_loss": meta.get("loss"), "val_loss": meta.get("val_loss"),
        "nonzeros": meta.get("nonzeros"), "tokens_seen": step * cfg.train.batch_size * cfg.model.block_size,
        "wall_seconds": wall, "checkpoint_uri": checkpoints.checkpoint_dir(out.uri) if ckpt else None,
        "milestones": [m for m in checkpoints.steps(out.uri) if m in cfg.train.milestones],
        "stopped_at": None,
    }
    if stopped:
        summary.update(stopped_at=stopped["step"], val_loss=stopped["val_loss"])
    storage.write_json(sweep.join("trials", f"{name}.json"), summary)
    return summary


def run_sweep(data_uri: str, sweep_uri: str, grid: dict[str, list] | None, base: ModelConfig, train: TrainConfig,
              workers_per_trial: int = 1, gpus: bool = False, extra_points: list[dict] | None = None, take_over: bool = False,
              density_lr: bool = False, sparsity: dict | None = None, scheduler: str | None = None, grace_period: int | None = None,
              reduction_factor: int = 2):
    """Run (or resume) a sweep; returns the summary as a pandas DataFrame.

    ``scheduler="asha"``: Tune's ASHA stops trials whose val loss trails the others' at
    the same step (rungs from ``grace_period`` steps, default a quarter of the run, growing
    by ``reduction_factor``); a stopped trial's row records ``stopped_at``.

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
    check_scheduler(scheduler, workers_per_trial, train, grace_period, reduction_factor)
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
                            "sweep": sweep.uri, "workers": workers_per_trial, "gpus": gpus, "owner": owner, "scheduler": scheduler})

            tune_store = sweep.join("tune")

            def fit(stopper):
                return tune.Tuner(
                    # one worker: the trial trains itself; more: it only drives its TorchTrainer
                    tune.with_resources(trial_fn, {"CPU": 1, "GPU": int(gpus)} if workers_per_trial == 1 else {"CPU": 0.01}),
                    param_space=space,
                    # the next trial runs in a finished trial's process: no process start, no imports, rows kept
                    tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(cpus // need)), reuse_actors=True,
                                                scheduler=_asha(train, grace_period, reduction_factor) if scheduler else None),
                    run_config=tune.RunConfig(
                        name="tune",
                        storage_path=tune_store.uri if not sweep.is_s3 else tune_store.path,
                        storage_filesystem=tune_store.pa_fs if sweep.is_s3 else None,
                        failure_config=tune.FailureConfig(max_failures=1),
                        verbose=0,
                        stop=stopper,
                    ),
                ).fit()

            results = runtime.tune_fit(fit)
            errors = [r.error for r in results if r.error is not None]
            if errors:
                raise SweepError(f"{len(errors)} trial(s) failed; first: {type(errors[0]).__name__}: {str(errors[0]).splitlines()[0][:200]}")
            _rows_of_stopped(sweep, results, cfgs, point_of)
        return write_summary(sweep_uri)


def _rows_of_stopped(sweep: storage.Location, results, cfgs: dict, point_of: dict) -> None:
    """The summary row of each trial the scheduler stopped whose own row went unwritten
    (Tune ended its process rather than its report raising), from its last report."""
    for r in results:
        name, m = (r.config or {}).get("trial"), r.metrics or {}
        if name in cfgs and "step" in m and not storage.exists(sweep.join("trials", f"{name}.json")):
            summarize_trial(sweep, name, point_of[name], cfgs[name], float(m.get("time_total_s") or 0.0),
                            stopped={"step": int(m["step"]), "val_loss": m.get("val_loss")})


def check_scheduler(scheduler: str | None, workers_per_trial: int, train: TrainConfig, grace_period: int | None,
                    reduction_factor: int) -> None:
    """Refuse, before Ray starts, a scheduler csp cannot run as asked."""
    if scheduler is None:
        return
    if scheduler != "asha":
        raise SweepError(f"--scheduler {scheduler!r}: the one scheduler is asha (or leave it out)")
    if workers_per_trial > 1:
        raise SweepError("--scheduler asha judges one-worker trials by their val loss part-way; use --workers-per-trial 1 with it")
    if not train.eval_every:
        raise SweepError("--scheduler asha needs evaluations part-way (eval_every > 0)")
    grace = grace_period or max(1, train.steps // 4)
    if not 1 <= grace < train.steps:
        raise SweepError(f"--grace-period {grace} must be in 1..{train.steps - 1} (the trials' steps)")
    if reduction_factor < 2:
        raise SweepError(f"--reduction-factor {reduction_factor} must be ≥ 2")


def _asha(train: TrainConfig, grace_period: int | None, reduction_factor: int):
    """Tune's ASHA on the trials' part-way val loss, in training steps. ``max_t`` lies past the
    last step: a trial that reaches its end is never stopped at its final report."""
    from ray.tune.schedulers import ASHAScheduler

    grace = grace_period or max(1, train.steps // 4)
    return ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=train.steps + 1, grace_period=grace,
                         reduction_factor=reduction_factor)


def _check_same_sweep(sweep: storage.Location, record: dict) -> None:
    """SweepError naming the first setting that differs from the sweep already stored here."""
    loc = sweep.join("sweep.json")
    if not storage.exists(loc):
        return
    old = storage.read_json(loc)
    for part in ("base", "train", "sparsity"):
        before, now = old.get(part, {}), record[part]
        for key in sorted(set(before) | set(now)):
            if key == "milestones" and not before.get(key) and not now.get(key):  # none, written as [] or left out
                continue
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
