"""Distributed training throughput on this machine; prints one JSON object.

    python benchmarks/distributed.py --data csp-runs/data [--steps 60] [--d-model 128]

Figures, from one run: training tokens/s with 1 and 2 Ray Train workers (same global
batch; rate taken from the reported steady-state tokens/s, startup excluded) and their
ratio; the token-server actor's batches/s as tokens/s against what the trainer consumes.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a dataset from `csp data prepare`")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from cluster import data, runtime, storage, trainer
    from sparsity.config import ModelConfig, RunConfig, SparsityConfig, TrainConfig

    n_ctx = data.read_manifest(args.data)["n_ctx"]
    d = args.d_model
    cfg = RunConfig(model=ModelConfig(block_size=n_ctx, d_model=d, n_head=max(1, d // 16), d_mlp=4 * d),
                    sparsity=SparsityConfig(pfrac=0.125),
                    train=TrainConfig(steps=args.steps, batch_size=args.batch, log_every=5, eval_every=0, ckpt_every=0))
    runtime.init(num_cpus=4)
    out = {"model": f"d_model {d} × 2 layers, ctx {n_ctx}, batch {args.batch}", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            run = os.path.join(tmp, f"w{workers}")
            t0 = time.perf_counter()
            trainer.train_distributed(args.data, run, cfg, workers=workers)
            wall = time.perf_counter() - t0
            hist = [json.loads(x) for x in storage.read_text(os.path.join(run, "metrics.jsonl")).splitlines()]
            rates = [m["tokens_per_s"] for m in hist if "tokens_per_s" in m][2:]  # skip warm-up
            out[f"{workers}_worker"] = {"tokens_per_s": round(statistics.median(rates) * workers), "wall_seconds": round(wall, 1)}
        out["speedup_2_vs_1"] = round(out["2_worker"]["tokens_per_s"] / out["1_worker"]["tokens_per_s"], 2)

        server = ray.remote(num_cpus=0)(trainer.TokenServer).remote(args.data, cfg.to_dict(), 0, 2)
        ray.get(server.batch.remote(0))
        n = 200
        t0 = time.perf_counter()
        ray.get([server.batch.remote(i) for i in range(n)])
        loader = n * (args.batch // 2) * (n_ctx + 1) / (time.perf_counter() - t0)
        out["loader_tokens_per_s_per_worker"] = round(loader)
        consumed = out["2_worker"]["tokens_per_s"] / 2
        out["loader_over_consumption"] = round(loader / consumed, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
