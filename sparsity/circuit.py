"""A circuit: the kept nodes of one (checkpoint, task) pair, the edges between them, the
losses that verify it, and where it came from.

Nodes are (layer, location, index) with ``location`` one of :data:`NODE_LOCATIONS` (hook
names without the layer). Edges are the nonzero weights whose input and output nodes are
both kept:

    attn.act_in[j] → attn.q|k|v[i]      c_attn[i (+ offset), j]
    attn.v[c]      → attn.resid_delta[j]   attn.c_proj[j, c]   (v channel c is output channel c)
    mlp.act_in[j]  → mlp.post_act[i]    mlp.c_fc[i, j]
    mlp.post_act[i] → mlp.resid_delta[j]  mlp.c_proj[j, i]

plus, counted apart as ``resid`` edges, the residual stream itself: a kept write channel j
(attn/mlp.resid_delta) feeds every later kept read channel j (act_in) through identity.
``n_edges`` (the circuit-size measure) counts the weight edges only. Three more kinds of
connection are counted in their own columns, with no rows in the edges table
(:func:`extra_edge_counts`): ``qk`` (a kept query channel and the kept key channel it is
dotted with), ``embed`` (the token/position embedding writing a kept read channel through
a nonzero weight) and ``unembed`` (a nonzero unembedding weight from a channel the circuit
writes to one of the task's two answer tokens).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sparsity.config import LOCATIONS

if TYPE_CHECKING:
    import torch

NODE_LOCATIONS = tuple(loc.hook for loc in LOCATIONS)  # a node's location is the hook point it gates
WEIGHT_EDGE_KINDS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.in", "mlp.out")
EXTRA_EDGE_KINDS = ("qk", "embed", "unembed")  # counted in columns n_edges_<kind>, no edge rows
# 2: summed task loss, prune key, controls, verification columns; 3: node_index, nullable
# counts, created_at, trial; 4: ablated_loss, random-keep and partial-ablation columns, a row per target;
# 5: mask_steps, stop_reason, phase_seconds
SCHEMA_VERSION = 5


# What a pruning result's status says, and which statuses share a meaning (every reader
# of the store asks through these):
#   ok                   a verified circuit: it met the target on the test pairs
#   not_verified         chosen on the selection pairs, missed the target on the test pairs
#   target_not_reached   no circuit met the target on the selection pairs (the best is kept)
#   trivial              the fully ablated model already meets the target: no circuit needed
#   model_misses_target  the full model does the task above chance but misses the target
#   chance               the full model is at chance on the task
#   failed               the run raised (the row keeps the error)
STATUSES = ("ok", "not_verified", "target_not_reached", "trivial", "model_misses_target", "chance", "failed")
TESTED = ("ok", "not_verified", "target_not_reached")  # a circuit was chosen and scored on the test pairs
SOLVED = (*TESTED, "trivial")  # the full model does the task at the target: it was pruned
NO_CIRCUIT = ("chance", "model_misses_target", "failed")  # no circuit: counts are null, not 0


def solved(status: str) -> bool:
    """The full model does the task (it was pruned, whatever the circuit's verdict)."""
    return status in SOLVED


def drawable(status: str, n_nodes) -> bool:
    """A result with a circuit to draw: scored on the test pairs, with at least one node."""
    return status in TESTED and bool(n_nodes)


def node_sizes(cfg) -> dict[str, int]:
    """Width of each node location for a ModelConfig."""
    return {loc.hook: getattr(cfg, loc.width) for loc in LOCATIONS}


Node = tuple[int, str, int]  # (layer, location, index)


@dataclass
class Circuit:
    task: str
    nodes: list[Node]
    edges: list[dict]  # {"src": Node, "dst": Node, "kind": str, "weight": float}
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    extra_edges: dict = field(default_factory=dict)  # {kind in EXTRA_EDGE_KINDS: count}

    @property
    def n_edges(self) -> int:
        """Weight edges (the circuit-size measure); residual edges are counted apart."""
        return sum(1 for e in self.edges if e["kind"] != "resid")

    def counts(self) -> dict:
        """n_nodes / n_edges in total and by kind."""
        nodes = Counter(loc for _, loc, _ in self.nodes)
        edges = Counter(e["kind"] for e in self.edges)
        return {
            "n_nodes": len(self.nodes),
            "n_edges": self.n_edges,
            "n_edges_resid": edges.get("resid", 0),
            "nodes_by_location": {loc: nodes.get(loc, 0) for loc in NODE_LOCATIONS},
            "edges_by_kind": {k: edges.get(k, 0) for k in WEIGHT_EDGE_KINDS},
            "extra_edges": {k: int(self.extra_edges.get(k, 0)) for k in EXTRA_EDGE_KINDS},
        }

    def nodes_by_layer(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for layer, loc, _ in self.nodes:
            out.setdefault(layer, Counter())[loc] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    # ---------------------------------------------------------------- rows (Arrow-ready)

    def to_rows(self) -> tuple[dict, list[dict], list[dict]]:
        """(circuit row, node rows, edge rows): plain dicts, one Parquet row each."""
        c = self.counts()
        row = {
            "schema_version": SCHEMA_VERSION,
            "task": self.task,
            "n_nodes": c["n_nodes"],
            "n_edges": c["n_edges"],
            "n_edges_resid": c["n_edges_resid"],
            **{f"n_nodes_{k.replace('.', '_')}": v for k, v in c["nodes_by_location"].items()},
            **{f"n_edges_{k.replace('.', '_')}": v for k, v in c["edges_by_kind"].items()},
            **{f"n_edges_{k}": v for k, v in c["extra_edges"].items()},
            **self.metrics,
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }
        nodes = [{"task": self.task, "layer": layer, "location": loc, "node_index": idx} for layer, loc, idx in self.nodes]
        edges = [{"task": self.task, "kind": e["kind"], "weight": e["weight"],
                  "src_layer": e["src"][0], "src_location": e["src"][1], "src_index": e["src"][2],
                  "dst_layer": e["dst"][0], "dst_location": e["dst"][1], "dst_index": e["dst"][2]} for e in self.edges]
        return row, nodes, edges

    @classmethod
    def from_rows(cls, row: dict, nodes: list[dict], edges: list[dict]) -> Circuit:
        metric_keys = set(row) - {"schema_version", "task", "provenance", "n_nodes", "n_edges", "n_edges_resid"}
        metric_keys -= {k for k in row if k.startswith(("n_nodes_", "n_edges_"))}
        return cls(
            task=row["task"],
            nodes=[(int(n["layer"]), n["location"], int(n["node_index"] if "node_index" in n else n["index"])) for n in nodes],
            edges=[{"src": (int(e["src_layer"]), e["src_location"], int(e["src_index"])),
                    "dst": (int(e["dst_layer"]), e["dst_location"], int(e["dst_index"])),
                    "kind": e["kind"], "weight": float(e["weight"])} for e in edges],
            metrics={k: row[k] for k in sorted(metric_keys)},
            provenance=json.loads(row["provenance"]) if row.get("provenance") else {},
            extra_edges={k: int(row[f"n_edges_{k}"]) for k in EXTRA_EDGE_KINDS if row.get(f"n_edges_{k}") is not None},
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([sorted(self.nodes), len(self.edges)]).encode()).hexdigest()


def _no_grad(fn):
    """Run ``fn`` under torch.no_grad, importing torch only when called: reading the status
    vocabulary or a stored row of this module loads no torch (csp results stays fast)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run


@_no_grad
def edges_between(model, kept: dict[str, torch.Tensor]) -> list[dict]:
    """Every nonzero weight whose two end nodes are kept, plus residual edges.

    ``kept``: {hook name "{layer}.{location}": bool tensor of that location's width}.
    """
    cfg = model.config
    a = cfg.d_attn
    out: list[dict] = []

    def add(kind, layer, w, src_loc, dst_loc, src_keep, dst_keep, dst_offset=0):
        # w: (dst, src) slice of a weight matrix
        sub = w[dst_keep.nonzero()[:, 0]][:, src_keep.nonzero()[:, 0]]
        dst_idx, src_idx = dst_keep.nonzero()[:, 0], src_keep.nonzero()[:, 0]
        for i, j in (sub != 0).nonzero().tolist():
            out.append({"src": (layer, src_loc, int(src_idx[j])), "dst": (layer, dst_loc, int(dst_idx[i])),
                        "kind": kind, "weight": float(sub[i, j])})

    for layer, block in enumerate(model.transformer.h):
        k = {loc: kept[f"{layer}.{loc}"] for loc in NODE_LOCATIONS}
        W = block.attn.c_attn.weight  # (3·a, d_model): rows q | k | v
        for n, loc in enumerate(("attn.q", "attn.k", "attn.v")):
            add(loc, layer, W[n * a : (n + 1) * a], "attn.act_in", loc, k["attn.act_in"], k[loc])
        add("attn.out", layer, block.attn.c_proj.weight, "attn.v", "attn.resid_delta", k["attn.v"], k["attn.resid_delta"])
        add("mlp.in", layer, block.mlp.c_fc.weight, "mlp.act_in", "mlp.post_act", k["mlp.act_in"], k["mlp.post_act"])
        add("mlp.out", layer, block.mlp.c_proj.weight, "mlp.post_act", "mlp.resid_delta", k["mlp.post_act"], k["mlp.resid_delta"])
    # Residual stream: write channel j at (layer, attn|mlp) → read channel j at every later read.
    order = []
    for layer in range(cfg.n_layer):
        order += [(layer, "attn.act_in"), (layer, "attn.resid_delta"), (layer, "mlp.act_in"), (layer, "mlp.resid_delta")]
    for wi, (wl, wloc) in enumerate(order):
        if not wloc.endswith("resid_delta"):
            continue
        for rl, rloc in order[wi + 1 :]:
            if rloc.endswith("act_in"):
                both = (kept[f"{wl}.{wloc}"] & kept[f"{rl}.{rloc}"]).nonzero()[:, 0].tolist()
                out += [{"src": (wl, wloc, j), "dst": (rl, rloc, j), "kind": "resid", "weight": 1.0} for j in both]
    return out


@_no_grad
def extra_edge_counts(model, kept: dict[str, torch.Tensor], answer_ids: list[int]) -> dict[str, int]:
    """Connections of a circuit that are not single weights between two of its nodes.

    qk: per layer, channels c whose query and key are both kept (the score q·k sums q_c·k_c);
    embed: (kept read channel j, embedding) with a nonzero wte or wpe weight on channel j;
    unembed: nonzero lm_head[answer, j] for kept write channels j and the task's answer tokens.
    """
    cfg = model.config
    t = model.transformer
    writes_embed = (t.wte.weight != 0).any(0) | (t.wpe.weight != 0).any(0)  # (d_model,)
    head = model.lm_head.weight[answer_ids] != 0  # (answers, d_model)
    qk = embed = unembed = 0
    for layer in range(cfg.n_layer):
        qk += int((kept[f"{layer}.attn.q"] & kept[f"{layer}.attn.k"]).sum())
        for loc in ("attn.act_in", "mlp.act_in"):
            embed += int((kept[f"{layer}.{loc}"] & writes_embed.cpu()).sum())
        for loc in ("attn.resid_delta", "mlp.resid_delta"):
            unembed += int((head.cpu() & kept[f"{layer}.{loc}"][None, :]).sum())
    return {"qk": qk, "embed": embed, "unembed": unembed}
