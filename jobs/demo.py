"""The demo pipeline: the whole of csp on the embedded default, on one machine.

    OUT/data/                 token shards of this Python's stdlib (cluster.data)
    OUT/sweep/                the models: a pfrac × ef grid plus a dense baseline (jobs.sweep)
    OUT/results/              circuits, circuit_nodes, circuit_edges (jobs.results)
    OUT/figures/frontier.{png,svg}, OUT/figures/circuits/<model>--<task>.{svg,html}
    OUT/summary.parquet       one row per model: the table printed at the end
    OUT/report.html           links everything; opens from disk, no server

Every stage skips what is already done (shards with markers, finished trials, stored
pairs), so an interrupted demo re-run resumes; the figures and the report are rebuilt from
the stored results each time (seconds).
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from cluster import checkpoints, data, runtime, storage
from jobs import fanout as fanout_lib
from jobs import prune as prune_job
from jobs import results, sweep, viz
from jobs.prune import solved
from sparsity import tasks as task_lib
from sparsity.config import ModelConfig, SparsityConfig, TrainConfig
from sparsity.prune import PruneConfig

SUMMARY = "summary.parquet"  # OUT/summary.parquet: the models table (not a sweep summary: no runs/ beside it)


@dataclass(frozen=True)
class Plan:
    """What the demo trains and prunes: a pfrac × ef grid plus a dense baseline, each trial
    with a learning rate from its weight density (sparser matrices take larger steps)."""

    name: str
    n_ctx: int
    base: ModelConfig
    pfracs: tuple[float, ...]
    efs: tuple[float, ...]
    dense_ef: float  # the dense baseline's width multiplier (pfrac = ef², every matrix dense)
    train: TrainConfig
    prune: PruneConfig
    lr_dense: float  # lr of a dense model; a model at density d trains at lr_dense / sqrt(d)
    controls: tuple[str, ...] = ("single_double_quote",)  # tasks whose solved pairs get the faithfulness controls
    control_models: int = 1  # ... on this many of the sparsest models that solve it (each control is a pruning run)
    notes: tuple[str, ...] = ()

    def lr(self, pfrac: float, ef: float) -> float:
        return float(f"{self.lr_dense / math.sqrt(SparsityConfig(pfrac=pfrac, ef=ef).l0frac):.3g}")

    def points(self) -> list[dict]:
        grid = [{"pfrac": p, "ef": e} for e in self.efs for p in self.pfracs]
        dense = {"pfrac": self.dense_ef ** 2, "ef": self.dense_ef}
        # Widest first: Tune starts trials in this order, so the long ones do not end up last.
        pts = [dense] + [q for q in sorted(grid, key=lambda q: -q["ef"]) if q != dense]
        return [{**q, "lr": self.lr(q["pfrac"], q["ef"])} for q in pts]


def full_plan() -> Plan:
    """17 minutes on 2 CPU cores (measured: data 9 s, training 643 s, pruning 309 s, figures
    46 s; README, "The demo, step by step").

    pfrac is relative to the dense d_model-64 base, so the grid is dense and 1/2 at d_model
    64 and 1/4 and 1/8 at d_model 128 — at ef 2, pfrac 1 has the base's nonzeros spread over
    4× larger matrices. Muon on the block matrices: Adam needs about twice the tokens for
    the same loss (sparsity/optim.py)."""
    base = ModelConfig(block_size=128, n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256, afrac=None)
    return Plan(
        name="demo", n_ctx=128, base=base, pfracs=(1.0, 0.5), efs=(1.0, 2.0), dense_ef=2.0,
        train=TrainConfig(steps=700, batch_size=16, optimizer="muon", eval_every=350, ckpt_every=175),
        prune=PruneConfig(),  # the library's defaults: the paper's settings, 400 steps, k_coef 1e-3
        lr_dense=1e-2,
        notes=("activation sparsity (AbsTopK) is off in the demo: it costs ~40% of a CPU step; "
               "`csp sweep` and `csp train` keep it on by default",),
    )


def quick_plan() -> Plan:
    """Minutes: every stage runs, on models too small to learn much — two of them (a sparse
    d_model 64 and a dense d_model 32, so two widths), trained at once. The target is loose
    and chance pairs are pruned anyway, so circuits (and diagrams) exist to check the plumbing."""
    base = ModelConfig(block_size=64, n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=128, afrac=0.25)
    return Plan(
        name="quick", n_ctx=64, base=base, pfracs=(0.5,), efs=(2.0,), dense_ef=1.0,
        train=TrainConfig(steps=40, batch_size=8, optimizer="muon", eval_every=20, ckpt_every=20, eval_batches=2),
        prune=PruneConfig(target=3.0, steps=10, batch_pairs=8, n_train=16, n_select=8, n_test=16, prune_anyway=True),
        lr_dense=1e-2,
        control_models=2,
        notes=("--quick checks the plumbing: tiny models that solve nothing, pruned to a loose target "
               "(task loss 3.0; chance is 1.386) with every pair pruned anyway, so every stage has something to do",),
    )


SUMMARY_SCHEMA = pa.schema([
    pa.field("model_id", pa.string()),
    pa.field("trial", pa.string()),
    pa.field("pfrac", pa.float64()),
    pa.field("ef", pa.float64()),
    pa.field("d_model", pa.int64()),
    pa.field("density", pa.float64()),
    pa.field("nonzeros", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("val_loss", pa.float64()),
    pa.field("tasks_solved", pa.int64()),
    pa.field("tasks_with_circuit", pa.int64()),
    pa.field("geomean_edges", pa.float64()),
    pa.field("geomean_edges_common", pa.float64()),
    pa.field("quote_loss", pa.float64()),
    pa.field("quote_edges", pa.int64()),
    pa.field("train_seconds", pa.float64()),
])


def model_summary(sweep_uri: str, results_uri: str):
    """One row per model: the sweep's numbers joined with its circuits."""
    import pandas as pd

    trials = sweep.read_summary(sweep_uri)
    circ = results.circuits(results_uri)
    front = results.frontier(results_uri)
    rows = []
    for t in trials.itertuples():
        c = circ[(circ["checkpoint_uri"] == t.checkpoint_uri) & circ["control"].isna()]
        f = front[front["model_id"].isin(c["model_id"])] if len(c) else front.iloc[0:0]
        quote = c[c["task"] == "single_double_quote"]
        q_ok = quote[quote["status"] == "ok"]
        ef = float(t.ef)
        rows.append({
            "model_id": c["model_id"].iloc[0] if len(c) else None, "trial": t.trial, "pfrac": t.pfrac, "ef": ef,
            "d_model": t.d_model, "density": SparsityConfig(pfrac=t.pfrac, ef=ef).l0frac, "nonzeros": t.nonzeros, "steps": t.steps,
            "val_loss": t.val_loss, "tasks_solved": int(c["status"].map(solved).sum()) if len(c) else 0,
            "tasks_with_circuit": int((c["status"] == "ok").sum()) if len(c) else 0,
            "geomean_edges": float(f["geomean_edges"].iloc[0]) if len(f) else math.nan,
            "geomean_edges_common": float(f["geomean_edges_common"].iloc[0]) if len(f) else math.nan,
            "quote_loss": float(quote["full_loss"].iloc[0]) if len(quote) else math.nan,
            "quote_edges": int(q_ok["n_edges"].iloc[0]) if len(q_ok) else None,
            "train_seconds": t.wall_seconds,
        })
    df = pd.DataFrame(rows, columns=[f.name for f in SUMMARY_SCHEMA])
    df["quote_edges"] = df["quote_edges"].astype("Int64")
    return df.sort_values(["ef", "pfrac"]).reset_index(drop=True)


