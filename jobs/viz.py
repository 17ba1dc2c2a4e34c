"""Figures from the results store: the frontier plot and circuit diagrams.

* :func:`plot_frontier` — per model, validation loss (capability) against the geometric mean
  of circuit edges over tasks (interpretability), as PNG and SVG (matplotlib).
* :func:`render_circuit` — one circuit drawn the way the paper draws them: every kept
  residual channel is a vertical line through all layers; each layer is six rows (attention
  reads, q/k/v channels, attention writes, MLP reads, MLP neurons, MLP writes); weight edges
  are curves coloured by sign with width by |weight|. Hovering a node shows its id and the
  pretraining tokens that activate it most. The output is one self-contained SVG and an
  HTML page around it (inline script and style, nothing fetched), so it opens from disk.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict

import torch

from cluster import data, storage
from jobs import loader, results
from sparsity.circuit import drawable
from sparsity.config import SparsityConfig
from sparsity.errors import CspError

RESID_LOCS = ("attn.act_in", "attn.resid_delta", "mlp.act_in", "mlp.resid_delta")
ROWS = (  # (location or group, row label); six rows per layer, top to bottom
    ("attn.act_in", "attn reads"),
    ("attn.qkv", "q · k · v"),
    ("attn.resid_delta", "attn writes"),
    ("mlp.act_in", "mlp reads"),
    ("mlp.post_act", "neurons"),
    ("mlp.resid_delta", "mlp writes"),
)
COLORS = {"attn.act_in": "#4a5568", "attn.q": "#805ad5", "attn.k": "#dd6b20", "attn.v": "#2f855a",
          "attn.resid_delta": "#2c5282", "mlp.act_in": "#4a5568", "mlp.post_act": "#b7791f", "mlp.resid_delta": "#2c5282"}
POS, NEG = "#2166ac", "#b2182b"
TOP_ROWS = 64  # validation sequences scanned for top-activating tokens
MAX_EDGES = 1500  # a diagram draws at most this many weight edges, the largest |w| first


class VizError(CspError):
    pass


# ---------------------------------------------------------------- frontier

def density(pfrac: float, ef: float, stored: float | None = None) -> float:
    """Weight density of every block matrix: the one stored with the model's rows (it knows
    ef_mlp), else derived from (pfrac, ef) for rows written before it was stored."""
    if stored is not None and stored == stored:  # not None, not NaN
        return float(stored)
    return SparsityConfig(pfrac=float(pfrac), ef=float(ef)).l0frac


def model_label(pfrac: float, ef: float, stored_density: float | None = None) -> str:
    """'pfrac 1/8 · ef 2', or 'dense · ef 1' when every matrix is dense at that width."""
    p = "dense" if density(pfrac, ef, stored_density) >= 1 else (f"pfrac 1/{round(1 / pfrac)}" if pfrac < 1 and abs(1 / pfrac - round(1 / pfrac)) < 1e-6 else f"pfrac {pfrac:g}")
    return f"{p} · ef {ef:g}"


def plot_frontier(results_uri: str, out_uri: str | None = None, target: float | None = None) -> list[str]:
    """Write frontier.png and frontier.svg under ``out_uri`` (default RESULTS/figures), from
    the circuits at ``target`` (default: the strictest target stored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if target is None:
        targets = results.circuits(results_uri)["target"].dropna()
        target = float(targets.min()) if len(targets) else None
    f = results.frontier(results_uri, target)
    if f.empty:
        raise VizError(f"no circuits stored under {storage.resolve(results_uri).uri}; run `csp prune` or `csp demo` first")
    common = int(f["common_tasks"].iloc[0])
    col = "geomean_edges_common" if common else "geomean_edges"
    plotted = f[f[col].notna()]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    cmap = plt.get_cmap("viridis")
    efs = sorted(f["ef"].unique())
    for i, ef in enumerate(efs):
        g = plotted[plotted["ef"] == ef].sort_values("pfrac")
        if g.empty:  # this width's models have no circuits: named in the title instead
            continue
        color = cmap(0.15 + 0.7 * i / max(1, len(efs) - 1))
        is_dense = g.apply(lambda r: density(r["pfrac"], r["ef"], r.get("density")) >= 1, axis=1).astype(bool)
        sparse, dense = g[~is_dense], g[is_dense]
        if len(sparse) > 1:
            ax.plot(sparse[col], sparse["val_loss"], "-", color=color, alpha=0.5, lw=1)
        if len(sparse):
            ax.scatter(sparse[col], sparse["val_loss"], s=60, color=color, edgecolor="black", lw=0.5, label=f"ef {ef:g} (d_model ×{ef:g})", zorder=3)
        if len(dense):
            ax.scatter(dense[col], dense["val_loss"], s=70, marker="s", color=color, edgecolor="black", lw=0.5, label=f"dense, ef {ef:g}", zorder=3)
        for _, r in g.iterrows():
            ax.annotate(f"{model_label(r['pfrac'], r['ef'], r.get('density'))}\n{int(r['tasks_with_circuit'])}/{int(r['tasks'])} tasks",
                        (r[col], r["val_loss"]), textcoords="offset points", xytext=(7, 4), fontsize=7.5)
    missing = f[f[col].isna()]
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.12)  # room for the labels above the top point
    ax.set_xlabel("circuit size: geometric-mean edges over " + (f"the {common} task(s) every model solved" if common else "each model's solved tasks") + "  (← more interpretable)")
    ax.set_ylabel("validation loss  (← more capable)")
    title = "Capability vs interpretability" + (f" (circuits at target {target:g})" if target is not None else "")
    if len(missing):
        title += f"  ({len(missing)} model(s) without circuits not shown)"
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    if len(plotted):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no model met the target on any task", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = storage.resolve(out_uri) if out_uri else storage.resolve(results_uri).join("figures")
    written = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        loc = out.join(f"frontier.{fmt}")
        storage.write_bytes(loc, buf.getvalue())
        written.append(loc.uri)
    plt.close(fig)
    return written


