"""Whole pruning runs with an older csp and with this one, on a store's pairs, the way the demo's
pruning stage runs them (``--jobs`` pairs at a time, one CPU thread each); prints one JSON object.

    python benchmarks/prune_before_after.py RESULTS --before DIR [--after DIR] [--rounds 2]
                                            [--jobs 2] [--pairs N] [--steps N]

RESULTS: a results store (e.g. ``csp-runs/results`` after ``csp demo``). Its pairs are the
(checkpoint, task) pairs whose real rows trained a mask there — what the demo's stage spends
its time on; ``--pairs N`` keeps the first N. Each pair is pruned whole (``prune_targets``
at the default PruneConfig, both targets; ``--steps`` overrides the mask steps) by the csp in
``--before`` and by the one in ``--after`` (default: this checkout), taking turns round by
round (before, after; then after, before; …) since the machine's speed drifts. Per pair:
each side's seconds per round and their median, the ratio of medians, the circuits each
side found (status, nodes, edges at every target; mask steps where the code records them).
Overall: the sums of the medians and their ratio, and each round's ratio of sums.

``--before DIR``: another csp source tree, e.g. ``git worktree add DIR REV`` or ``git
archive REV | tar -x -C DIR``, with its AbsTopK kernel built (``pip install -e DIR`` into a
scratch venv, or copy ``sparsity/_abstopk*.so`` when ``sparsity/_abstopk.c`` is unchanged);
each side reports which AbsTopK path it ran. Both sides load the checkpoints with their own
code, so an older tree must read the store's checkpoint configs. Each side runs as its own
processes started in its own tree, and says which tree its ``sparsity`` came from: a run
whose code is not the tree asked for stops with an error (a Python started inside a
checkout imports that checkout, whatever PYTHONPATH says). Nothing is stored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: E402, F401  (first of ours: fixes sys.path)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter started in the tree being timed (its directory comes first on
# sys.path): prunes the pairs in argv[1] (JSON) and prints one JSON line a pair.
WORKER = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import sparsity
from jobs import prune_pairs as pp
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib
from sparsity.config import PruneConfig
try:
    from sparsity import abstopk
    abstopk_path = abstopk.backend()
except (ImportError, AttributeError):
    abstopk_path = "unknown"
pairs, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2])
root = os.path.dirname(os.path.dirname(os.path.realpath(sparsity.__file__)))
loaded = {}
for ckpt, task in pairs:
    if ckpt not in loaded:
        lm = pp.Loaded(ckpt)
        loaded[ckpt] = (lm, lm.inputs("mean"))
    lm, (model, ablate, batches) = loaded[ckpt]
    cfg = PruneConfig(**({"steps": steps} if steps else {}))
    t0 = time.perf_counter()
    cs = prune_lib.prune_targets(model, task_lib.get(task), lm.tok, cfg, batches, ablate=ablate)
    seconds = time.perf_counter() - t0
    circuits = [{"target": c.metrics.get("target"), "status": c.metrics.get("status"), "n_nodes": len(c.nodes),
                 "n_edges": c.n_edges, "mask_steps": c.metrics.get("mask_steps")} for c in cs]
    print(json.dumps({"root": root, "abstopk": abstopk_path, "checkpoint": ckpt, "task": task, "seconds": round(seconds, 2),
                      "circuits": circuits}), flush=True)
"""


def _pairs(results_uri: str, n: int | None) -> list[tuple[str, str]]:
    """(checkpoint URI, task) of the store's real rows that trained a mask, in a stable order."""
    from jobs import results

    df = results.circuits(results_uri)
    real = df[df["control"].isna()] if "control" in df else df
    trained = real[real["n_open"].notna()].sort_values(["model_id", "task"])
    pairs = list(dict.fromkeys((str(r.checkpoint_uri), str(r.task)) for r in trained.itertuples()))
    return pairs[:n] if n else pairs


def _side(tree: str, pairs: list[tuple[str, str]], jobs: int, steps: int | None) -> list[dict]:
    """Prune ``pairs`` with the csp in ``tree``: ``jobs`` processes, the pairs dealt out in turn."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = tree
    parts = [pairs[i::jobs] for i in range(jobs)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(p), json.dumps(steps)], cwd=tree, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in parts if p]
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            last = (err.strip().splitlines() or ["no message"])[-1]
            raise SystemExit(f"pruning with the csp in {tree} failed (exit {p.returncode}): {last}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    wrong = {r["root"] for r in rows} - {os.path.realpath(tree)}
    if wrong:
        raise SystemExit(f"the run meant for {tree} imported csp from {sorted(wrong)}: not the code asked for")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results store whose rows trained masks (e.g. csp-runs/results)")
    ap.add_argument("--before", required=True, help="the older csp's source tree, its AbsTopK kernel built")
    ap.add_argument("--after", default=HERE, help="the newer csp's source tree (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each side once per round, taking turns (default 2)")
    ap.add_argument("--jobs", type=int, default=2, help="pairs pruned at once, one thread each (default 2, as the demo)")
    ap.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    ap.add_argument("--steps", type=int, default=None, help="mask steps (default: PruneConfig's)")
    args = ap.parse_args()
    for flag in ("rounds", "jobs", "pairs", "steps"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag} {v}: give 1 or more")
    trees = {}
    for side in ("before", "after"):
        tree = os.path.realpath(getattr(args, side))
        if not os.path.isfile(os.path.join(tree, "sparsity", "prune.py")):
            ap.error(f"--{side} {getattr(args, side)}: no csp source tree there (no sparsity/prune.py)")
        trees[side] = tree
    pairs = _pairs(args.results, args.pairs)
    if not pairs:
        raise SystemExit(f"no pair in {args.results} trained a mask; run `csp demo` or `csp prune` first")

    seconds: dict[str, dict[tuple, list[float]]] = {"before": {}, "after": {}}
    found: dict[str, dict[tuple, dict]] = {"before": {}, "after": {}}
    rounds = []
    for r in range(args.rounds):
        total = {}
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            rows = _side(trees[side], pairs, args.jobs, args.steps)
            for row in rows:
                key = (row["checkpoint"], row["task"])
                seconds[side].setdefault(key, []).append(row["seconds"])
                found[side][key] = {"abstopk": row["abstopk"], "circuits": row["circuits"]}
            total[side] = round(sum(row["seconds"] for row in rows), 2)
        rounds.append({**total, "ratio": round(total["after"] / total["before"], 3)})
    per_pair, med = [], {"before": 0.0, "after": 0.0}
    for key in pairs:
        m = {side: statistics.median(seconds[side][key]) for side in ("before", "after")}
        med = {side: med[side] + m[side] for side in med}
        per_pair.append({"checkpoint": key[0], "task": key[1], **{f"{side}_runs": seconds[side][key] for side in m},
                         "ratio": round(m["after"] / m["before"], 3),
                         **{f"{side}_circuits": found[side][key]["circuits"] for side in m}})
    print(json.dumps({
        "before": trees["before"], "after": trees["after"], "threads_per_pair": 1, "jobs": args.jobs, "rounds": rounds,
        "abstopk": {side: sorted({f["abstopk"] for f in found[side].values()}) for side in found},
        "pairs": per_pair,
        "sum_of_medians": {side: round(v, 2) for side, v in med.items()},
        "ratio_of_sums": round(med["after"] / med["before"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
