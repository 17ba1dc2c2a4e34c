"""The demo's report: one self-contained HTML page (templates/report.html.j2, Jinja2 with
autoescaping) and the two text tables the demo prints. Everything shown is read from the
stored results — the models table, the circuits grid, the controls and the figures — so the
report can be rebuilt from a results store at any time."""

from __future__ import annotations

from importlib import resources

from cluster import storage
from jobs import viz
from sparsity import tasks as task_lib


def _num(v, fmt: str) -> str:
    """``v`` formatted, or a dash where it is missing (None, NaN or pandas' NA)."""
    import pandas as pd

    return "—" if v is None or pd.isna(v) else format(int(v) if fmt == "d" else v, fmt)


def _density(d: float) -> str:
    return "dense" if d >= 1 else f"1/{round(1 / d)}"


def _rel(root, uri: str) -> str:
    """``uri`` relative to the output root, for links that work from disk and from a copy."""
    base = root.uri.rstrip("/") + "/"
    return uri[len(base):] if uri.startswith(base) else uri


def _inline_svg(text: str) -> str:
    """An SVG document's <svg> element, for inlining in HTML."""
    i = text.find("<svg")
    return text[i:] if i >= 0 else text


def format_summary(df) -> str:
    """The models table as the demo prints it."""
    show = df.assign(
        model=[viz.model_label(p, e) for p, e in zip(df["pfrac"], df["ef"], strict=True)],
        density=[_density(d) for d in df["density"]],
        circuits=[f"{a}/{b}" for a, b in zip(df["tasks_with_circuit"], df["tasks_solved"], strict=True)],
        quote_edges=[_num(v, "d") for v in df["quote_edges"]],
    )[["model", "d_model", "density", "nonzeros", "val_loss", "circuits", "geomean_edges", "quote_loss", "quote_edges"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


def format_controls(ctl) -> str:
    """The controls table as the demo prints it."""
    show = ctl.assign(model=ctl["model_id"].str.rsplit("-", n=1).str[0])[
        ["model", "task", "control", "status", "n_nodes", "sufficiency_loss", "real_n_nodes", "jaccard", "passes"]]
    return show.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="—")


def _cell(r, d: dict | None, root) -> dict:
    """One (model, task) cell of the circuits grid."""
    if r is None:
        return {"kind": "missing"}
    if r.status in ("chance", "model_misses_target"):
        return {"kind": "no_task", "word": "chance" if r.status == "chance" else "misses",
                "title": f"full model: held-out loss {r.full_loss:.3f}, accuracy {r.full_accuracy:.2f}"}
    if d:
        return {"kind": "circuit", "css": "ok" if r.status == "ok" else "tnr", "href": _rel(root, d["html"]),
                "n_edges": int(r.n_edges), "title": f"{r.status}: sufficiency loss {_num(r.sufficiency_loss, '.3f')}"}
    return {"kind": "other", "status": r.status}


def render(plan, summary, circ, root, diagrams: list[dict], timings: dict, quick: bool, ctl=None) -> str:
    """The report page. ``summary``: the demo's models table; ``circ``: the real circuits
    rows of its pruning config; ``diagrams``: the drawn circuits ({model_id, task, svg,
    html}); ``ctl``: ``results.controls()`` or None."""
    import jinja2
    import pandas as pd

    by_pair = {(d["model_id"], d["task"]): d for d in diagrams}
    ids = [m for m in summary["model_id"] if m is not None]
    label = {r.model_id: viz.model_label(r.pfrac, r.ef) for r in summary.itertuples() if r.model_id is not None}
    models = [{"label": viz.model_label(r.pfrac, r.ef), "model_id": str(r.model_id), "d_model": r.d_model,
               "density": _density(r.density), "nonzeros": f"{r.nonzeros:,}", "val_loss": f"{r.val_loss:.3f}",
               "tasks_solved": r.tasks_solved, "tasks_with_circuit": r.tasks_with_circuit,
               "geomean_edges": _num(r.geomean_edges, ".1f"), "quote_loss": _num(r.quote_loss, ".3f"),
               "quote_edges": _num(r.quote_edges, "d")} for r in summary.itertuples()]
    cell = {(r.model_id, r.task): r for r in circ.itertuples()}
    grid = [{"task": t, "cells": [_cell(cell.get((m, t)), by_pair.get((m, t)), root) for m in ids]} for t in task_lib.REGISTRY]
    controls = []
    for r in ctl.itertuples() if ctl is not None else ():
        verdict = "—" if r.passes is None or pd.isna(r.passes) else ("passes" if r.passes else "FAILS: a control verified")
        controls.append({"label": label.get(r.model_id, r.model_id), "task": r.task, "control": r.control, "status": r.status,
                         "n_nodes": _num(r.n_nodes, "d"), "sufficiency_loss": _num(r.sufficiency_loss, ".3f"),
                         "real_n_nodes": _num(r.real_n_nodes, "d"), "jaccard": _num(r.jaccard, ".2f"), "verdict": verdict})
    featured = [d for d in diagrams if d["task"] == "single_double_quote"] or diagrams[:2]
    front_svg = root.join("figures", "frontier.svg")
    env = jinja2.Environment(autoescape=True, trim_blocks=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(resources.files("jobs").joinpath("templates", "report.html.j2").read_text(encoding="utf-8"))
    return template.render(
        quick=quick, n_tasks=len(task_lib.REGISTRY), target=f"{plan.prune.target:g}", ablation=plan.prune.ablation,
        root=root.uri, notes=plan.notes, timings=", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        models=models, column_labels=[label[m] for m in ids], grid=grid, controls=controls,
        frontier_svg=_inline_svg(storage.read_text(front_svg)) if storage.exists(front_svg) else None,
        featured=[{"task": d["task"], "label": label.get(d["model_id"], d["model_id"]), "svg": _inline_svg(storage.read_text(d["svg"]))}
                  for d in featured],
        page_js=viz.PAGE_JS,
    )