# ---------------------------------------------------------------- top-activating tokens

@torch.no_grad()
def top_tokens(model, tok, rows: torch.Tensor, nodes: list[tuple[int, str, int]], k: int = 5, context: int = 6) -> dict[tuple, list[dict]]:
    """For each node, the ``k`` positions of ``rows`` where its activation is largest in
    magnitude: ``{"token", "context", "value"}`` (context: the preceding tokens)."""
    by_hook: dict[str, list[int]] = defaultdict(list)
    for layer, loc, idx in nodes:
        by_hook[f"{layer}.{loc}"].append(idx)
    if not by_hook:
        return {}
    acts: dict[str, list[torch.Tensor]] = defaultdict(list)
    model.eval()
    for i in range(0, len(rows), 16):
        with model.hooks.record(list(by_hook)) as cache:
            model(rows[i : i + 16])
        for name, idxs in by_hook.items():
            acts[name].append(cache[name][..., idxs].float().reshape(-1, len(idxs)))
    flat = rows.reshape(-1)
    T = rows.shape[1]
    out = {}
    for name, idxs in by_hook.items():
        a = torch.cat(acts[name])  # (positions, nodes)
        kk = min(k, a.shape[0])
        vals, pos = a.abs().topk(kk, dim=0)
        layer, loc = name.split(".", 1)
        for j, idx in enumerate(idxs):
            items = []
            for v, p in zip(vals[:, j].tolist(), pos[:, j].tolist(), strict=True):
                if v == 0:
                    break
                start = p - min(context, p % T)
                items.append({"token": tok.decode([int(flat[p])]), "context": tok.decode(flat[start:p].tolist()), "value": float(a[p, j])})
            out[(int(layer), loc, idx)] = items
    return out


def _show(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "⇥")


# ---------------------------------------------------------------- the circuit diagram

