"""Early stopping for sweeps: the same grid with and without `--scheduler asha`, in one run;
prints one JSON object.

    python benchmarks/sweep_asha.py --data csp-runs/data [--grid 'pfrac=0.25,1;lr=0.003,0.01,0.03,0.1'] [--steps 300]
                                    [--batch 8] [--d-model 64] [--cpus 2] [--smoke]

Both sweeps run on one in-process Ray with ``--cpus`` logical CPUs (one trial per CPU),
from empty directories: wall time of each, their ratio, how many trials ASHA stopped and at
which step, and the best trial (lowest val loss among the trials that ran to their end) of
each, which should be the same trial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import _bootstrap  # noqa: F401  (first: fixes sys.path)


def run(data: str, grid: str, steps: int, batch: int, d_model: int, scheduler: str | None, out: str) -> dict:
    from jobs import sweep

    parsed = sweep.parse_grid(grid)
    base, train = sweep.build_configs(data, parsed, steps=steps, batch_size=batch, d_model=d_model, evals=8)
    t0 = time.perf_counter()
    df = sweep.run_sweep(data, out, parsed, base, train, density_lr="lr" not in parsed, scheduler=scheduler)
    wall = time.perf_counter() - t0
    done = df[df["stopped_at"].isna()]
    best = done.loc[done["val_loss"].idxmin()]
    return {"wall_seconds": round(wall, 1), "trials": len(df), "stopped": int(df["stopped_at"].notna().sum()),
            "stopped_at": {t: int(s) for t, s in zip(df["trial"], df["stopped_at"], strict=True) if s == s and s is not None},
            "best_trial": best["trial"], "best_val_loss": round(float(best["val_loss"]), 4),
            "val_loss": {t: round(float(v), 4) for t, v in zip(df["trial"], df["val_loss"], strict=True)}}


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared shards (csp data prepare; default: prepare this Python's stdlib in a temp dir)")
    ap.add_argument("--grid", default="pfrac=0.25,1;lr=0.003,0.01,0.03,0.1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="a 3-trial grid of 20 steps: the code path in seconds")
    args = ap.parse_args()
    from cluster import data, runtime

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.grid, args.steps, args.batch = "lr=0.03,0.01,3", 20, 4
        if args.data is None:
            args.data = os.path.join(tmp, "data")
            data.prepare(None, args.data, n_ctx=64)
        runtime.init(num_cpus=args.cpus, log_to_driver=False)
        with _stdout_to_stderr():  # Tune's tables (written to the stdout file descriptor): stdout carries the JSON alone
            full = run(args.data, args.grid, args.steps, args.batch, args.d_model, None, os.path.join(tmp, "full"))
            asha = run(args.data, args.grid, args.steps, args.batch, args.d_model, "asha", os.path.join(tmp, "asha"))
        # A trial ASHA stopped can still be finishing its last write when the sweep returns:
        # end Ray's workers before the directory goes (under load, rmtree met new files there).
        import ray

        ray.shutdown()
    print(json.dumps({"grid": args.grid, "steps": args.steps, "batch": args.batch, "d_model": args.d_model, "cpus": args.cpus,
                      "full": full, "asha": asha, "wall_ratio": round(asha["wall_seconds"] / full["wall_seconds"], 3),
                      "same_best": full["best_trial"] == asha["best_trial"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
