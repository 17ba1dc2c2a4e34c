"""Distributed throughput on this machine; prints one JSON object.

    python benchmarks/distributed.py --data csp-runs/data [--steps 60] [--d-model 128] [--pairs 8]
                                     [--tune-trials 3] [--skip-in-process] [--skip-cluster]

Figures, from one run:

* one plain process (no Ray) with torch on every core: the best single process on these
  cores, the baseline that N workers must beat;
* in-process Ray: training tokens/s with 1 and 2 Ray Train workers (same global batch;
  rate taken from the reported steady-state tokens/s, startup excluded), their ratio, and
  2 workers against the best single process;
  the token-server actor's batches/s as tokens/s against what the trainer consumes;
* Ray Tune: a sweep of ``--tune-trials`` one-worker trials run one at a time (Ray given 1
  CPU), and where each trial's time beyond its training steps goes: Tune starting the trial,
  (Ray Train starting a worker: only for trials of several workers), data setup, the loop
  beyond its steps (evaluations, checkpoints), teardown, the trial's summary; from
  wall-clock marks the trial leaves in its run directory (timings.json, and placement/ for
  Ray Train workers);
* a local multi-node cluster (cluster/local.py), the same 4 logical CPUs laid out two
  ways: one worker node of 4 CPUs, then two worker nodes of 2 CPUs. On each, a 2-worker
  training run (tokens/s; on two nodes the workers are one per node, so gradients cross
  raylets) and a prune fan-out of ``--pairs`` tasks (pairs/min). On one host both layouts
  share the same cores, so the 2-node/1-node ratio is the overhead of going across
  raylets, not a speed-up.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)

TASKS = ["var_swap", "if_equals", "indent_for", "else_elif", "for_while", "with_as", "var_if", "class_init",
         "lambda_func", "final_kwarg", "bracket_brace", "enumerate_range"]


def _rate(run: str, workers: int) -> float:
    from cluster import storage

    hist = [json.loads(x) for x in storage.read_text(os.path.join(run, "metrics.jsonl")).splitlines()]
    rates = [m["tokens_per_s"] for m in hist if "tokens_per_s" in m][2:]  # skip warm-up
    return statistics.median(rates) * workers


def _tune_overhead(data: str, cfg, tmp: str, trials: int) -> dict:
    """A sweep of ``trials`` one-worker trials, one at a time; per trial, the seconds outside
    its training steps, by phase."""
    import dataclasses

    import ray

    from cluster import runtime, storage
    from jobs import sweep

    runtime.init(num_cpus=1)  # one trial at a time
    try:
        sw = os.path.join(tmp, "sweep")
        grid = {"seed": list(range(trials))}
        train = dataclasses.replace(cfg.train, eval_every=cfg.train.steps // 2, ckpt_every=cfg.train.steps // 2)
        t_call = time.time()
        sweep.run_sweep(data, sw, grid, cfg.model, train, extra_points=None)
        t_done = time.time()
    finally:
        ray.shutdown()
    rows, prev = [], t_call
    marks = []
    for name in sweep.read_summary(sw)["trial"]:
        run = sweep.run_loc(storage.resolve(sw), name)
        t = storage.read_json(run.join(sweep.TIMINGS_FILE))
        placed = run.join("placement", "from-0-rank-0.json")  # a Ray Train worker's marks (N > 1 workers)
        w = storage.read_json(placed) if storage.exists(placed) else {**t, "t_worker_start": t["t_trial_start"]}
        marks.append((t["t_trial_start"], t, w, _rate(run.uri, 1)))
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size
    for start, t, w, rate in sorted(marks, key=lambda m: m[0]):
        steps_s = cfg.train.steps * tokens_per_step / rate
        phases = {"tune_starts_trial": start - prev, "train_starts_worker": w["t_worker_start"] - start,  # 0: trains in the trial
                  "worker_data_setup": w["t_ready"] - w["t_worker_start"],
                  "loop_beyond_steps": w["t_loop_end"] - w["t_ready"] - steps_s,
                  "train_teardown": t["t_fit_end"] - w["t_loop_end"], "trial_summary": t["t_summary_end"] - t["t_fit_end"]}
        rows.append({"steps_seconds": round(steps_s, 1), "overhead_seconds": round(sum(phases.values()), 1),
                     **{k: round(v, 2) for k, v in phases.items()}})
        prev = t["t_summary_end"]
    return {"trials": rows, "sweep_end_after_last_trial_seconds": round(t_done - prev, 1),
            "overhead_per_trial_seconds": round(statistics.median(r["overhead_seconds"] for r in rows), 1)}


def _on_cluster(nodes: int, cpus: int, data: str, cfg, tmp: str, pairs: int) -> dict:
    """Train 2 workers and fan out ``pairs`` prunes on a fresh local cluster of ``nodes`` nodes."""
    import ray

    from cluster import local, ray_train, runtime, s3server, storage
    from jobs import fanout
    from sparsity.prune import PruneConfig

    c = local.up(nodes=nodes, cpus_per_node=cpus, port=s3server.free_port(), dashboard_port=s3server.free_port())
    try:
        runtime.init(address=c.address, log_to_driver=False)
        run = os.path.join(tmp, f"run-{nodes}")
        t0 = time.perf_counter()
        ray_train.train_distributed(data, run, cfg, workers=2)
        train_wall = time.perf_counter() - t0
        placed = [storage.read_json(u) for u in storage.ls(os.path.join(run, "placement"), suffix=".json")]
        res = os.path.join(tmp, f"res-{nodes}")
        t0 = time.perf_counter()
        counts = fanout.fanout([run], TASKS[:pairs], res, PruneConfig(steps=60, prune_anyway=True))
        fan_wall = time.perf_counter() - t0
        return {"worker_nodes": nodes - 1, "cpus_per_node": cpus, "train_tokens_per_s": round(_rate(run, 2)),
                "train_wall_seconds": round(train_wall, 1), "train_nodes_used": len({p["node_id"] for p in placed}),
                "fanout_pairs": counts["pruned"], "fanout_pairs_per_min": round(60 * counts["pruned"] / fan_wall, 1),
                "fanout_wall_seconds": round(fan_wall, 1)}
    finally:
        ray.shutdown()
        local.down(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a dataset from `csp data prepare`")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=8, help="prune fan-out size on each cluster layout")
    ap.add_argument("--skip-in-process", action="store_true", help="only the multi-node comparison")
    ap.add_argument("--skip-cluster", action="store_true", help="only the in-process comparison")
    ap.add_argument("--tune-trials", type=int, default=3, help="trials in the Tune overhead sweep (0: skip it)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster import data, ray_train, runtime
    from sparsity.config import ModelConfig, RunConfig, SparsityConfig, TrainConfig

    n_ctx = data.read_manifest(args.data)["n_ctx"]
    d = args.d_model
    cfg = RunConfig(model=ModelConfig.gpt(d, block_size=n_ctx, n_head=max(1, d // 16)),
                    sparsity=SparsityConfig(pfrac=0.125),
                    train=TrainConfig(steps=args.steps, batch_size=args.batch, log_every=5, eval_every=0, ckpt_every=0))
    out: dict = {"model": f"d_model {d} × 2 layers, ctx {n_ctx}, batch {args.batch}", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_in_process:
            import torch

            from cluster import local_train

            torch.set_num_threads(os.cpu_count() or 1)
            run = os.path.join(tmp, "plain")
            t0 = time.perf_counter()
            local_train.train_local(args.data, run, cfg, device="cpu")
            out["plain_process"] = {"threads": torch.get_num_threads(), "tokens_per_s": round(_rate(run, 1)),
                                    "wall_seconds": round(time.perf_counter() - t0, 1)}
            runtime.init(num_cpus=4)
            for workers in (1, 2):
                run = os.path.join(tmp, f"w{workers}")
                t0 = time.perf_counter()
                ray_train.train_distributed(args.data, run, cfg, workers=workers)
                wall = time.perf_counter() - t0
                out[f"{workers}_worker"] = {"tokens_per_s": round(_rate(run, workers)), "wall_seconds": round(wall, 1)}
            out["speedup_2_vs_1"] = round(out["2_worker"]["tokens_per_s"] / out["1_worker"]["tokens_per_s"], 2)
            out["2_workers_over_plain_process"] = round(out["2_worker"]["tokens_per_s"] / out["plain_process"]["tokens_per_s"], 2)

            server = ray.remote(num_cpus=0)(ray_train.TokenServer).remote(args.data, cfg.to_dict(), 0, 2)
            ray.get(server.batch.remote(0))
            n = 200
            t0 = time.perf_counter()
            ray.get([server.batch.remote(i) for i in range(n)])
            loader = n * (args.batch // 2) * (n_ctx + 1) / (time.perf_counter() - t0)
            out["loader_tokens_per_s_per_worker"] = round(loader)
            out["loader_over_consumption"] = round(loader / (out["2_worker"]["tokens_per_s"] / 2), 1)
            ray.shutdown()

        if args.tune_trials:
            out["tune"] = _tune_overhead(args.data, cfg, tmp, args.tune_trials)
            out["tune_overhead_per_trial_seconds"] = out["tune"]["overhead_per_trial_seconds"]

        if not args.skip_cluster:
            one = _on_cluster(2, 4, args.data, cfg, tmp, args.pairs)  # head + one 4-CPU worker node
            two = _on_cluster(3, 2, args.data, cfg, tmp, args.pairs)  # head + two 2-CPU worker nodes
            out["cluster_1_node"], out["cluster_2_nodes"] = one, two
            out["train_tokens_per_s_2_nodes_over_1"] = round(two["train_tokens_per_s"] / one["train_tokens_per_s"], 2)
            out["fanout_pairs_per_min_2_nodes_over_1"] = round(two["fanout_pairs_per_min"] / one["fanout_pairs_per_min"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