def circuit_svg(row: dict, nodes: list[tuple[int, str, int]], edges: list[dict], n_layer: int, d_head: int,
                tops: dict[tuple, list[dict]] | None = None) -> str:
    """The circuit as one standalone SVG document (see the module docstring)."""
    tops = tops or {}
    kept = set(nodes)
    resid_cols = sorted({i for (_, loc, i) in nodes if loc in RESID_LOCS})
    mids: dict[tuple[int, str], list[tuple[int, str, int]]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: (n[0], n[2] // d_head if n[1] in ("attn.q", "attn.k", "attn.v") else 0, n[1], n[2])):
        if n[1] in ("attn.q", "attn.k", "attn.v"):
            mids[(n[0], "attn.qkv")].append(n)
        elif n[1] == "mlp.post_act":
            mids[(n[0], "mlp.post_act")].append(n)
    left, top, col_w, mid_w, row_h = 120, 96, 16, 11, 58
    widest = max([len(resid_cols) * col_w] + [len(v) * mid_w for v in mids.values()] + [420])
    width = left + widest + 40
    n_rows = n_layer * len(ROWS)
    height = top + n_rows * row_h + 50
    row_y = {(layer, key): top + (layer * len(ROWS) + r) * row_h + row_h / 2 for layer in range(n_layer) for r, (key, _) in enumerate(ROWS)}
    col_x = {c: left + (i + 0.5) * (widest / max(1, len(resid_cols))) for i, c in enumerate(resid_cols)}
    pos: dict[tuple, tuple[float, float]] = {}
    for layer, loc, idx in nodes:
        if loc in RESID_LOCS:
            pos[(layer, loc, idx)] = (col_x[idx], row_y[(layer, loc)])
    for (layer, key), group in mids.items():
        step = widest / len(group)
        for i, n in enumerate(group):
            pos[n] = (left + (i + 0.5) * step, row_y[(layer, key)])

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="csp-circuit" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" '
           f'data-model="{e(str(row.get("model_id")))}" data-task="{e(str(row.get("task")))}">']
    out.append('<style>.edge{fill:none;opacity:.55}.resid{stroke:#cbd5e0;stroke-width:1}.resid-live{stroke:#718096;stroke-width:2}'
               '.node circle,.node rect{stroke:#1a202c;stroke-width:.6}.lbl{font-size:10px;fill:#4a5568}.small{font-size:7px;fill:#4a5568}'
               '.hl{opacity:1!important;stroke-width:3!important}.dim .edge{opacity:.08}</style>')
    out.append('<rect width="100%" height="100%" fill="white"/>')
    m = row
    head = (f"{m.get('task')} — {m.get('model_id')}")
    sub = (f"status {m.get('status')} · {len(nodes)} nodes · {int(m.get('n_edges') or 0)} weight edges "
           f"(+{int(m.get('n_edges_resid') or 0)} residual) · loss: model {_fmt(m.get('full_loss'))}, circuit {_fmt(m.get('sufficiency_loss'))}, "
           f"circuit ablated {_fmt(m.get('necessity_loss'))} (target {_fmt(m.get('target'))})")
    n_weighted = sum(1 for x in edges if x["kind"] != "resid")
    if n_weighted > MAX_EDGES:
        sub += f" · drawing the {MAX_EDGES} largest |w| of {n_weighted} edges"
    out.append(f'<text x="16" y="26" font-size="15" font-weight="bold">{e(head)}</text>')
    out.append(f'<text x="16" y="46" font-size="11" fill="#2d3748">{e(sub)}</text>')
    out.append(f'<text x="16" y="64" font-size="10" fill="#4a5568">vertical lines: residual channels · curves: nonzero weights '
               f'(<tspan fill="{POS}">blue +</tspan>, <tspan fill="{NEG}">red −</tspan>, width ∝ |w|) · nodes: '
               f'<tspan fill="{COLORS["attn.q"]}">q</tspan> <tspan fill="{COLORS["attn.k"]}">k</tspan> '
               f'<tspan fill="{COLORS["attn.v"]}">v</tspan> <tspan fill="{COLORS["mlp.post_act"]}">neuron</tspan> · hover a node</text>')
    for layer in range(n_layer):  # layer bands and row labels
        y0 = top + layer * len(ROWS) * row_h
        out.append(f'<rect x="4" y="{y0:.0f}" width="{width - 8:.0f}" height="{len(ROWS) * row_h:.0f}" fill="{"#f7fafc" if layer % 2 == 0 else "#ffffff"}"/>')
        for key, label in ROWS:
            out.append(f'<text class="lbl" x="10" y="{row_y[(layer, key)] + 3:.0f}">L{layer} {label}</text>')
    y_first, y_last = top + 4, top + n_rows * row_h - 4
    for c in resid_cols:  # residual channels: a vertical line each, darker where the circuit carries it
        x = col_x[c]
        out.append(f'<line class="resid" x1="{x:.1f}" y1="{y_first}" x2="{x:.1f}" y2="{y_last}"><title>residual channel {c}</title></line>')
        ys = [pos[n][1] for n in nodes if n[2] == c and n[1] in RESID_LOCS]
        if len(ys) > 1:
            out.append(f'<line class="resid-live" x1="{x:.1f}" y1="{min(ys):.1f}" x2="{x:.1f}" y2="{max(ys):.1f}"/>')
        out.append(f'<text class="small" x="{x:.1f}" y="{top - 4}" text-anchor="middle">{c}</text>')
    weighted = sorted((x for x in edges if x["kind"] != "resid"), key=lambda x: -abs(x["weight"]))
    wmax = abs(weighted[0]["weight"]) if weighted else 1.0
    for x in reversed(weighted[:MAX_EDGES]):  # the strongest drawn last, on top
        s, d = tuple(x["src"]), tuple(x["dst"])
        if s not in pos or d not in pos:
            continue
        (x1, y1), (x2, y2) = pos[s], pos[d]
        ym = (y1 + y2) / 2
        w = x["weight"]
        out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{ym:.1f} {x2:.1f},{ym:.1f} {x2:.1f},{y2:.1f}" '
                   f'stroke="{POS if w > 0 else NEG}" stroke-width="{0.5 + 2.5 * abs(w) / wmax:.2f}" '
                   f'data-src="{_nid(s)}" data-dst="{_nid(d)}"><title>{_nid(s)} → {_nid(d)}: {w:+.3f}</title></path>')
    show_idx = all(len(g) <= 48 for g in mids.values())
    for n in sorted(kept):
        x, y = pos[n]
        layer, loc, idx = n
        tip = [f"{_nid(n)}" + (f"  (head {idx // d_head}, {loc[-1]} channel {idx % d_head})" if loc in ("attn.q", "attn.k", "attn.v") else "")]
        for t in tops.get(n, []):
            tip.append(f"{t['value']:+.2f}  …{_show(t['context'])}[{_show(t['token'])}]")
        if n in tops and not tops[n]:
            tip.append("(never active on the scanned text)")
        body = (f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" rx="1.5" fill="{COLORS[loc]}"/>' if loc in ("attn.q", "attn.k", "attn.v")
                else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4.5 if loc in RESID_LOCS else 4:.1f}" fill="{COLORS[loc]}"/>')
        label = f'<text class="small" x="{x:.1f}" y="{y + 13:.1f}" text-anchor="middle">{idx}</text>' if show_idx and loc not in RESID_LOCS else ""
        out.append(f'<g class="node" data-id="{_nid(n)}" data-loc="{loc}"><title>{e(chr(10).join(tip))}</title>{body}{label}</g>')
    out.append("</svg>")
    return "\n".join(out)