def format_summary(df) -> str:
    show = df.assign(
        model=[viz.model_label(p, e) for p, e in zip(df["pfrac"], df["ef"], strict=True)],
        density=[f"1/{round(1 / d)}" if d < 1 else "dense" for d in df["density"]],
        circuits=[f"{a}/{b}" for a, b in zip(df["tasks_with_circuit"], df["tasks_solved"], strict=True)],
        quote_edges=[_num(v, "d") for v in df["quote_edges"]],
    )[["model", "d_model", "density", "nonzeros", "val_loss", "circuits", "geomean_edges", "quote_loss", "quote_edges"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


def control_targets(plan: Plan, circ, trials) -> tuple[list[str], list[str]]:
    """(tasks, checkpoint URIs) that get the faithfulness controls.

    The task: the plan's (the quote task) where some model solves it, else the task with
    the most verified circuits (then the most models solving it) — so the demo shows
    controls whenever it has a circuit to check. The models: the ``plan.control_models``
    sparsest ones that solve it, those with a verified circuit first (the claims the demo
    is about; each control costs one pruning run)."""
    real = circ[circ["control"].isna() & (circ["prune_key"] == plan.prune.key())]
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
    ranked = sorted((str(t.checkpoint_uri) not in good, SparsityConfig(pfrac=t.pfrac, ef=float(t.ef)).l0frac, -float(t.ef), str(t.checkpoint_uri))
                    for t in trials.itertuples() if str(t.checkpoint_uri) in uris)
    return tasks, [r[-1] for r in ranked[: plan.control_models]]


def format_controls(ctl) -> str:
    show = ctl.assign(model=ctl["model_id"].str.rsplit("-", n=1).str[0])[
        ["model", "task", "control", "status", "n_nodes", "sufficiency_loss", "real_n_nodes", "jaccard", "passes"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


def run(out_uri: str, quick: bool = False, address: str | None = None, shared_fs: bool = False,
        log: Callable[[str], None] = print,
        shard_progress: Callable | None = None,
        prune_progress: Callable[[int, int, dict], None] | None = None,
        train_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) the demo under ``out_uri``; returns paths and timings."""
    plan = quick_plan() if quick else full_plan()
    root = storage.resolve(out_uri)
    cores = os.cpu_count() or 1
    # Two logical CPUs per core: each sweep trial holds one for its single Train worker and
    # one for its (idle) controller, so `cores` trials train at once, one thread each.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables between our lines
    runtime.init(address=address, num_cpus=None if address else 2 * cores, log_to_driver=False,
                 storage={"--out": out_uri}, shared_fs=shared_fs, state_api=True)
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    for note in plan.notes:
        log(f"note: {note}")

    t0 = time.monotonic()
    ds = root.join("data")
    log(f"[1/5] corpus → tokenizer → token shards (this Python's stdlib, n_ctx {plan.n_ctx}) → {ds.uri}")
    prep = data.prepare(None, ds.uri, n_ctx=plan.n_ctx, progress=shard_progress)
    log(f"      {prep.shards_written} shards written, {prep.shards_skipped} already done")
    timings["data"] = time.monotonic() - t0

    t0 = time.monotonic()
    sw = root.join("sweep")
    pts = plan.points()
    log(f"[2/5] training {len(pts)} models with Ray Tune (pfrac {{{_vals(plan.pfracs)}}} × ef {{{_vals(plan.efs)}}} + a dense baseline at ef {plan.dense_ef:g}; "
        f"base d_model {plan.base.d_model} × {plan.base.n_layer} layers, {plan.train.steps} {plan.train.optimizer} steps of {plan.train.batch_size}×{plan.n_ctx} tokens) → {sw.uri}")
    with _watch_steps(sw, pts, plan.train.steps, train_progress):
        trials = sweep.run_sweep(ds.uri, sw.uri, None, plan.base, plan.train, workers_per_trial=1, extra_points=pts)
    timings["train"] = time.monotonic() - t0
    log(f"      {len(trials)} models trained; val loss " + ", ".join(f"{r.trial} {r.val_loss:.3f}" for r in trials.itertuples()))

    t0 = time.monotonic()
    res = root.join("results")
    tasks = list(task_lib.REGISTRY)
    log(f"[3/5] pruning {len(trials)} models × {len(tasks)} tasks, then the faithfulness controls "
        f"(Ray tasks; a model that misses a task is recorded after one evaluation) → {res.uri}")
    inflight = cores if not address else None
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

    t0 = time.monotonic()
    figs = root.join("figures")
    log(f"[4/5] frontier plot and circuit diagrams → {figs.uri}")
    frontier_files = viz.plot_frontier(res.uri, figs.uri)
    renderer = viz.CircuitRenderer(res.uri)
    circ = results.circuits(res.uri)
    real = circ[circ["control"].isna() & (circ["prune_key"] == plan.prune.key())]
    drawable = real[real["status"].isin(["ok", "not_verified", "target_not_reached"]) & (real["n_nodes"] > 0)].sort_values(["model_id", "task"])
    diagrams = []
    for r in drawable.itertuples():
        svg_uri, html_uri = renderer.render(r.model_id, r.task, figs.join("circuits").uri)
        diagrams.append({"model_id": r.model_id, "task": r.task, "svg": svg_uri, "html": html_uri})
    timings["figures"] = time.monotonic() - t0
    log(f"      frontier.png/.svg and {len(diagrams)} circuit diagrams")

    summary = model_summary(sw.uri, res.uri)
    storage.write_parquet(root.join(SUMMARY), pa.Table.from_pandas(summary, schema=SUMMARY_SCHEMA, preserve_index=False))
    timings["total"] = time.monotonic() - t_all
    report = root.join("report.html")
    ctl = results.controls(res.uri)
    storage.write_text(report, report_html(plan, summary, real, root, diagrams, timings, quick, ctl))
    log(f"[5/5] report → {report.uri}")
    log("")
    log(format_summary(summary))
    if len(ctl):
        log("")
        log("controls (random-init model and nonsense task must not verify; seed/ablation variants: node-set Jaccard vs the real circuit):")
        log(format_controls(ctl))
    return {"out": root.uri, "report": report.uri, "frontier": frontier_files, "diagrams": diagrams,
            "summary": summary, "timings": timings, "counts": counts}


@contextlib.contextmanager
def _watch_steps(sw, pts: list[dict], steps: int, progress: Callable[[int, int], None] | None, every: float = 5.0):
    """While the sweep trains, report the steps checkpointed over all its trials (each run's
    ``checkpoints/latest.json``), from a polling thread: Tune itself stays quiet."""
    if progress is None:
        yield
        return
    latest = [checkpoints.latest_uri(sweep.run_loc(sw, sweep.trial_name(p)).uri) for p in pts]
    total = steps * len(pts)
    stop = threading.Event()

    def poll() -> None:
        while True:
            done = 0
            for loc in latest:
                try:
                    done += int(storage.read_json(loc)["step"]) if storage.exists(loc) else 0
                except Exception:  # noqa: BLE001 - a file being replaced; the next poll reads it
                    pass
            progress(min(done, total), total)
            if stop.wait(every):
                return

    t = threading.Thread(target=poll, name="csp-demo-train-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _vals(vals) -> str:
    return ", ".join(f"{v:g}" for v in vals)


def _rel(root, uri: str) -> str:
    """``uri`` relative to the output root, for links that work from disk and from a copy."""
    base = root.uri.rstrip("/") + "/"
    return uri[len(base):] if uri.startswith(base) else uri


def _inline_svg(text: str) -> str:
    """An SVG document's <svg> element, for inlining in HTML."""
    i = text.find("<svg")
    return text[i:] if i >= 0 else text


def report_html(plan: Plan, summary, circ, root, diagrams: list[dict], timings: dict, quick: bool, ctl=None) -> str:
    e = html.escape
    by_pair = {(d["model_id"], d["task"]): d for d in diagrams}
    models = [m for m in summary["model_id"] if m is not None]
    label = {r.model_id: viz.model_label(r.pfrac, r.ef) for r in summary.itertuples() if r.model_id is not None}
    parts = [
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>csp demo report</title><style>"
        "body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#1a202c;padding:0 16px}"
        "table{border-collapse:collapse;font-size:13px;margin:8px 0 20px}td,th{border:1px solid #e2e8f0;padding:4px 8px;text-align:right}"
        "th{background:#f7fafc}td.l,th.l{text-align:left}.ok{background:#f0fff4}.chance{color:#a0aec0}.tnr{background:#fffaf0}"
        ".fig{overflow:auto;border:1px solid #e2e8f0;margin:8px 0 24px}#panel{position:fixed;right:12px;bottom:12px;white-space:pre;"
        "font:12px Menlo,Consolas,monospace;background:#f7fafcee;border:1px solid #cbd5e0;padding:8px;max-width:420px;display:none}"
        "code{background:#edf2f7;padding:1px 4px}</style></head><body>",
        f"<h1>csp demo{' (quick)' if quick else ''}</h1>",
        "<p>Weight-sparse transformers trained on this Python's standard library, each pruned to the smallest circuit that "
        f"solves each of {len(task_lib.REGISTRY)} Python-code tasks (task loss ≤ {plan.prune.target:g} on held-out pairs, "
        f"{plan.prune.ablation} ablation). Outputs: <code>{e(root.uri)}</code>.</p>",
    ]
    for note in plan.notes:
        parts.append(f"<p><b>Note:</b> {e(note)}.</p>")
    parts.append("<p>Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".</p>")
    parts.append("<h2>Models</h2><table><tr><th class=l>model</th><th>d_model</th><th>weight density</th><th>nonzeros</th><th>val loss</th>"
                 "<th>tasks solved (full model)</th><th>verified circuits</th><th>geomean edges</th><th>quote task loss</th><th>quote circuit edges</th></tr>")
    for r in summary.itertuples():
        dens = "dense" if r.density >= 1 else f"1/{round(1 / r.density)}"
        parts.append(f"<tr><td class=l>{e(viz.model_label(r.pfrac, r.ef))}<br><small>{e(str(r.model_id))}</small></td><td>{r.d_model}</td>"
                     f"<td>{dens}</td><td>{r.nonzeros:,}</td><td>{r.val_loss:.3f}</td><td>{r.tasks_solved}</td><td>{r.tasks_with_circuit}</td>"
                     f"<td>{_num(r.geomean_edges, '.1f')}</td><td>{_num(r.quote_loss, '.3f')}</td><td>{_num(r.quote_edges, 'd')}</td></tr>")
    parts.append("</table>")
    front_svg = root.join("figures", "frontier.svg")
    parts.append("<h2>Frontier: capability vs interpretability</h2>"
                 "<p>Each point is a model: validation loss against the geometric mean of its circuits' edge counts. "
                 "Down and left is better on both. Files: <a href=\"figures/frontier.png\">PNG</a>, <a href=\"figures/frontier.svg\">SVG</a>.</p>")
    if storage.exists(front_svg):
        parts.append(f"<div class=\"fig frontier\">{_inline_svg(storage.read_text(front_svg))}</div>")
    parts.append("<h2>Circuits</h2><p>Edges of each (model, task) circuit; a link opens its diagram. "
                 "<span class=chance>chance</span> / <span class=chance>misses</span>: the full model does not do the task "
                 "(at chance, or above the target), so nothing was pruned.</p>")
    parts.append("<table><tr><th class=l>task</th>" + "".join(f"<th>{e(label[m])}</th>" for m in models) + "</tr>")
    cell = {(r.model_id, r.task): r for r in circ.itertuples()}
    for t in task_lib.REGISTRY:
        parts.append(f"<tr><td class=l>{e(t)}</td>")
        for m in models:
            r = cell.get((m, t))
            if r is None:
                parts.append("<td>—</td>")
                continue
            d = by_pair.get((m, t))
            if r.status in ("chance", "model_misses_target"):
                word = "chance" if r.status == "chance" else "misses"
                parts.append(f"<td class=chance title=\"full model: held-out loss {r.full_loss:.3f}, accuracy {r.full_accuracy:.2f}\">{word}</td>")
            elif d:
                cls = "ok" if r.status == "ok" else "tnr"
                parts.append(f"<td class={cls} title=\"{e(r.status)}: sufficiency loss {_num(r.sufficiency_loss, '.3f')}\">"
                             f"<a href=\"{e(_rel(root, d['html']))}\">{int(r.n_edges)} edges</a>{'' if r.status == 'ok' else ' *'}</td>")
            else:
                parts.append(f"<td>{e(r.status)}</td>")
        parts.append("</tr>")
    parts.append("</table><p>* not verified (met the target on selection pairs, not on test pairs) or target not reached: "
                 "the best circuit found is stored and drawn, and not counted.</p>")
    if ctl is not None and len(ctl):
        parts.append("<h2>Faithfulness controls</h2><p>A circuit is a claim about its model; these are its evidence. The same "
                     "architecture untrained (random_init) and the same prompts with answers assigned at random (nonsense_task) are "
                     "pruned with the same config and must <b>not</b> yield verified circuits; other ablations and pruning seeds show "
                     "how stable the circuit is (Jaccard: node-set overlap with the real circuit).</p>"
                     "<table><tr><th class=l>model</th><th class=l>task</th><th class=l>control</th><th class=l>status</th><th>nodes</th>"
                     "<th>test sufficiency loss</th><th>real circuit nodes</th><th>Jaccard</th><th class=l>verdict</th></tr>")
        for r in ctl.itertuples():
            verdict = "—" if r.passes is None or pd_isna(r.passes) else ("passes" if r.passes else "FAILS: a control verified")
            parts.append(f"<tr><td class=l>{e(label.get(r.model_id, r.model_id))}</td><td class=l>{e(r.task)}</td><td class=l>{e(r.control)}</td>"
                         f"<td class=l>{e(r.status)}</td><td>{_num(r.n_nodes, 'd')}</td><td>{_num(r.sufficiency_loss, '.3f')}</td>"
                         f"<td>{_num(r.real_n_nodes, 'd')}</td><td>{_num(r.jaccard, '.2f')}</td><td class=l>{verdict}</td></tr>")
        parts.append("</table>")
    featured = [d for d in diagrams if d["task"] == "single_double_quote"] or diagrams[:2]
    if featured:
        parts.append("<h2>Circuit diagrams</h2><p>Residual channels are vertical lines through the layers; curves are nonzero "
                     "weights (blue positive, red negative). Hover a node for its id and the tokens that activate it most.</p>")
        for d in featured:
            parts.append(f"<h3>{e(d['task'])} — {e(label.get(d['model_id'], d['model_id']))}</h3>"
                         f"<div class=\"fig circuit\">{_inline_svg(storage.read_text(d['svg']))}</div>")
    parts.append("<div id=\"panel\"></div><script>" + viz.PAGE_JS + "</script></body></html>\n")
    return "\n".join(parts)


def pd_isna(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def _num(v, fmt: str) -> str:
    """``v`` formatted, or a dash where it is missing (None, NaN or pandas' NA)."""
    import pandas as pd

    return "—" if pd.isna(v) else format(int(v) if fmt == "d" else v, fmt)
