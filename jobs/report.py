"""The demo's report: the models table (:func:`model_summary`: the sweep's numbers joined
with the stored circuits), one self-contained HTML page (templates/report.html.j2, Jinja2
with autoescaping) and the text tables the demo prints. Everything shown is read from the
stored results — the models table, the circuits grid, the controls and the figures — so the
report can be rebuilt from a results store at any time."""

from __future__ import annotations

import math
from importlib import resources

import pyarrow as pa

from cluster import storage
from jobs import diagram, results, sweep, viz
from jobs.claims import claim_verdict, density_label, frontier_claims
from sparsity import tasks as task_lib
from sparsity.circuit import solved
from sparsity.prune import PruneConfig

SUMMARY_SCHEMA = pa.schema([
    pa.field("model_id", pa.string()),
    pa.field("trial", pa.string()),
    pa.field("pfrac", pa.float64()),
    pa.field("ef", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("d_model", pa.int64()),
    pa.field("density", pa.float64()),
    pa.field("nonzeros", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("val_loss", pa.float64()),
    pa.field("tasks_solved", pa.int64()),
    pa.field("tasks_with_circuit", pa.int64()),
    pa.field("tasks_beating_random", pa.int64()),  # verified circuits clearly better than random node sets of their size
    pa.field("target", pa.float64()),  # the target the counts above are at (the plan's)
    pa.field("loose_target", pa.float64()),  # the plan's second target (null: none), and its counts
    pa.field("loose_tasks_solved", pa.int64()),
    pa.field("loose_tasks_with_circuit", pa.int64()),
    pa.field("geomean_edges", pa.float64()),
    pa.field("geomean_edges_common", pa.float64()),
    pa.field("quote_loss", pa.float64()),
    pa.field("quote_edges", pa.int64()),
    pa.field("probe_accuracy", pa.float64()),  # quote closing on code outside the corpus (sparsity/probe.py)
    pa.field("probe_loss", pa.float64()),
    pa.field("train_seconds", pa.float64()),
])

PROBE_PAIRS = 512  # the outside probe's pairs: accuracy's standard error ≤ 0.01 near 0.95


def probe_scores(checkpoint_uris) -> dict[str, dict]:
    """The outside probe (sparsity.probe) on each checkpoint: {uri: {"accuracy", "loss"}}.
    One probe per tokenizer and context, so every model of a sweep answers the same pairs."""
    from jobs.loader import LoadedModel
    from sparsity.probe import QuoteProbe

    probes: dict[tuple, QuoteProbe] = {}
    out = {}
    for uri in checkpoint_uris:
        m = LoadedModel(uri)
        ctx = m.model.config.block_size
        key = (m.data_uri, ctx)
        if key not in probes:
            probes[key] = QuoteProbe(m.tok, n=PROBE_PAIRS, max_tokens=min(96, ctx))
        out[uri] = probes[key].score(m.model)
    return out


def model_summary(sweep_uri: str, results_uri: str, target: float = PruneConfig.target, loose: float | None = None):
    """One row per model: the sweep's numbers joined with its circuits at ``target`` (and the
    counts at a second, ``loose`` target)."""
    import pandas as pd

    trials = sweep.read_summary(sweep_uri)
    probe = probe_scores(list(trials["checkpoint_uri"]))
    every = results.circuits(results_uri)
    every = every[every["control"].isna()]
    circ = results.at_target(every, target)
    far = results.at_target(every, loose) if loose is not None else every.iloc[0:0]
    front = results.frontier(results_uri, target)
    rows = []
    for t in trials.itertuples():
        c = circ[circ["checkpoint_uri"] == t.checkpoint_uri]
        c2 = far[far["checkpoint_uri"] == t.checkpoint_uri]
        f = front[front["model_id"].isin(c["model_id"])] if len(c) else front.iloc[0:0]
        quote = c[c["task"] == "single_double_quote"]
        q_ok = quote[quote["status"] == "ok"]
        ef = float(t.ef)
        rows.append({
            "model_id": c["model_id"].iloc[0] if len(c) else None, "trial": t.trial, "pfrac": t.pfrac, "ef": ef, "seed": int(t.seed),
            "d_model": t.d_model, "density": viz.density(t.pfrac, ef, getattr(t, "density", None)), "nonzeros": t.nonzeros, "steps": t.steps,
            "val_loss": t.val_loss, "tasks_solved": int(c["status"].map(solved).sum()) if len(c) else 0,
            "tasks_with_circuit": int((c["status"] == "ok").sum()) if len(c) else 0,
            "tasks_beating_random": int(((c["status"] == "ok") & c["beats_random_keep"].fillna(False).astype(bool)).sum()),
            "target": target, "loose_target": loose,
            "loose_tasks_solved": int(c2["status"].map(solved).sum()) if loose is not None else None,
            "loose_tasks_with_circuit": int((c2["status"] == "ok").sum()) if loose is not None else None,
            "geomean_edges": float(f["geomean_edges"].iloc[0]) if len(f) else math.nan,
            "geomean_edges_common": float(f["geomean_edges_common"].iloc[0]) if len(f) else math.nan,
            "quote_loss": float(quote["full_loss"].iloc[0]) if len(quote) else math.nan,
            "quote_edges": int(q_ok["n_edges"].iloc[0]) if len(q_ok) else None,
            "probe_accuracy": probe[t.checkpoint_uri]["accuracy"], "probe_loss": probe[t.checkpoint_uri]["loss"],
            "train_seconds": t.wall_seconds,
        })
    df = pd.DataFrame(rows, columns=[f.name for f in SUMMARY_SCHEMA])
    for col in ("quote_edges", "loose_tasks_solved", "loose_tasks_with_circuit"):
        df[col] = df[col].astype("Int64")
    return df.sort_values(["ef", "pfrac", "seed"]).reset_index(drop=True)


def _num(v, fmt: str) -> str:
    """``v`` formatted, or a dash where it is missing (None, NaN or pandas' NA)."""
    import pandas as pd

    return "—" if v is None or pd.isna(v) else format(int(v) if fmt == "d" else v, fmt)


def _rel(root, uri: str) -> str:
    """``uri`` relative to the output root, for links that work from disk and from a copy."""
    base = root.uri.rstrip("/") + "/"
    return uri[len(base):] if uri.startswith(base) else uri


def _inline_svg(text: str) -> str:
    """An SVG document's <svg> element, for inlining in HTML."""
    i = text.find("<svg")
    return text[i:] if i >= 0 else text


def label(pfrac: float, ef: float, seed=0) -> str:
    """A model's name in tables and plots: its density and width, and its seed when not 0."""
    return viz.model_label(pfrac, ef) + (f", seed {int(seed)}" if seed else "")


def format_summary(df) -> str:
    """The models table as the demo prints it."""
    seeds = df["seed"] if "seed" in df else [0] * len(df)
    show = df.assign(
        model=[label(p, e, s) for p, e, s in zip(df["pfrac"], df["ef"], seeds, strict=True)],
        density=[density_label(d) for d in df["density"]],
        circuits=[f"{a}/{b}" for a, b in zip(df["tasks_with_circuit"], df["tasks_solved"], strict=True)],
        beat_random=[_num(v, "d") for v in (df["tasks_beating_random"] if "tasks_beating_random" in df else [None] * len(df))],
        loose=[f"{_num(a, 'd')}/{_num(b, 'd')}" for a, b in zip(df.get("loose_tasks_with_circuit", [None] * len(df)),
                                                            df.get("loose_tasks_solved", [None] * len(df)), strict=True)],
        quote_edges=[_num(v, "d") for v in df["quote_edges"]],
        probe=[_num(v, ".3f") for v in df["probe_accuracy"]],
    )[["model", "d_model", "density", "nonzeros", "val_loss", "probe", "circuits", "beat_random", "loose", "geomean_edges",
       "quote_loss", "quote_edges"]]
    names = {"circuits": f"circuits@{_target_of(df, 'target')}", "loose": f"circuits@{_target_of(df, 'loose_target')}"}
    return show.rename(columns=names).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


CHECK_COLUMNS = ["sufficiency_loss", "partial_ablation_loss", "partial_ablation_worst", "random_keep_loss", "random_keep_best",
                 "beats_random_keep", "ablated_loss", "necessity_loss", "necessity_random_loss"]


def circuit_checks(circ, label_of: dict | None = None):
    """One row per verified circuit of ``circ`` (real circuits' rows): its test sufficiency
    beside partial ablation, random node sets of its size kept instead, the direct path
    (every node ablated) and necessity beside its random baseline."""
    ok = circ[circ["status"] == "ok"].sort_values(["model_id", "task"])
    cols = [c for c in CHECK_COLUMNS if c in ok]
    out = ok[["model_id", "task", "n_nodes", "n_edges", *cols]].copy()
    out.insert(0, "model", [(label_of or {}).get(m, str(m).rsplit("-", 1)[0]) for m in out["model_id"]])
    return out.drop(columns=["model_id"]).reset_index(drop=True)


def format_checks(circ) -> str:
    """The verified circuits' checks as the demo prints them."""
    df = circuit_checks(circ)
    if df.empty:
        return "(no verified circuits)"
    names = {"sufficiency_loss": "suff", "partial_ablation_loss": "partial", "partial_ablation_worst": "partial_worst",
             "random_keep_loss": "random_keep", "random_keep_best": "random_best", "beats_random_keep": "beats_random",
             "ablated_loss": "all_ablated", "necessity_loss": "necessity", "necessity_random_loss": "necessity_random"}
    return df.rename(columns=names).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


def _target_of(df, col: str) -> str:
    vals = df[col].dropna() if col in df else []
    return f"{float(vals.iloc[0]):g}" if len(vals) else "—"


def control_verdict(r) -> str:
    """A control row's verdict in words (``passes`` from results.controls)."""
    import pandas as pd

    if r.control.startswith(("seed_", "ablation_")):
        return "reported (not judged)"
    if r.passes is None or pd.isna(r.passes):
        return f"not run ({r.status}: never reached the test pairs)"
    return "passes (did not verify)" if r.passes else "FAILS: it verified"


def format_controls(ctl) -> str:
    """The controls table as the demo prints it."""
    show = ctl.assign(model=ctl["model_id"].str.rsplit("-", n=1).str[0], verdict=[control_verdict(r) for r in ctl.itertuples()])[
        ["model", "task", "target", "control", "status", "n_nodes", "full_loss", "sufficiency_loss", "real_n_nodes", "jaccard",
         "verdict"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


# Why a (model, task) pair has no verified circuit, in the order the verdict lists them.
NO_CIRCUIT_WORDS = (("not_verified", "met the target on selection pairs but not on test pairs"),
                    ("target_not_reached", "no circuit met the target"),
                    ("trivial", "solved by the direct embedding → unembedding path alone"),
                    ("model_misses_target", "the full model does the task but misses the target"),
                    ("chance", "the full model is at chance"), ("failed", "pruning failed"))


def verdicts(summary, circ, claims: list[str], ctl=None) -> dict:
    """The report's opening block: each claim with its verdict, per model why tasks have no
    verified circuit (counts of each status, with the nearest miss), and the controls'
    tally. ``circ``: the real circuit rows at the plan's target."""
    models = []
    for r in summary.itertuples():
        rows = circ[circ["model_id"] == r.model_id] if r.model_id is not None else circ.iloc[0:0]
        counts = rows["status"].value_counts()
        parts = [f"{int(counts.get('ok', 0))} verified"]
        for status, words in NO_CIRCUIT_WORDS:
            n = int(counts.get(status, 0))
            if n:
                near = rows[rows["status"] == status].sort_values("full_loss").iloc[0] if status == "model_misses_target" else None
                parts.append(f"{n} {words}" + (f" (nearest: {near['task']}, {near['full_loss']:.3f})" if near is not None else ""))
        models.append({"label": label(r.pfrac, r.ef, getattr(r, "seed", 0)), "text": "; ".join(parts)})
    tally = None
    if ctl is not None and len(ctl):
        judged = [control_verdict(r) for r in ctl.itertuples()]
        tally = {"passes": sum(v.startswith("passes") for v in judged), "fails": sum(v.startswith("FAILS") for v in judged),
                 "not_run": sum(v.startswith("not run") for v in judged), "reported": sum(v.startswith("reported") for v in judged)}
    return {"claims": [{"text": c, "verdict": claim_verdict(c)} for c in claims], "models": models, "controls": tally,
            "any_verified": bool((circ["status"] == "ok").any()) if len(circ) else False,
            "n_pairs": int(len(circ)), "n_ok": int((circ["status"] == "ok").sum()) if len(circ) else 0,
            "n_models": int(summary["model_id"].notna().sum()) if len(summary) else 0}


def _cell(r, d: dict | None, root) -> dict:
    """One (model, task) cell of the circuits grid."""
    if r is None:
        return {"kind": "missing"}
    full = _num(getattr(r, "full_loss", None), ".3f")  # the full model's held-out loss: every cell shows it against the target
    if r.status in ("chance", "model_misses_target"):
        return {"kind": "no_task", "word": "chance" if r.status == "chance" else "misses", "full": full,
                "title": f"full model: held-out loss {r.full_loss:.3f}, accuracy {r.full_accuracy:.2f}"}
    if d:
        import pandas as pd

        beats = getattr(r, "beats_random_keep", None)
        weak = r.status == "ok" and beats is not None and not pd.isna(beats) and not bool(beats)  # False, not unknown
        title = (f"{r.status}: sufficiency loss {_num(r.sufficiency_loss, '.3f')}, best random set of its size "
                 f"{_num(getattr(r, 'random_keep_best', None), '.3f')}, half the rest ablated {_num(getattr(r, 'partial_ablation_loss', None), '.3f')}")
        return {"kind": "circuit", "css": "ok" if r.status == "ok" else "tnr", "href": _rel(root, d["html"]), "weak": weak,
                "n_edges": int(r.n_edges), "title": title, "full": full}
    if r.status == "trivial":
        return {"kind": "other", "status": "direct path", "full": full,
                "title": f"every node ablated: loss {_num(getattr(r, 'ablated_loss', None), '.3f')}"}
    return {"kind": "other", "status": r.status, "title": "", "full": full}


def render(plan, summary, circ, root, diagrams: list[dict], timings: dict, quick: bool, ctl=None, over=None) -> str:
    """The report page. ``summary``: the demo's models table; ``circ``: the real circuits
    rows of its pruning config; ``diagrams``: the drawn circuits ({model_id, task, svg,
    html}); ``ctl``: ``results.controls()`` or None; ``over``: ``results.over_training()``
    of the demo's over-training store, or None."""
    import jinja2
    import pandas as pd

    by_pair = {(d["model_id"], d["task"]): d for d in diagrams}
    ids = [m for m in summary["model_id"] if m is not None]
    label_of = {r.model_id: label(r.pfrac, r.ef, getattr(r, "seed", 0)) for r in summary.itertuples() if r.model_id is not None}
    models = [{"label": label(r.pfrac, r.ef, getattr(r, "seed", 0)), "model_id": str(r.model_id), "d_model": r.d_model,
               "density": density_label(r.density), "nonzeros": f"{r.nonzeros:,}", "val_loss": f"{r.val_loss:.3f}",
               "tasks_solved": r.tasks_solved, "tasks_with_circuit": r.tasks_with_circuit,
               "beat_random": _num(getattr(r, "tasks_beating_random", None), "d"),
               "loose": f"{_num(getattr(r, 'loose_tasks_with_circuit', None), 'd')}/{_num(getattr(r, 'loose_tasks_solved', None), 'd')}",
               "geomean_edges": _num(r.geomean_edges, ".1f"), "quote_loss": _num(r.quote_loss, ".3f"),
               "quote_edges": _num(r.quote_edges, "d"), "probe": _num(r.probe_accuracy, ".3f")} for r in summary.itertuples()]
    cell = {(r.model_id, r.task): r for r in circ.itertuples()}
    grid = [{"task": t, "cells": [_cell(cell.get((m, t)), by_pair.get((m, t)), root) for m in ids]} for t in task_lib.REGISTRY]
    controls = []
    for r in ctl.itertuples() if ctl is not None else ():
        controls.append({"label": label_of.get(r.model_id, r.model_id), "task": r.task, "target": _num(r.target, "g"),
                         "control": r.control, "status": r.status, "full_loss": _num(r.full_loss, ".3f"), "verdict": control_verdict(r),
                         "n_nodes": _num(r.n_nodes, "d"), "sufficiency_loss": _num(r.sufficiency_loss, ".3f"),
                         "real_n_nodes": _num(r.real_n_nodes, "d"), "jaccard": _num(r.jaccard, ".2f")})
    checks = [{"label": r.model, "task": r.task, "nodes": _num(r.n_nodes, "d"), "edges": _num(r.n_edges, "d"),
               **{c: _num(getattr(r, c, None), ".3f") for c in CHECK_COLUMNS if c != "beats_random_keep"},
               "beats": "—" if pd.isna(getattr(r, "beats_random_keep", None)) else ("yes" if r.beats_random_keep else "NO")}
              for r in circuit_checks(circ, label_of).itertuples()]
    featured = [d for d in diagrams if d["task"] == "single_double_quote"] or diagrams[:2]
    front_svg = root.join("figures", "frontier.svg")
    over_rows = [] if over is None else [
        {"trial": r.trial, "task": r.task, "target": _num(r.target, "g"), "step": int(r.step), "status": r.status,
         "full_loss": _num(r.full_loss, ".3f"), "n_nodes": _num(r.n_nodes, "d"), "n_edges": _num(r.n_edges, "d"),
         "jaccard": _num(r.jaccard_prev, ".2f")} for r in over.itertuples()]
    claims = frontier_claims(summary, circ)
    env = jinja2.Environment(autoescape=True, trim_blocks=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(resources.files("jobs").joinpath("templates", "report.html.j2").read_text(encoding="utf-8"))
    return template.render(
        quick=quick, n_tasks=len(task_lib.REGISTRY), target=f"{plan.prune.target:g}", ablation=plan.prune.ablation,
        loose_target=f"{plan.prune.also_targets[0]:g}" if plan.prune.also_targets else None,
        root=root.uri, notes=plan.notes, timings=", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        models=models, column_labels=[label_of[m] for m in ids], grid=grid, controls=controls, checks=checks,
        starred=any(c["kind"] == "circuit" and c["css"] != "ok" for row in grid for c in row["cells"]),
        frontier_svg=_inline_svg(storage.read_text(front_svg)) if storage.exists(front_svg) else None,
        featured=[{"task": d["task"], "label": label_of.get(d["model_id"], d["model_id"]), "svg": _inline_svg(storage.read_text(d["svg"]))}
                  for d in featured],
        page_js=diagram.PAGE_JS, claims=claims, verdict=verdicts(summary, circ, claims, ctl), over=over_rows,
        over_png="figures/over-training.png" if over_rows and storage.exists(root.join("figures", "over-training.png")) else None,
    )
