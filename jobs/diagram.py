"""The circuit diagram, drawn the way the paper draws them, bottom to top as the computation
flows: the input tokens, then each layer's six rows (attention reads, q/k/v channels,
attention writes, MLP reads, MLP neurons, MLP writes), then the answer logits. Every kept
residual channel is a vertical line through all layers; weight edges are curves coloured by
sign with width by |weight|. Each node is printed with a short id and the token that
activates it most; hovering it shows its full id and its top tokens in context. :func:`circuit_svg` draws one standalone SVG and
:func:`circuit_page` the HTML page around it (inline script and style, nothing fetched),
so it opens from disk. Pure drawing — a circuit's rows in, text out; jobs/viz.py reads
them from the results store and the model.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import dataclass, field

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
_LEGEND = "vertical lines: residual channels · curves: nonzero weights (blue +, red −, width ∝ |w|) · nodes: q k v neuron · hover a node"
MAX_EDGES = 1500  # a diagram draws at most this many weight edges, the largest |w| first
ROW_H = 72  # px between a layer's rows: room for a node's label (9 px text, at most LABEL_CHARS long) above it
LABEL_CHARS = 11


def _show(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "⇥")


def circuit_svg(row: dict, nodes: list[tuple[int, str, int]], edges: list[dict], n_layer: int, d_head: int,
                tops: dict[tuple, list[dict]] | None = None, io: dict | None = None) -> str:
    """The circuit as one standalone SVG document (see the module docstring). ``io``: where
    the circuit starts and ends — ``{"inputs": [(token, {channel: embedding weight})],
    "answers": [(token, {channel: unembedding weight})]}``: a row of input tokens above the
    first layer with their embedding weights into the residual channels the circuit reads,
    and a row of answer tokens below the last layer with the weights from the channels it
    writes into their logits."""
    io = io or {}
    g = _layout(nodes, n_layer, d_head, bool(io))
    out = _svg_head(row, nodes, edges, g)
    out += _svg_rows(g, n_layer, nodes)
    out += _svg_edges(edges, g.pos)
    out += _svg_io(io, g)
    wired = {tuple(x[end]) for x in edges for end in ("src", "dst")}
    out += _svg_nodes(nodes, g, tops or {}, d_head, wired)
    out += [f'<text class="small" x="{g.col_x[c] + 2.5:.1f}" y="{g.bottom + 2:.0f}" text-anchor="end" '  # channel numbers, over the wires
            f'transform="rotate(-90 {g.col_x[c] + 2.5:.1f} {g.bottom + 2:.0f})">{c}</text>' for c in g.resid_cols]
    out.append("</svg>")
    return "\n".join(out)


def _svg_io(io: dict, g: _Layout) -> list[str]:
    """The input tokens (below) and answer tokens (above) with their weights to the residual
    channels the circuit uses; a channel outside the circuit is not drawn."""
    out = []
    for key, y, y_end, word in (("inputs", g.in_y, g.bottom - 4, "embedding"), ("answers", g.out_y, g.top + 4, "unembedding")):
        toks = io.get(key) or []
        if not toks:
            continue
        label = "input tokens" if key == "inputs" else "answer logits"
        out.append(f'<text class="lbl" x="10" y="{y + 3:.0f}">{label}</text>')
        wmax = max([abs(w) for _, ws in toks for w in ws.values()] + [1e-9])
        step = (g.width - 160) / len(toks)
        for i, (tok, ws) in enumerate(toks):
            x = 130 + (i + 0.5) * step
            for c, w in sorted(ws.items()):
                if c not in g.col_x:
                    continue
                out.append(f'<path class="edge io" d="M{x:.1f},{y:.1f} L{g.col_x[c]:.1f},{y_end:.1f}" stroke="{POS if w > 0 else NEG}" '
                           f'stroke-width="{0.4 + 1.6 * abs(w) / wmax:.2f}"><title>{html.escape(repr(tok))} {word} · channel {c}: {w:+.3f}</title></path>')
            out.append(f'<g class="token" data-role="{key[:-1]}" data-token="{html.escape(_show(tok))}"><rect x="{x - 34:.1f}" y="{y - 9:.1f}" width="68" height="18" rx="3" '
                       f'fill="#fefcbf" stroke="#975a16" stroke-width=".6"/><text x="{x:.1f}" y="{y + 4:.1f}" font-size="11" text-anchor="middle" '
                       f'font-family="Menlo, Consolas, monospace">{html.escape(_show(repr(tok)[1:-1])[:10])}</text></g>')
    return out


@dataclass
class _Layout:
    """Where a circuit diagram puts things: residual channels as columns, six rows per layer."""

    resid_cols: list[int]
    mids: dict[tuple[int, str], list[tuple[int, str, int]]]  # (layer, row key): its q/k/v channels or neurons
    top: int
    row_h: int
    width: float
    height: float
    row_y: dict[tuple[int, str], float]
    col_x: dict[int, float]
    pos: dict[tuple, tuple[float, float]]
    in_y: float = 0.0  # the input tokens' row (below layer 0), when drawn
    out_y: float = 0.0  # the answer tokens' row (above the last layer)
    bands: list[tuple[int, float, float, bool]] = field(default_factory=list)  # (layer, y, height, has nodes): a layer without nodes is one thin row
    bottom: float = 0.0  # where the last layer ends


def _layout(nodes: list[tuple[int, str, int]], n_layer: int, d_head: int, io: bool = False) -> _Layout:
    """Bottom to top, as the computation flows (the paper's figures): the input tokens, then
    layer 0's rows (its attention reads lowest, its MLP writes highest), … the last layer, then
    the answer logits on top."""
    resid_cols = sorted({i for (_, loc, i) in nodes if loc in RESID_LOCS})
    mids: dict[tuple[int, str], list[tuple[int, str, int]]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: (n[0], n[2] // d_head if n[1] in ("attn.q", "attn.k", "attn.v") else 0, n[1], n[2])):
        if n[1] in ("attn.q", "attn.k", "attn.v"):
            mids[(n[0], "attn.qkv")].append(n)
        elif n[1] == "mlp.post_act":
            mids[(n[0], "mlp.post_act")].append(n)
    left, y, col_w, mid_w, row_h = 120, 96.0, 16, 11, ROW_H
    out_y = y + row_h / 2 - 8  # the answer logits' row, above the last layer (when drawn)
    if io:
        y += row_h
    top = y
    widest = max([len(resid_cols) * col_w] + [len(v) * mid_w for v in mids.values()] + [420])
    width = left + widest + 40
    used = {n[0] for n in nodes}
    row_y: dict[tuple[int, str], float] = {}
    bands = []
    for layer in reversed(range(n_layer)):  # a layer the circuit keeps nothing in is one row, not six
        full = layer in used
        for r, (key, _) in enumerate(reversed(ROWS)):
            row_y[(layer, key)] = y + (r if full else 0) * row_h + row_h / 2
        h = (len(ROWS) if full else 1) * row_h
        bands.append((layer, y, h, full))
        y += h
    in_y = y + 44  # the input tokens' row, below layer 0, under the channel numbers
    height = (in_y + 24) if io else (y + 34)
    col_x = {c: left + (i + 0.5) * (widest / max(1, len(resid_cols))) for i, c in enumerate(resid_cols)}
    pos: dict[tuple, tuple[float, float]] = {}
    for layer, loc, idx in nodes:
        if loc in RESID_LOCS:
            pos[(layer, loc, idx)] = (col_x[idx], row_y[(layer, loc)])
    for (layer, key), group in mids.items():
        step = widest / len(group)
        for i, n in enumerate(group):
            pos[n] = (left + (i + 0.5) * step, row_y[(layer, key)])
    return _Layout(resid_cols, mids, int(top), row_h, width, height, row_y, col_x, pos,
                   in_y=in_y, out_y=out_y, bands=bands, bottom=y)


def _svg_head(row: dict, nodes: list[tuple[int, str, int]], edges: list[dict], g: _Layout) -> list[str]:
    """The document's opening: the <svg> element, its style and background, and the title,
    numbers and legend lines."""
    e = html.escape
    m = row
    head = (f"{m.get('task')} — {m.get('model_id')}")
    sub = (f"status {m.get('status')} · {len(nodes)} nodes · {int(m.get('n_edges') or 0)} weight edges "
           f"(+{int(m.get('n_edges_resid') or 0)} residual) · loss: model {_fmt(m.get('full_loss'))}, circuit {_fmt(m.get('sufficiency_loss'))}, "
           f"circuit ablated {_fmt(m.get('necessity_loss'))} (target {_fmt(m.get('target'))})")
    n_weighted = sum(1 for x in edges if x["kind"] != "resid")
    if n_weighted > MAX_EDGES:
        sub += f" · drawing the {MAX_EDGES} largest |w| of {n_weighted} edges"
    # The header never clips: the drawing is at least as wide as its longest line (Helvetica
    # averages under 0.6 em a character; 15 px bold title, 11 px numbers, 10 px legend).
    g.width = max(g.width, 16 + 0.62 * 15 * len(head) + 16, 16 + 0.58 * 11 * len(sub) + 16, 16 + 0.58 * 10 * len(_LEGEND) + 16)
    width, height = g.width, g.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="csp-circuit" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" '
           f'data-model="{e(str(row.get("model_id")))}" data-task="{e(str(row.get("task")))}">']
    out.append('<style>.edge{fill:none;opacity:.55}.resid{stroke:#cbd5e0;stroke-width:1}.resid-live{stroke:#718096;stroke-width:2}'
               '.node circle,.node rect{stroke:#1a202c;stroke-width:.6}.lbl{font-size:10px;fill:#4a5568}.small{font-size:8px;fill:#4a5568}.nl,.small{paint-order:stroke;stroke:#fff;stroke-width:2.5px;stroke-linejoin:round}.nl{font-size:9px;fill:#1a202c}'
               '.hl{opacity:1!important;stroke-width:3!important}.dim .edge{opacity:.08}</style>')
    out.append('<rect width="100%" height="100%" fill="white"/>')
    out.append(f'<text x="16" y="26" font-size="15" font-weight="bold">{e(head)}</text>')
    out.append(f'<text x="16" y="46" font-size="11" fill="#2d3748">{e(sub)}</text>')
    out.append(f'<text x="16" y="64" font-size="10" fill="#4a5568">vertical lines: residual channels · curves: nonzero weights '
               f'(<tspan fill="{POS}">blue +</tspan>, <tspan fill="{NEG}">red −</tspan>, width ∝ |w|) · nodes: '
               f'<tspan fill="{COLORS["attn.q"]}">q</tspan> <tspan fill="{COLORS["attn.k"]}">k</tspan> '
               f'<tspan fill="{COLORS["attn.v"]}">v</tspan> <tspan fill="{COLORS["mlp.post_act"]}">neuron</tspan> · hover a node</text>')
    return out


def _svg_rows(g: _Layout, n_layer: int, nodes: list[tuple[int, str, int]]) -> list[str]:
    """Layer bands with their row labels, and a vertical line per residual channel."""
    out = []
    top = g.top
    for layer, y0, h, full in g.bands:  # layer bands and row labels
        out.append(f'<rect x="4" y="{y0:.0f}" width="{g.width - 8:.0f}" height="{h:.0f}" fill="{"#f7fafc" if layer % 2 == 0 else "#ffffff"}"/>')
        if not full:
            out.append(f'<text class="lbl" x="10" y="{y0 + h / 2 + 3:.0f}">L{layer}: nothing kept (the residual passes through)</text>')
            continue
        for key, label in ROWS:
            out.append(f'<text class="lbl" x="10" y="{g.row_y[(layer, key)] + 3:.0f}">L{layer} {label}</text>')
    y_first, y_last = top + 4, g.bottom - 4
    for c in g.resid_cols:  # residual channels: a vertical line each, darker where the circuit carries it
        x = g.col_x[c]
        out.append(f'<line class="resid" x1="{x:.1f}" y1="{y_first}" x2="{x:.1f}" y2="{y_last}"><title>residual channel {c}</title></line>')
        ys = [g.pos[n][1] for n in nodes if n[2] == c and n[1] in RESID_LOCS]
        if len(ys) > 1:
            out.append(f'<line class="resid-live" x1="{x:.1f}" y1="{min(ys):.1f}" x2="{x:.1f}" y2="{max(ys):.1f}"/>')
    return out


def _svg_edges(edges: list[dict], pos: dict[tuple, tuple[float, float]]) -> list[str]:
    """The weight edges as curves, at most :data:`MAX_EDGES`, the strongest drawn last (on top)."""
    out = []
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
    return out


def _svg_nodes(nodes: list[tuple[int, str, int]], g: _Layout, tops: dict[tuple, list[dict]], d_head: int,
                wired: set | None = None) -> list[str]:
    """A marker per kept node with its label (:func:`node_label`) printed above it, its hover
    text naming it and its top-activating tokens in context; a node
    with no edge to another kept node (``wired``: the nodes some edge touches) is drawn faint
    and says so."""
    out = []
    for n in sorted(set(nodes)):
        x, y = g.pos[n]
        layer, loc, idx = n
        tip = [f"{_nid(n)}" + (f"  (head {idx // d_head}, {loc[-1]} channel {idx % d_head})" if loc in ("attn.q", "attn.k", "attn.v") else "")]
        for t in tops.get(n, []):
            tip.append(f"{t['value']:+.2f}  …{_show(t['context'])}[{_show(t['token'])}]")
        if n in tops and not tops[n]:
            tip.append("(never active on the scanned text)")
        lone = wired is not None and n not in wired
        if lone:
            tip.append("(no edge to another kept node: it acts only through the residual stream or the embeddings)")
        body = (f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" rx="1.5" fill="{COLORS[loc]}"/>' if loc in ("attn.q", "attn.k", "attn.v")
                else f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4.5 if loc in RESID_LOCS else 4:.1f}" fill="{COLORS[loc]}"/>')
        label = (f'<text class="nl" x="{x + 2.5:.1f}" y="{y - 7:.1f}" transform="rotate(-90 {x + 2.5:.1f} {y - 7:.1f})">'
                 f'{html.escape(node_label(n, tops.get(n), d_head))}</text>')
        faint = ' data-lone="1" opacity=".4"' if lone else ""
        out.append(f'<g class="node" data-id="{_nid(n)}" data-loc="{loc}"{faint}><title>{html.escape(chr(10).join(tip))}</title>{body}{label}</g>')
    return out


def node_label(n: tuple[int, str, int], tops: list[dict] | None, d_head: int) -> str:
    """A node's printed label: a short id (``r12`` a residual channel, ``k3.4`` head 3's key
    channel 4, ``n40`` a neuron) and the token that activates it most (a leading space shown
    as ␣), at most :data:`LABEL_CHARS` characters."""
    _, loc, idx = n
    if loc in ("attn.q", "attn.k", "attn.v"):
        short = f"{loc[-1]}{idx // d_head}.{idx % d_head}"
    else:
        short = ("n" if loc == "mlp.post_act" else "r") + str(idx)
    if tops:
        tok = _show(tops[0]["token"])
        short += " " + ("␣" + tok[1:] if tok.startswith(" ") else tok)
    return short if len(short) <= LABEL_CHARS else short[: LABEL_CHARS - 1] + "…"


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
