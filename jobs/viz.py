"""Figures from the results store: the frontier plot and circuit diagrams.

* :func:`plot_frontier` — per model, validation loss (capability) against the geometric mean
  of circuit edges over tasks (interpretability), as PNG and SVG (matplotlib).
* :func:`render_circuit` — one stored circuit drawn the way the paper draws them
  (jobs/diagram.py), with the pretraining tokens that activate each node most
  (:func:`top_tokens`). The output is one self-contained SVG and an HTML page around it
  (inline script and style, nothing fetched), so it opens from disk.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict

import torch

from cluster import data, storage
from jobs import loader, results
from jobs.diagram import RESID_LOCS, circuit_page, circuit_svg
from sparsity.circuit import drawable
from sparsity.config import SparsityConfig
from sparsity.errors import CspError

TOP_ROWS = 256  # sequences drawn from the whole corpus (every shard of train and val) to find top-activating tokens


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
    return _save(fig, storage.resolve(out_uri) if out_uri else storage.resolve(results_uri).join("figures"), "frontier")


def _save(fig, out: storage.Location, stem: str) -> list[str]:
    """``fig`` as OUT/STEM.png and OUT/STEM.svg (no timestamp in the SVG); their URIs."""
    import matplotlib.pyplot as plt

    written = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        loc = out.join(f"{stem}.{fmt}")
        storage.write_bytes(loc, buf.getvalue())
        written.append(loc.uri)
    plt.close(fig)
    return written


def plot_over_training(results_uri: str, out_uri: str | None = None, target: float | None = None, model: str | None = None,
                       task: str | None = None) -> list[str]:
    """Write over-training.png and .svg under ``out_uri`` (default RESULTS/figures): one panel
    per task that has a circuit at some step, circuit edges (filled: verified, hollow: not) and the full model's task loss
    against the checkpoint step, a line per run; circuits at ``target`` (default: the
    strictest stored)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = results.over_training(results_uri, task=task, model=model)
    if target is None and len(df):
        target = float(df["target"].min())
    df = df[df["target"] == target] if len(df) else df
    if df.empty or df["step"].nunique() < 2:
        raise VizError(f"no run under {storage.resolve(results_uri).uri} has circuits at two or more steps; "
                       "prune with `csp prune RUN --checkpoints milestones` (train with --milestones) first")
    tasks_ = sorted(df.loc[df["n_edges"].notna(), "task"].unique()) or sorted(df["task"].unique())  # tasks with a circuit somewhere
    left_out = df["task"].nunique() - len(tasks_)
    cols = min(3, len(tasks_))
    rows_ = -(-len(tasks_) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.4 * rows_), dpi=120, squeeze=False)
    colors = plt.get_cmap("tab10")
    trials = sorted(df["trial"].unique())
    for ax, t in zip(axes.flat, tasks_, strict=False):
        loss_ax = ax.twinx()
        for i, trial in enumerate(trials):
            g = df[(df["task"] == t) & (df["trial"] == trial)].sort_values("step")
            if g.empty:
                continue
            c = colors(i % 10)
            drawn = g[g["n_edges"].notna()]
            ax.plot(drawn["step"], drawn["n_edges"], "-", color=c, lw=1, label=trial)
            ok = drawn["status"] == "ok"
            ax.scatter(drawn.loc[ok, "step"], drawn.loc[ok, "n_edges"], color=c, s=22, zorder=3)
            ax.scatter(drawn.loc[~ok, "step"], drawn.loc[~ok, "n_edges"], facecolor="white", edgecolor=c, s=22, zorder=3)
            loss_ax.plot(g["step"], g["full_loss"], "--", color=c, lw=1, alpha=0.7)
        loss_ax.axhline(target, color="grey", lw=0.8, ls=":")
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("full model's task loss (dashed)", fontsize=7)
        ax.set_xscale("log")
        for axis in (ax.xaxis, loss_ax.yaxis):  # ticks at 1, 2, 5 × 10^k, written 20, not 2×10¹
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("circuit edges (solid; hollow: not verified)", fontsize=7)
        ax.grid(True, which="both", alpha=0.25)
    for ax in list(axes.flat)[len(tasks_):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Circuits over training (target {target:g}; dotted: the target)"
                 + (f"; {left_out} task(s) with no circuit at any step not shown" if left_out else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, storage.resolve(out_uri) if out_uri else storage.resolve(results_uri).join("figures"), "over-training")


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


@torch.no_grad()
def io_tokens(model, tok, task_name: str, nodes: list[tuple[int, str, int]], n_inputs: int = 8, n_answers: int = 6) -> dict:
    """Where a circuit starts and ends, for its diagram: the task's answer tokens (from its
    test pairs, the most frequent first) with their unembedding weights from the residual channels the circuit writes,
    and the prompt tokens whose embeddings write most (by |w|, summed) into the channels it
    reads, with those weights. Only nonzero weights; the model's sparsity decides."""
    from sparsity import tasks as task_lib

    task = task_lib.get(task_name)
    pairs = task.pairs(32, task_lib.TEST_SEED, at_least=1)
    reads = sorted({i for (_, loc, i) in nodes if loc in RESID_LOCS and loc.endswith("act_in")})
    writes = sorted({i for (_, loc, i) in nodes if loc in RESID_LOCS and loc.endswith("resid_delta")})
    unembed, embed = model.lm_head.weight.float().cpu(), model.transformer.wte.weight.float().cpu()

    def weights(row, cols) -> dict[int, float]:
        return {c: float(row[c]) for c in cols if float(row[c]) != 0.0}

    answers = []
    counts = Counter(x for p in pairs for x in (p.target, p.alt))  # the most frequent first: a name task's keyword before its names
    for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_answers]:
        ids = tok.encode(a)
        if len(ids) == 1:
            answers.append((a, weights(unembed[ids[0]], writes)))
    prompt_ids = sorted({i for p in pairs for s in (p.clean, p.corrupt) for i in tok.encode(s)})
    strength = {i: float(embed[i, reads].abs().sum()) if reads else 0.0 for i in prompt_ids}
    inputs = [(tok.decode([i]), weights(embed[i], reads)) for i in sorted(prompt_ids, key=lambda i: -strength[i])[:n_inputs] if strength[i] > 0]
    return {"inputs": inputs, "answers": answers}


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
                rows = torch.from_numpy(data.sample_rows(m.data_uri, TOP_ROWS)[:, :block].astype("int64"))
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
            raise VizError(f"model {model_id} has no circuit for {task} (status {row['status']}); choose a task with status ok")
        nd = results.nodes(self.results_uri, task=task, model=model_id)
        ed = results.edges(self.results_uri, task=task, model=model_id)
        nd = nd[(nd["prune_key"] == row["prune_key"]) & nd["control"].isna()]
        ed = ed[(ed["prune_key"] == row["prune_key"]) & ed["control"].isna()]
        nodes = [(int(r.layer), r.location, int(r.node_index)) for r in nd.itertuples()]
        edges = [{"src": (int(r.src_layer), r.src_location, int(r.src_index)), "dst": (int(r.dst_layer), r.dst_location, int(r.dst_index)),
                  "kind": r.kind, "weight": float(r.weight)} for r in ed.itertuples()]
        ckpt, model, tok, scan = self._model(row["checkpoint_uri"])
        tops = top_tokens(model, tok, scan, nodes) if tok is not None else {}
        io = io_tokens(model, tok, task, nodes) if tok is not None else None
        cfg = ckpt.config.model
        return circuit_svg(row, nodes, edges, cfg.n_layer, cfg.d_head, tops, io)

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
    """Draw one stored circuit (``model``: an id, a trial name or a unique prefix; see
    :func:`jobs.results.find_model`) to SVG + HTML."""
    from sparsity import tasks as task_lib

    task_lib.get(task)
    model_id = results.find_model(results_uri, model, task)
    out = out_uri or storage.resolve(results_uri).join("figures", "circuits").uri
    return CircuitRenderer(results_uri, data_uri).render(model_id, task, out)
