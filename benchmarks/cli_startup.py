"""How long the CLI takes to answer before any work; prints one JSON object.

    python benchmarks/cli_startup.py [--runs 5]

Wall seconds (median of --runs fresh processes) of `csp --help`, `csp train --help` and
`csp --version`: the heavy libraries (torch, ray, pandas) load only inside the commands
that use them, so these stay well under a second.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    csp = os.path.join(os.path.dirname(sys.executable), "csp")
    out: dict = {"runs": args.runs, "cpus": os.cpu_count()}
    for name, argv in (("help", ["--help"]), ("train_help", ["train", "--help"]), ("version", ["--version"])):
        walls = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([csp, *argv], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        out[f"{name}_seconds"] = round(statistics.median(walls), 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