def _nid(n) -> str:
    return f"L{n[0]}.{n[1]}[{n[2]}]"


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


PAGE_JS = """
document.querySelectorAll('svg.csp-circuit').forEach(function (svg) {
  var panel = document.getElementById('panel');
  var edges = Array.prototype.slice.call(svg.querySelectorAll('.edge'));
  svg.querySelectorAll('.node').forEach(function (g) {
    g.addEventListener('mouseenter', function () {
      var id = g.getAttribute('data-id');
      svg.classList.add('dim');
      edges.forEach(function (e) {
        if (e.getAttribute('data-src') === id || e.getAttribute('data-dst') === id) e.classList.add('hl');
      });
      if (panel) { panel.textContent = g.querySelector('title').textContent; panel.style.display = 'block'; }
    });
    g.addEventListener('mouseleave', function () {
      svg.classList.remove('dim');
      edges.forEach(function (e) { e.classList.remove('hl'); });
    });
  });
});
"""


def circuit_page(svg: str, title: str) -> str:
    """A self-contained HTML page around one circuit SVG: hover highlights a node's edges
    and shows its top-activating tokens in a side panel."""
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:Helvetica,Arial,sans-serif;margin:16px;color:#1a202c}"
            "#wrap{display:flex;gap:16px;align-items:flex-start}#fig{overflow:auto;max-width:calc(100vw - 360px)}"
            "#panel{white-space:pre-wrap;font:12px Menlo,Consolas,monospace;background:#f7fafc;border:1px solid #e2e8f0;"
            "padding:10px;min-width:300px;max-width:320px;overflow:auto;position:sticky;top:8px}</style></head><body>"
            f"<div id=\"wrap\"><div id=\"fig\">{svg}</div><div id=\"panel\">Hover a node: its id and the pretraining tokens "
            "that activate it most ([token] after its context).</div></div>"
            f"<script>{PAGE_JS}</script></body></html>\n")


