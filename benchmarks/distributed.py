"""Distributed throughput on this machine; prints one JSON object.

    python benchmarks/distributed.py --data csp-runs/data [--steps 60] [--d-model 128] [--pairs 8]

Figures, from one run:

* one plain process (no Ray) with torch on every core: the best single process on these
  cores, the baseline that N workers must beat;
* in-process Ray: training tokens/s with 1 and 2 Ray Train workers (same global batch;
  rate taken from the reported steady-state tokens/s, startup excluded), their ratio, and
  2 workers against the best single process;
  the token-server actor's batches/s as tokens/s against what the trainer consumes;
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

        if not args.skip_cluster:
            one = _on_cluster(2, 4, args.data, cfg, tmp, args.pairs)  # head + one 4-CPU worker node
            two = _on_cluster(3, 2, args.data, cfg, tmp, args.pairs)  # head + two 2-CPU worker nodes
            out["cluster_1_node"], out["cluster_2_nodes"] = one, two
            out["train_tokens_per_s_2_nodes_over_1"] = round(two["train_tokens_per_s"] / one["train_tokens_per_s"], 2)
            out["fanout_pairs_per_min_2_nodes_over_1"] = round(two["fanout_pairs_per_min"] / one["fanout_pairs_per_min"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
