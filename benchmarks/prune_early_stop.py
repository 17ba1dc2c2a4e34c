"""Early stopping of mask training, measured on a store's pairs; prints JSON lines.

    python benchmarks/prune_early_stop.py RESULTS [--pairs 15] [--seeds 0,1] [--steps 400] [--long 2000]
                                          [--long-pairs 8] [--jobs 2] [--out FILE] [--checkpoints CKPT ...]

RESULTS: a store from ``csp demo`` or ``csp prune``. Its pairs are the (checkpoint, task)
pairs whose full model meets the looser target (0.30), the models that know the task. Each
is pruned at the default settings (``--steps`` 400, both targets) once per ``--seeds`` seed, with
no early stop, and looked at during training: wherever a candidate stopping rule (window ×
open-gate tolerance × loss tolerance, see ``RULES``) would first stop, the circuits that
stopping there gives are built and verified as a real run's would be (training then goes on
unchanged, so one run serves every rule: stopping early changes nothing before the stop).
``--long``: the first ``--long-pairs`` pairs are also pruned with that many steps (seed 0).
``--checkpoints``: more checkpoints (e.g. a run's earlier ones, which the store has no rows
for); their pairs are those whose full model meets 0.30 on the test pairs, scored here.

Lines: ``{"kind": "run", ...}`` per (pair, seed) with its record, the seconds its mask
training took to each point, and the circuits at 400 steps and at each rule's stop;
``{"kind": "long", ...}`` per long run; last, ``{"kind": "summary", ...}`` per rule: mean
steps, verified circuits and sizes against the full 400 steps, and how many pairs' circuits
grew by more than the seed spread. ``--out`` writes the lines to a file as well.
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

# (window steps, open-gate tolerance, smoothed-loss tolerance)
RULES = [(w, o, lt) for w in (40, 60, 100) for o in (0.02, 0.05, 0.1) for lt in (0.015, 0.03)]


def _pairs(results_uri: str, n: int) -> list[tuple[str, str]]:
    """(checkpoint URI, task) of up to ``n`` real pairs whose full model meets 0.30, best first."""
    from jobs import results

    df = results.circuits(results_uri)
    df = df[df.control.isna() & (df.target == 0.15) & (df.full_loss <= 0.30)].sort_values(["full_loss", "task"])
    return [(str(r.checkpoint_uri), str(r.task)) for r in df.drop_duplicates(["checkpoint_uri", "task"]).itertuples()][:n]


def _scored_pairs(ckpts: list[str]) -> list[tuple[str, str]]:
    """(checkpoint, task) of ``ckpts`` whose full model meets 0.30 on the test pairs, best first."""
    from jobs import prune_pairs as pp
    from sparsity import tasks as task_lib
    from sparsity.config import PruneConfig

    n_test, found = PruneConfig().n_test, []
    for ckpt in ckpts:
        loaded = pp.Loaded(ckpt)
        model = loaded.model.eval()
        for name in sorted(task_lib.REGISTRY):
            loss = task_lib.evaluate(model, task_lib.get(name), loaded.tok, n=n_test)["loss"]  # the test pairs pruning scores
            if loss <= 0.30:
                found.append((loss, ckpt, name))
    return [(c, t) for _, c, t in sorted(found)]


def _summary(c) -> dict:
    m = c.metrics
    return {"target": m["target"], "status": m["status"], "n_nodes": len(c.nodes), "n_edges": c.n_edges,
            "sufficiency_loss": None if m.get("sufficiency_loss") is None else round(m["sufficiency_loss"], 4),
            "beats_random_keep": m.get("beats_random_keep")}


def _run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    from jobs import prune_pairs as pp
    from sparsity import prune as prune_lib
    from sparsity import tasks as task_lib
    from sparsity.config import PruneConfig

    (ckpt, task), seed, steps, *rest = job
    long = rest[0] if rest else steps != 400
    loaded = pp.Loaded(ckpt)
    model, ablate, batches = loaded.inputs("mean")
    cfg = PruneConfig(seed=seed, steps=steps, stop_window=0)
    seen: dict[str, int] = {}  # rule → the step it stopped at
    at_stop: dict[int, list] = {}  # step → circuits there
    clock = {"train": 0.0, "last": None}
    seconds_at: dict[int, float] = {}

    def observe(step, record, circuits_now):
        now = time.perf_counter()
        clock["train"] += now - clock["last"]
        seconds_at[step] = round(clock["train"], 2)
        for rule in [] if long else RULES:
            name = "w{}_o{}_l{}".format(*rule)
            if name not in seen and prune_lib.converged(record, rule[0], floor, rule[1], rule[2]):
                seen[name] = step
        if step in seen.values() and step not in at_stop and step < steps:
            at_stop[step] = [_summary(c) for c in circuits_now()]
        clock["last"] = time.perf_counter()

    floor = max(2 * (steps // 20), int(cfg.warmup_frac * steps))  # as _train_masks's
    t0 = clock["last"] = time.perf_counter()
    final = prune_lib.prune_targets(model, task_lib.get(task), loaded.tok, cfg, batches, ablate=ablate, observe=observe)
    total = time.perf_counter() - t0
    return {"kind": "long" if long else "run", "model": loaded.meta["model_id"], "checkpoint": ckpt, "task": task, "seed": seed,
            "steps": steps, "seconds": round(total, 1), "train_seconds_at": seconds_at,
            "curve": next((json.loads(c.metrics["convergence"]) for c in final if c.metrics.get("convergence")), []),
            "final": [_summary(c) for c in final], "stops": seen,
            "at_stop": {str(k): v for k, v in at_stop.items()}}


def _summarise(runs: list[dict]) -> list[dict]:
    """Per rule: circuits at its stop against the full run's, pair by pair and target by target."""
    by_pair: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        by_pair.setdefault((r["checkpoint"], r["task"]), {})[r["seed"]] = r
    out = []
    for rule in RULES:
        name = "w{}_o{}_l{}".format(*rule)
        steps, full_steps, rows = [], [], []
        for seeds in by_pair.values():
            for seed, r in seeds.items():
                stop = r["stops"].get(name)
                steps.append(stop or r["steps"])
                full_steps.append(r["steps"])
                stopped = r["at_stop"][str(stop)] if stop and stop < r["steps"] else r["final"]
                early_at = {c["target"]: c for c in stopped}  # only the targets that were pruned
                for full in r["final"]:
                    early = early_at.get(full["target"], full)
                    others = [s["final"][[f["target"] for f in s["final"]].index(full["target"])]
                              for sd, s in seeds.items() if sd != seed]
                    spread_n = max([abs(o["n_nodes"] - full["n_nodes"]) for o in others if o["status"] == "ok" == full["status"]] or [0])
                    spread_e = max([abs(o["n_edges"] - full["n_edges"]) for o in others if o["status"] == "ok" == full["status"]] or [0])
                    rows.append((full, early, spread_n, spread_e))
        both = [(f, e, sn, se) for f, e, sn, se in rows if f["status"] == "ok" and e["status"] == "ok"]
        out.append({
            "kind": "summary", "rule": name, "window": rule[0], "open_tol": rule[1], "loss_tol": rule[2],
            "mean_steps": round(sum(steps) / len(steps), 1), "step_fraction": round(sum(steps) / sum(full_steps), 3),
            "verified_full": sum(f["status"] == "ok" for f, *_ in rows),
            "verified_early": sum(e["status"] == "ok" for _, e, *_ in rows),
            "lost": sum(f["status"] == "ok" and e["status"] != "ok" for f, e, *_ in rows),
            "gained": sum(f["status"] != "ok" and e["status"] == "ok" for f, e, *_ in rows),
            "nodes_full": sum(f["n_nodes"] for f, *_ in both), "nodes_early": sum(e["n_nodes"] for _, e, *_ in both),
            "edges_full": sum(f["n_edges"] for f, *_ in both), "edges_early": sum(e["n_edges"] for _, e, *_ in both),
            "larger_beyond_seed_spread": sum(e["n_nodes"] - f["n_nodes"] > sn or e["n_edges"] - f["n_edges"] > se for f, e, sn, se in both),
            # per circuit verified both ways: mean growth against the mean gap between two seeds' circuits
            "mean_growth_nodes": round(sum(e["n_nodes"] - f["n_nodes"] for f, e, *_ in both) / max(1, len(both)), 2),
            "mean_growth_edges": round(sum(e["n_edges"] - f["n_edges"] for f, e, *_ in both) / max(1, len(both)), 1),
            "mean_seed_spread_nodes": round(sum(sn for *_, sn, _ in both) / max(1, len(both)), 2),
            "mean_seed_spread_edges": round(sum(se for *_, se in both) / max(1, len(both)), 1),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=400, help="mask steps of the runs the rules are read from")
    ap.add_argument("--long", type=int, default=0, help="also prune with this many steps (seed 0); 0: no")
    ap.add_argument("--long-pairs", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="more checkpoints, their pairs scored here")
    args = ap.parse_args()
    pairs = _pairs(args.results, args.pairs) + _scored_pairs(args.checkpoints)
    if not pairs:
        raise SystemExit(f"no pair in {args.results} whose full model meets 0.30; run `csp demo` first")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(p, s, args.steps, False) for p in pairs for s in seeds]
    if args.long:
        jobs += [(p, 0, args.long, True) for p in pairs[: args.long_pairs]]
    runs = []
    if args.out and os.path.exists(args.out):  # resume: the runs already written are not run again
        done = [json.loads(line) for line in open(args.out)]
        runs = [r for r in done if r["kind"] in ("run", "long")]
        have = {(r.get("checkpoint"), r["task"], r["seed"], r["steps"]) for r in runs}
        have |= {(c, r["task"], r["seed"], r["steps"]) for r in runs for (c, _), *_ in jobs if f"/{r['model'].rsplit('-', 1)[0]}/" in c}
        jobs = [j for j in jobs if (j[0][0], j[0][1], j[1], j[2]) not in have]
    out = open(args.out, "a") if args.out else None
    with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(_run, jobs):
            runs.append(row)
            for stream in filter(None, (sys.stdout, out)):
                print(json.dumps(row), file=stream, flush=True)
    for row in _summarise([r for r in runs if r["kind"] == "run"]):
        for stream in filter(None, (sys.stdout, out)):
            print(json.dumps(row), file=stream, flush=True)


if __name__ == "__main__":
    main()
