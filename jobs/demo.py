"""The demo pipeline: the whole of csp on the embedded default, on one machine.

    OUT/data/                 token shards of this Python's stdlib (cluster.data)
    OUT/sweep/                the plan's models, one Ray Tune trial each (jobs.sweep)
    OUT/results/              circuits, circuit_nodes, circuit_edges (jobs.store)
    OUT/over_training/        the same tables for one model's milestone checkpoints (circuits over training)
    OUT/figures/frontier.{png,svg}, OUT/figures/circuits/<model>--<task>.{svg,html}
    OUT/summary.parquet       one row per model: the table printed at the end
    OUT/report.html           links everything; opens from disk, no server

Every stage skips what is already done (shards with markers, finished trials, stored
pairs), so an interrupted demo re-run resumes; the figures and the report are rebuilt from
the stored results each time (seconds).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from cluster import checkpoints as checkpoints_lib
from cluster import data, runtime, storage
from jobs import claims as claims_lib
from jobs import fanout as fanout_lib
from jobs import prune_pairs as prune_job
from jobs import report as report_lib
from jobs import results, sweep, viz
from sparsity import tasks as task_lib
from sparsity.circuit import TESTED, solved
from sparsity.config import (
    CHANCE_LOSS,
    LR_DENSE,
    ModelConfig,
    RunConfig,
    SparsityConfig,
    TrainConfig,
    density_lr,
)
from sparsity.prune import PruneConfig

SUMMARY = "summary.parquet"  # OUT/summary.parquet: the models table (not a sweep summary: no runs/ beside it)


@dataclass(frozen=True)
class Plan:
    """What the demo trains and prunes: a list of models, each a (pfrac, ef) point — width
    ``base.d_model·ef``, block-weight density ``pfrac/ef²`` (so one pfrac is one nonzero count
    at every width) — some trained again at another seed, each at a learning rate from its
    weight density and width (sparsity.config.density_lr)."""

    name: str
    n_ctx: int
    base: ModelConfig
    models: tuple[tuple[float, float], ...]  # (pfrac, ef) of every model; pfrac = ef² is dense
    train: TrainConfig
    prune: PruneConfig
    lr_dense: float  # lr of a dense model; a model at density d trains at lr_dense / sqrt(d) (Adam: × 64/d_model)
    controls: tuple[str, ...] = ("single_double_quote",)  # tasks whose solved pairs get the faithfulness controls
    control_models: int = 1  # ... on this many of the sparsest models that solve it (each control is a pruning run)
    notes: tuple[str, ...] = ()
    reseeded: tuple[tuple[float, float, int], ...] = ()  # (pfrac, ef, seed): models trained again at another seed
    sparsity: tuple[tuple[str, float], ...] = ()  # SparsityConfig fields for every model besides pfrac and ef
    over_training: int = 3  # circuits over training: the milestones of one model pruned for up to this many of its tasks (0: none)

    def lr(self, pfrac: float, ef: float) -> float:
        return density_lr(SparsityConfig(pfrac=pfrac, ef=ef).l0frac, self.train.optimizer, self.lr_dense,
                          RunConfig.at_width(self.base, self.train, pfrac=pfrac, ef=ef).model.d_model)

    def points(self) -> list[dict]:
        # Widest and densest first, a point's seeds together: Tune starts trials in this order, so
        # the slowest do not end up last (with more trials at once than 2, reseeded points
        # appended after the others put slow d_model-128 seeds behind fast d_model-64 ones).
        pts = [{"pfrac": p, "ef": e} for p, e in self.models] + [{"pfrac": p, "ef": e, "seed": s} for p, e, s in self.reseeded]
        pts.sort(key=lambda q: (-q["ef"], -q["pfrac"], q.get("seed", 0)))
        return [{**q, "lr": self.lr(q["pfrac"], q["ef"])} for q in pts]

    def run_config(self, point: dict) -> RunConfig:
        """The training config of one of :meth:`points` (as the sweep builds it)."""
        return sweep.trial_config(self.base, self.train, point, sparsity=dict(self.sparsity))

    def describe(self) -> str:
        """The models in words: 'd_model 128 dense, 1/4, 1/8; d_model 64 dense, dense seed 1'."""
        by_width: dict[int, list[str]] = {}
        for q in self.points():
            cfg = self.run_config(q)
            d = cfg.sparsity.l0frac
            word = ("dense" if d >= 1 else f"1/{round(1 / d)}") + (f" seed {q['seed']}" if q.get("seed") else "")
            by_width.setdefault(cfg.model.d_model, []).append(word)
        return "; ".join(f"d_model {w} " + ", ".join(v) for w, v in by_width.items())


# The density anneal ends at 25% of training (the paper: 50%). Measured with
# benchmarks/learning_curve.py on d_model 128 at density 1/4 (docs/learning-curves.md): the
# same val loss (3.630 vs 3.627 at 5.7M tokens; 3.772 vs 3.763 at 2.9M) and the quote task
# learned better at both budgets (held-out loss 0.070 vs 0.137; 0.082 vs 0.136), 4 tasks at
# the strict target against 2 at 5.7M. A dense model has no anneal: the same either way.
ANNEAL = (("anneal_end", 0.25),)


def full_plan(optimizer: str = "adam", paper: bool = True) -> Plan:
    """The default demo (``csp demo``), budgeted from measured learning curves
    (benchmarks/learning_curve.py, docs/learning-curves.md).

    Five models on the paper's recipe (AbsTopK at afrac 0.25 at all 8 locations, Adam at
    csp's lr rule): d_model 128 dense, at density 1/4 and at 1/8 — three densities at one
    width — and d_model 64 dense, which has the nonzeros of d_model 128 at 1/4 — two widths
    at equal nonzeros; d_model 64 is trained again at seed 1 (the seed noise the claims are
    judged against). Every model sees the same tokens: 2,800 steps of 16×128 (5.7M tokens,
    about 0.6 epochs of the stdlib), 4× the demo before it, where training loss was still
    falling steeply. The weight-density anneal ends at 25% of training, not the paper's 50%
    (:data:`ANNEAL`).

    ``paper=False`` turns AbsTopK off (a comparison run, benchmarks/demo_optimizers.py)."""
    base = ModelConfig(block_size=128, n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256, afrac=0.25 if paper else None)
    notes = () if paper else ("activation sparsity (AbsTopK) is off in this plan (paper=False); the default demo, "
                              "`csp sweep` and `csp train` keep it on",)
    steps = 2800
    return Plan(
        name="demo", n_ctx=128, base=base, models=((4.0, 2.0), (1.0, 2.0), (0.5, 2.0), (1.0, 1.0)),
        train=TrainConfig(steps=steps, batch_size=16, optimizer=optimizer, eval_every=steps // 2, ckpt_every=steps // 4,
                          eval_batches=64, milestones=tuple(steps * i // 4 for i in range(1, 5))),  # kept for circuits over training
        prune=PruneConfig(),  # the library's defaults: the paper's settings, 400 steps, k_coef 1e-3
        lr_dense=LR_DENSE[optimizer],
        reseeded=((1.0, 1.0, 1),),
        sparsity=ANNEAL,
        notes=notes,
    )


def paper_plan(optimizer: str = "adam") -> Plan:
    """``csp demo --preset paper``: the paper's picture, both frontier directions with every
    point at two seeds, each model trained twice as long as the default's (11.5M tokens),
    resumable. d_model 128 at densities 1, 1/4, 1/8 and 1/16; d_model 64 dense and at 1/4,
    with the nonzeros of d_model 128 at 1/4 and 1/16.

    Measured (docs/demo.md, two runs on two CPUs): on 2 cores its 12 models train in about
    97 minutes two at a time (d_model 128 ~20 min each, d_model 64 ~9), not the 66 that
    single-model throughput suggested; pruning, controls and circuits over training add ~21
    minutes: about 2 hours in all (145 min measured with the test suite running beside it)."""
    base = ModelConfig(block_size=128, n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256, afrac=0.25)
    steps = 5600
    models = ((4.0, 2.0), (1.0, 2.0), (0.5, 2.0), (0.25, 2.0), (1.0, 1.0), (0.25, 1.0))
    return Plan(
        name="paper", n_ctx=128, base=base, models=models,
        train=TrainConfig(steps=steps, batch_size=16, optimizer=optimizer, eval_every=steps // 4, ckpt_every=steps // 8,
                          eval_batches=64, milestones=tuple(steps * i // 8 for i in range(1, 9))),
        prune=PruneConfig(),
        lr_dense=LR_DENSE[optimizer],
        reseeded=tuple((p, e, 1) for p, e in models),
        sparsity=ANNEAL,
        control_models=2,
    )


def quick_plan() -> Plan:
    """Minutes: every stage runs, on models too small to learn much — two of them (a sparse
    d_model 64 and a dense d_model 32, so two widths), trained at once. The target is loose
    and chance pairs are pruned anyway, so circuits (and diagrams) exist to check the plumbing."""
    base = ModelConfig(block_size=64, n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=128, afrac=0.25)
    return Plan(
        name="quick", n_ctx=64, base=base, models=((0.5, 2.0), (1.0, 1.0)),
        train=TrainConfig(steps=40, batch_size=8, optimizer="muon", eval_every=20, ckpt_every=20, eval_batches=2, milestones=(20, 40)),
        prune=PruneConfig(target=3.0, steps=10, batch_pairs=8, n_train=16, n_select=8, n_test=16, prune_anyway=True),
        lr_dense=1e-2,
        control_models=2,
        notes=("--quick checks the plumbing: tiny models that solve nothing, pruned to a loose target "
               f"(task loss 3.0; chance is {CHANCE_LOSS:.3f}) with every pair pruned anyway, so every stage has something to do",),
    )


PRESETS = {"default": full_plan, "quick": quick_plan, "paper": paper_plan}


def real_rows(circ, plan: Plan):
    """The rows of ``circ`` that are the demo's own circuits: no control, the plan's pruning config."""
    return circ[circ["control"].isna() & (circ["prune_key"] == plan.prune.key())]


def control_targets(plan: Plan, circ, trials) -> tuple[list[str], list[str]]:
    """(tasks, checkpoint URIs) that get the faithfulness controls.

    The task: the plan's (the quote task) where some model solves it, else the task with
    the most verified circuits (then the most models solving it) — so the demo shows
    controls whenever it has a circuit to check. The models: the ``plan.control_models``
    sparsest ones that solve it, those with a verified circuit first (the claims the demo
    is about; each control costs one pruning run)."""
    real = real_rows(circ, plan)
    ok = real[real["status"].map(solved)]
    solved_by = ok.groupby("task", observed=True).size()
    verified_by = real[real["status"] == "ok"].groupby("task", observed=True).size()
    tasks = [t for t in plan.controls if solved_by.get(t, 0) > 0]
    if not tasks and not solved_by.empty:
        order = {t: i for i, t in enumerate(task_lib.REGISTRY)}
        tasks = [min(solved_by.index, key=lambda t: (-verified_by.get(t, 0), -solved_by[t], order.get(t, 99)))]
    if not tasks:
        return [], []
    mine = ok[ok["task"].isin(tasks)]
    uris = set(mine["checkpoint_uri"])
    good = set(mine[mine["status"] == "ok"]["checkpoint_uri"])
    return tasks, _sparsest_first(trials, uris, first=lambda u: u not in good)[: plan.control_models]


def _sparsest_first(trials, uris: set, first) -> list[str]:
    """The checkpoint URIs of ``trials`` that are in ``uris``, ordered by ``first(uri)``, then
    the sparsest, then the widest (then by URI, so the order is fixed)."""
    ranked = sorted((first(u), viz.density(t.pfrac, float(t.ef), getattr(t, "density", None)), -float(t.ef), u)
                    for t in trials.itertuples() if (u := str(t.checkpoint_uri)) in uris)
    return [r[-1] for r in ranked]


def run(out_uri: str, quick: bool = False, address: str | None = None, shared_fs: bool = False, preset: str | None = None,
        log: Callable[[str], None] = print,
        shard_progress: Callable | None = None,
        prune_progress: Callable[[int, int, dict], None] | None = None,
        train_progress: Callable[[int, int], None] | None = None, plan: Plan | None = None) -> dict:
    """Run (or resume) the demo under ``out_uri`` (``plan``: another than the default's);
    returns paths and timings."""
    plan = plan or PRESETS[preset or ("quick" if quick else "default")]()
    quick = plan.name == "quick"
    root = storage.resolve(out_uri)
    cores = os.cpu_count() or 1
    # One logical CPU per core: each sweep trial trains in its own process on one CPU, one
    # thread, so `cores` trials train at once; then `cores` pruning tasks.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables between our lines
    runtime.init(address=address, num_cpus=None if address else cores, log_to_driver=False,
                 storage={"--out": out_uri}, shared_fs=shared_fs, state_api=True)
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    for note in plan.notes:
        log(f"note: {note}")

    ds = _prepare_data(plan, root, log, shard_progress, timings)
    sw, trials = _train_models(plan, root, ds, log, train_progress, timings)
    res, counts = _prune_models(plan, root, sw, trials, cores if not address else None, log, prune_progress, timings)
    over = _over_training(plan, root, trials, res, cores if not address else None, log, prune_progress, timings)
    frontier_files, real, diagrams = _draw_figures(plan, root, res, log, timings)

    summary = report_lib.model_summary(sw.uri, res.uri, plan.prune.target, (plan.prune.also_targets or (None,))[0])
    storage.write_parquet(root.join(SUMMARY), pa.Table.from_pandas(summary, schema=report_lib.SUMMARY_SCHEMA, preserve_index=False))
    timings["total"] = time.monotonic() - t_all
    report = root.join("report.html")
    ctl = results.controls(res.uri)
    storage.write_text(report, report_lib.render(plan, summary, real, root, diagrams, timings, quick, ctl, over))
    log(f"[5/5] report → {report.uri}")
    _log_findings(plan, summary, real, ctl, log)
    return {"out": root.uri, "report": report.uri, "frontier": frontier_files, "diagrams": diagrams,
            "summary": summary, "timings": timings, "counts": counts}


def _prepare_data(plan: Plan, root: storage.Location, log: Callable[[str], None], shard_progress: Callable | None,
                  timings: dict[str, float]) -> storage.Location:
    """Stage 1: this Python's stdlib tokenized into OUT/data."""
    t0 = time.monotonic()
    ds = root.join("data")
    log(f"[1/5] corpus → tokenizer → token shards (this Python's stdlib, n_ctx {plan.n_ctx}) → {ds.uri}")
    prep = data.prepare(None, ds.uri, n_ctx=plan.n_ctx, progress=shard_progress)
    log(f"      {prep.shards_written} shards written, {prep.shards_skipped} already done")
    timings["data"] = time.monotonic() - t0
    return ds


def _train_models(plan: Plan, root: storage.Location, ds: storage.Location, log: Callable[[str], None],
                  train_progress: Callable[[int, int], None] | None, timings: dict[str, float]):
    """Stage 2: the plan's models, one Ray Tune trial each, into OUT/sweep; (sweep, trials)."""
    t0 = time.monotonic()
    sw = root.join("sweep")
    pts = plan.points()
    log(f"[2/5] training {len(pts)} models with Ray Tune ({plan.describe()}; {plan.base.n_layer} layers, "
        f"{plan.train.steps} {plan.train.optimizer} steps of {plan.train.batch_size}×{plan.n_ctx} tokens) → {sw.uri}")
    with sweep.watch_steps(sw, pts, plan.train.steps, train_progress):
        trials = sweep.run_sweep(ds.uri, sw.uri, None, plan.base, plan.train, workers_per_trial=1, extra_points=pts,
                                 sparsity=dict(plan.sparsity))
    timings["train"] = time.monotonic() - t0
    log(f"      {len(trials)} models trained; val loss " + ", ".join(f"{r.trial} {r.val_loss:.3f}" for r in trials.itertuples()))
    return sw, trials


def _prune_models(plan: Plan, root: storage.Location, sw: storage.Location, trials, inflight: int | None,
                  log: Callable[[str], None], prune_progress: Callable[[int, int, dict], None] | None,
                  timings: dict[str, float]) -> tuple[storage.Location, dict]:
    """Stage 3: every (model, task) pair pruned into OUT/results, then the faithfulness
    controls (:func:`control_targets`); (results, counts)."""
    t0 = time.monotonic()
    res = root.join("results")
    tasks = list(task_lib.REGISTRY)
    log(f"[3/5] pruning {len(trials)} models × {len(tasks)} tasks, then the faithfulness controls "
        f"(Ray tasks; a model that misses a task is recorded after one evaluation) → {res.uri}")
    counts = fanout_lib.fanout([sw.uri], tasks, res.uri, cfg=plan.prune, max_in_flight=inflight, progress=prune_progress)
    log(f"      {counts['pruned']} pairs pruned or judged, {counts['skipped']} already stored, {counts['failed']} failed")
    ctl_tasks, ctl_models = control_targets(plan, results.circuits(res.uri), trials)
    if ctl_tasks:
        log(f"      faithfulness controls of {', '.join(ctl_tasks)} on {len(ctl_models)} model(s) that solve it "
            f"({', '.join(prune_job.control_jobs(plan.prune))})")
        c2 = fanout_lib.fanout([sw.uri], ctl_tasks, res.uri, cfg=plan.prune, max_in_flight=inflight,
                               progress=prune_progress, controls=ctl_tasks, control_ckpts=ctl_models)
        log(f"      {c2['pruned']} control runs, {c2['skipped'] - len(trials) * len(ctl_tasks)} already stored, {c2['failed']} failed")
        counts = {k: counts[k] + c2[k] for k in counts}
    else:
        log("      no model solves any task: no controls to run")
    timings["prune"] = time.monotonic() - t0
    return res, counts


OVER_TRAINING = "over_training"  # OUT/over_training/: the circuits of one model's milestones (a store of its own, beside OUT/results)


def over_training_pick(plan: Plan, circ, trials) -> tuple[str | None, list[str]]:
    """The model whose milestones are pruned, and its tasks: the model with the most verified
    circuits at the plan's first target (then the sparsest, then the widest), and up to
    ``plan.over_training`` of the tasks it verifies, lowest full-model loss first. (None, [])
    when the plan keeps no milestones or no model verifies a task."""
    real = real_rows(circ, plan)
    ok = real[real["status"] == "ok"]
    if not plan.train.milestones or not plan.over_training or ok.empty:
        return None, []
    n_ok = ok.groupby("checkpoint_uri")["task"].nunique()
    uri = _sparsest_first(trials, set(n_ok.index.astype(str)), first=lambda u: -n_ok[u])[0]
    mine = ok[ok["checkpoint_uri"] == uri].sort_values("full_loss")
    return uri, list(dict.fromkeys(mine["task"].astype(str)))[: plan.over_training]


def _over_training(plan: Plan, root: storage.Location, trials, res: storage.Location, inflight: int | None,
                   log: Callable[[str], None], prune_progress: Callable[[int, int, dict], None] | None, timings: dict[str, float]):
    """Stage 3b: the milestones of one model (:func:`over_training_pick`) pruned for its
    verified tasks into OUT/over_training, and their plot; the over-training rows (None: skipped)."""
    uri, tasks = over_training_pick(plan, results.circuits(res.uri), trials)
    if uri is None:
        if plan.over_training:
            log("      circuits over training: no model has a verified circuit to follow")
        return None
    t0 = time.monotonic()
    ot = root.join(OVER_TRAINING)
    steps = ", ".join(map(str, plan.train.milestones))
    log(f"      circuits over training: {checkpoints_lib.run_name(uri)} at steps {steps}, for {', '.join(tasks)} → {ot.uri}")
    fanout_lib.fanout([uri], tasks, ot.uri, cfg=plan.prune, max_in_flight=inflight, progress=prune_progress, which="milestones")
    rows = results.over_training(ot.uri)
    drawn = rows[rows["n_edges"].notna()].groupby("target").size()  # the plot shows the target with the most circuits
    target = max(plan.prune.targets, key=lambda t: (drawn.get(t, 0), t == plan.prune.target))
    with contextlib.suppress(viz.VizError):  # fewer than two steps with a circuit: no plot, the table says why
        viz.plot_over_training(ot.uri, root.join("figures").uri, target=target)
    timings["over_training"] = time.monotonic() - t0
    return rows


def _draw_figures(plan: Plan, root: storage.Location, res: storage.Location, log: Callable[[str], None],
                  timings: dict[str, float]):
    """Stage 4: the frontier plot and a diagram of every real circuit with nodes, into
    OUT/figures; (frontier files, the real circuits' rows, diagrams)."""
    t0 = time.monotonic()
    figs = root.join("figures")
    log(f"[4/5] frontier plot and circuit diagrams → {figs.uri}")
    frontier_files = viz.plot_frontier(res.uri, figs.uri, target=plan.prune.target)
    renderer = viz.CircuitRenderer(res.uri)
    circ = results.circuits(res.uri)
    real = real_rows(circ, plan)
    drawable = real[real["status"].isin(TESTED) & (real["n_nodes"] > 0)].sort_values(["model_id", "task"])
    diagrams = []
    for r in drawable.itertuples():
        svg_uri, html_uri = renderer.render(r.model_id, r.task, figs.join("circuits").uri, prune_key=r.prune_key)
        diagrams.append({"model_id": r.model_id, "task": r.task, "svg": svg_uri, "html": html_uri})
    timings["figures"] = time.monotonic() - t0
    log(f"      frontier.png/.svg and {len(diagrams)} circuit diagrams")
    return frontier_files, real, diagrams


def _log_findings(plan: Plan, summary, real, ctl, log: Callable[[str], None]) -> None:
    """The end of the demo's output: the models table, the frontier claims, the verified
    circuits' checks and the controls."""
    log("")
    log(report_lib.format_summary(summary))
    for claim in claims_lib.frontier_claims(summary, real):
        log(claim)
    if (real["status"] == "ok").any():
        log("")
        log(f"verified circuits at target {plan.prune.target:g}: sufficiency beside partial ablation, random node sets "
            "of the same size, the direct path and necessity:")
        log(report_lib.format_checks(real))
    if len(ctl):
        log("")
        log("controls (random-init model and rule-based nonsense tasks must not verify; seed/ablation variants: "
            "node-set Jaccard vs the real circuit):")
        log(report_lib.format_controls(ctl))
