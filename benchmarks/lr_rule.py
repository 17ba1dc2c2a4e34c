"""The learning-rate rule checked where the demo trains: val loss of the demo's models on the
paper's architecture (``demo.full_plan(optimizer, paper=True)``: AbsTopK on, the demo's steps) at
several learning rates around csp's rule; prints one JSON object.

    python benchmarks/lr_rule.py [--out ./csp-runs/lr-rule] [--optimizer adam] [--points d128:1:0.0075,…]

A point is ``width:density:lr`` (density of the block matrices; 1 is dense). By default:
the dense model at d_model 64 and 128 and the 1/8-density model at d_model 128, each at
several lrs. Trials are a Ray Tune sweep (one trial per point, one CPU each), so pointing
``--out`` at a demo's sweep directory (OUT/sweep of ``benchmarks/demo_optimizers.py``)
reuses the points it already trained. A re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import _bootstrap  # noqa: F401  (first: fixes sys.path)

DEFAULT = ("64:1:0.01,64:1:0.03,64:1:0.06,"
           "128:1:0.0075,128:1:0.01,128:1:0.015,128:1:0.03,"
           "128:0.125:0.0141,128:0.125:0.0283,128:0.125:0.0424,128:0.125:0.0849")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="./csp-runs/lr-rule")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "muon"])
    ap.add_argument("--points", default=DEFAULT)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from cluster import data, runtime
    from jobs import demo, sweep

    plan = demo.full_plan(args.optimizer, paper=True)
    base_d = plan.base.d_model
    pts = []
    for spec in args.points.split(","):
        width, density, lr = spec.split(":")
        ef = int(width) / base_d
        pts.append({"pfrac": float(density) * ef * ef, "ef": ef, "lr": float(lr)})  # density = pfrac/ef²
    ds = os.path.join(os.path.dirname(args.out.rstrip("/")) or ".", "data")
    runtime.init(num_cpus=os.cpu_count() or 1, log_to_driver=False)
    try:
        data.prepare(None, ds, n_ctx=plan.n_ctx)
        df = sweep.run_sweep(ds, args.out, None, plan.base, plan.train, extra_points=pts)
    finally:
        ray.shutdown()
    rows = []
    for r in df.itertuples():
        density = r.pfrac / r.ef ** 2
        rows.append({"d_model": int(r.d_model), "density": density, "seed": int(r.seed), "lr": r.lr, "val_loss": round(float(r.val_loss), 4),
                     "rule_lr": round(plan.lr_dense / math.sqrt(density), 4)})
    rows.sort(key=lambda x: (x["d_model"], x["density"], x["lr"]))
    print(json.dumps({"plan": f"demo.full_plan({args.optimizer!r}, paper=True)", "steps": plan.train.steps, "points": rows}, indent=1))


if __name__ == "__main__":
    main()