def find_model(results_uri: str, model: str, task: str | None = None) -> str:
    """The stored model id that ``model`` names: an exact id or a unique prefix (a trial name)."""
    ids = sorted(set(results.circuits(results_uri, task=task)["model_id"]))
    if model in ids:
        return model
    hits = [i for i in ids if i.startswith(model)]
    if len(hits) == 1:
        return hits[0]
    where = storage.resolve(results_uri).uri
    if not ids:
        raise VizError(f"no circuits stored under {where}" + (f" for task {task!r}" if task else ""))
    if hits:
        raise VizError(f"--model {model!r} matches {len(hits)} models ({', '.join(hits[:4])}…); give more of the id")
    raise VizError(f"no model {model!r} under {where}; stored: {', '.join(ids[:6])}{'…' if len(ids) > 6 else ''}")


class CircuitRenderer:
    """Draws circuits of one results store, loading each model once for its top tokens."""

    def __init__(self, results_uri: str, data_uri: str | None = None, with_tokens: bool = True):
        self.results_uri = results_uri
        self.data_uri = data_uri
        self.with_tokens = with_tokens
        self._rows: dict[str, object] = {}  # val rows scanned for top tokens, of the resident model

    def _model(self, ckpt_uri: str):
        m = loader.cached(ckpt_uri, self.data_uri, need_tokenizer=False)
        if ckpt_uri not in self._rows:
            rows = None
            if self.with_tokens and m.tok is not None:
                block = m.model.config.block_size
                rows = torch.from_numpy(data.load_rows(m.data_uri, "val", max_rows=TOP_ROWS)[:, :block].astype("int64"))
            self._rows.clear()
            self._rows[ckpt_uri] = rows
        return m.ckpt, m.model, m.tok if self.with_tokens else None, self._rows[ckpt_uri]

    def svg(self, model_id: str, task: str, prune_key: str | None = None) -> str:
        rows = results.circuits(self.results_uri, task=task, model=model_id)
        rows = rows[rows["control"].isna()]  # the real circuit, not a control
        if prune_key:
            rows = rows[rows["prune_key"] == prune_key]
        if rows.empty:
            raise VizError(f"no stored result for model {model_id!r} and task {task!r}")
        # Several pruning configs: a verified circuit first, the strictest target, then key order.
        row = rows.assign(_ok=rows["status"] != "ok").sort_values(["_ok", "target", "prune_key"]).iloc[0].to_dict()
        if not drawable(row["status"], row.get("n_nodes")):
            raise VizError(f"{model_id} has no circuit for {task} (status {row['status']}); choose a task with status ok")
        nd = results.nodes(self.results_uri, task=task, model=model_id)
        ed = results.edges(self.results_uri, task=task, model=model_id)
        nd = nd[(nd["prune_key"] == row["prune_key"]) & nd["control"].isna()]
        ed = ed[(ed["prune_key"] == row["prune_key"]) & ed["control"].isna()]
        nodes = [(int(r.layer), r.location, int(r.node_index)) for r in nd.itertuples()]
        edges = [{"src": (int(r.src_layer), r.src_location, int(r.src_index)), "dst": (int(r.dst_layer), r.dst_location, int(r.dst_index)),
                  "kind": r.kind, "weight": float(r.weight)} for r in ed.itertuples()]
        ckpt, model, tok, scan = self._model(row["checkpoint_uri"])
        tops = top_tokens(model, tok, scan, nodes) if tok is not None else {}
        cfg = ckpt.config.model
        return circuit_svg(row, nodes, edges, cfg.n_layer, cfg.d_head, tops)

    def render(self, model_id: str, task: str, out_uri: str, prune_key: str | None = None) -> tuple[str, str]:
        """Write ``<model>--<task>.svg`` and ``.html`` under ``out_uri``; returns their URIs."""
        svg = self.svg(model_id, task, prune_key)
        out = storage.resolve(out_uri)
        stem = f"{model_id}--{task}"
        svg_loc, html_loc = out.join(f"{stem}.svg"), out.join(f"{stem}.html")
        storage.write_text(svg_loc, svg)
        storage.write_text(html_loc, circuit_page(svg, f"{task} — {model_id}"))
        return svg_loc.uri, html_loc.uri


def render_circuit(results_uri: str, model: str, task: str, out_uri: str | None = None, data_uri: str | None = None) -> tuple[str, str]:
    """Draw one stored circuit (``model``: id or unique prefix) to SVG + HTML."""
    from sparsity import tasks as task_lib

    task_lib.get(task)
    model_id = find_model(results_uri, model, task)
    out = out_uri or storage.resolve(results_uri).join("figures", "circuits").uri
    return CircuitRenderer(results_uri, data_uri).render(model_id, task, out)
