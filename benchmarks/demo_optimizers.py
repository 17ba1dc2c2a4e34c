"""The demo plan on the paper's architecture (``demo.full_plan(paper=True)``: AbsTopK on,
one point at a second seed) trained with the paper's Adam and with Muon, side by side;
prints one JSON object (outside CI: two full demos, ~25 minutes each on 2 CPU cores).

    python benchmarks/demo_optimizers.py [--out ./csp-runs/optimizers] [--optimizers adam,muon]

Each optimizer gets its own output directory (OUT/<optimizer>/, a complete demo with its
report); per model: density, width, seed, val loss, tasks the full model solves, verified
circuits, and the geometric mean of the verified circuits' edges. A re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import _bootstrap  # noqa: F401  (first: fixes sys.path)

from jobs import demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="./csp-runs/optimizers")
    ap.add_argument("--optimizers", default="adam,muon")
    args = ap.parse_args()
    out: dict = {"plan": "demo.full_plan(paper=True)", "runs": {}}
    for opt in args.optimizers.split(","):
        t0 = time.monotonic()
        r = demo.run(f"{args.out.rstrip('/')}/{opt}", plan=demo.full_plan(opt, paper=True), log=lambda _m: None)
        s = r["summary"]
        out["runs"][opt] = {
            "wall_s": round(time.monotonic() - t0, 1), "timings_s": {k: round(v, 1) for k, v in r["timings"].items()},
            "report": r["report"],
            "models": [{"trial": m.trial, "d_model": int(m.d_model), "density": m.density, "seed": int(m.seed),
                        "nonzeros": int(m.nonzeros), "val_loss": round(float(m.val_loss), 4), "tasks_solved": int(m.tasks_solved),
                        "verified_circuits": int(m.tasks_with_circuit),
                        "geomean_edges": None if math.isnan(m.geomean_edges) else round(float(m.geomean_edges), 1)}
                       for m in s.itertuples()],
        }
        print(json.dumps({opt: out["runs"][opt]}), flush=True)  # one line per finished optimizer, then the whole
    print(json.dumps(out))


if __name__ == "__main__":
    main()
