"""Prune fan-out throughput and results-query speed; prints one JSON object.

    python benchmarks/fanout.py [--pairs 8]

Figures from one run: pairs/min with 1 and 2 tasks in flight (random demo-size model,
mask training shortened to 60 steps so the benchmark takes minutes, not an hour) and
their ratio; seconds to read 100,000 circuit_edges rows with a task filter (pyarrow
partition pruning) out of a 500,000-row store.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="pairs per measurement (tasks × 2 checkpoints)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from cluster import checkpoints, data, runtime, storage
    from jobs import fanout, results
    from jobs import store as store_lib
    from sparsity import checkpoint_format as ckpt_lib
    from sparsity.circuit import Circuit
    from sparsity.config import ModelConfig, RunConfig, SparsityConfig
    from sparsity.model import GPT
    from sparsity.prune import PruneConfig
    from sparsity.tasks import REGISTRY

    runtime.init(num_cpus=2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ds = os.path.join(tmp, "data")
        data.prepare(None, ds, n_ctx=128)
        runs = []
        for i in range(2):
            torch.manual_seed(i)
            m = GPT(ModelConfig(d_model=128, n_head=8, d_mlp=512, block_size=128))
            cfg = RunConfig(model=m.config, sparsity=SparsityConfig(pfrac=1.0))
            run = os.path.join(tmp, f"run{i}")
            checkpoints.save(run, ckpt_lib.to_files(m, cfg, 1), 1)
            storage.write_json(os.path.join(run, "run.json"), {"config": cfg.to_dict(), "data": ds})
            runs.append(run)
        names = list(REGISTRY)[: max(1, args.pairs // 2)]
        pcfg = PruneConfig(steps=60, prune_anyway=True)  # random models: prune anyway
        for inflight in (1, 2):
            res = os.path.join(tmp, f"res{inflight}")
            t0 = time.perf_counter()
            c = fanout.fanout(runs, names, res, pcfg, max_in_flight=inflight)
            dt = time.perf_counter() - t0
            out[f"{inflight}_worker"] = {"pairs": c["pruned"], "seconds": round(dt, 1), "pairs_per_min": round(c["pruned"] / dt * 60, 2)}
        out["speedup_2_vs_1"] = round(out["2_worker"]["pairs_per_min"] / out["1_worker"]["pairs_per_min"], 2)

        # 20 models × 5 tasks × 5,000 edges: 500,000 rows, 100,000 of them for the filtered task.
        store = os.path.join(tmp, "store")
        edges = [{"src": (0, "attn.act_in", i % 128), "dst": (0, "attn.q", i % 64), "kind": "attn.q", "weight": 0.1} for i in range(5000)]
        for task in list(REGISTRY)[:5]:
            for m in range(20):
                store_lib.write_result(store, {"model_id": f"bench{m}", "checkpoint_fingerprint": str(m)}, task,
                                       Circuit(task, [(0, "attn.q", 0)], edges, {"status": "ok", "sufficiency_loss": 0.1}), cfg=pcfg)
        t0 = time.perf_counter()
        df = results.edges(store, task="single_double_quote")
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        all_rows = results.edges(store)
        full = time.perf_counter() - t0
        out["query"] = {"rows_in_store": len(all_rows), "task_filter_rows": len(df), "task_filter_seconds": round(one, 4),
                        "all_rows_seconds": round(full, 4)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
