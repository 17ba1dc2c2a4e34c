"""Pruning settings against circuit size, on verified pairs of a results store; prints JSON lines.

    python benchmarks/prune_settings.py RESULTS [--pairs 3] [--steps 400,1000,2000] [--k-coef 1e-3,1e-4]
                                        [--replication] [--jobs 2]

RESULTS: a store with verified circuits (e.g. ``csp-runs/results`` after ``csp demo``). Its
first ``--pairs`` verified (checkpoint, task) pairs at target 0.15 — one per task first, so
the pairs differ in task — are pruned again under every setting: each ``--steps`` ×
``--k-coef``, and with ``--replication`` the replication's schedule (no warmup, gradient RMS
clipped to 1.0) at k_coef 1e-3 and the two shortest step counts. One line per run: pair,
setting, status, nodes, weight edges, test sufficiency, whether the circuit beats random
node sets of its size, seconds. Nothing is stored. ``--jobs`` runs settings in that many
processes (one CPU thread each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spawned workers re-import this file
import _bootstrap  # noqa: E402, F401  (first of ours: fixes sys.path)


def _pairs(results_uri: str, n: int) -> list[tuple[str, str]]:
    """(checkpoint URI, task) of ``n`` verified real circuits, distinct tasks first."""
    from jobs import results

    df = results.verified(results.at_target(results.circuits(results_uri), 0.15)).sort_values(["task", "n_nodes", "model_id"])
    firsts = df.drop_duplicates("task")
    picked = list(firsts.itertuples()) + [r for r in df.itertuples() if r.Index not in set(firsts.index)]
    return [(str(r.checkpoint_uri), str(r.task)) for r in picked[:n]]


def _run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    from jobs import prune_pairs as pp
    from sparsity import prune as prune_lib
    from sparsity import tasks as task_lib
    from sparsity.config import PruneConfig

    (ckpt, task), setting = job
    loaded = pp.Loaded(ckpt)  # the run's own data and tokenizer
    model, ablate, batches = loaded.inputs("mean")
    t0 = time.perf_counter()
    c = prune_lib.prune(model, task_lib.get(task), loaded.tok, PruneConfig(also_targets=(), **setting), batches, ablate=ablate)
    m = c.metrics
    return {"model": loaded.meta["model_id"], "task": task, **setting, "status": m["status"], "n_nodes": len(c.nodes),
            "n_edges": c.n_edges, "sufficiency_loss": round(m["sufficiency_loss"], 4),
            "beats_random_keep": m.get("beats_random_keep"), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", default="400,1000,2000")
    ap.add_argument("--k-coef", default="1e-3,1e-4")
    ap.add_argument("--replication", action="store_true", help="also the replication's schedule: no warmup, RMS clip 1.0")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    settings = [{"steps": s, "k_coef": float(k)} for k in args.k_coef.split(",") for s in steps]
    if args.replication:
        settings += [{"steps": s, "k_coef": 1e-3, "warmup_frac": 0.0, "grad_clip_rms": 1.0} for s in sorted(steps)[:2]]
    pairs = _pairs(args.results, args.pairs)
    if not pairs:
        raise SystemExit(f"no verified circuits at target 0.15 in {args.results}; run `csp demo` or `csp prune` first")
    jobs = [(p, s) for p in pairs for s in settings]
    with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        for row in pool.imap(_run, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
