"""How long the CLI takes to answer before any work; prints one JSON object.

    python benchmarks/cli_startup.py [--runs 5] [--demo ./csp-runs]

Wall seconds (median of --runs fresh processes) of `csp --help`, `csp train --help` and
`csp --version`: the heavy libraries (torch, ray, pandas) load only inside the commands
that use them, so these stay well under a second. With ``--demo`` (a `csp demo` output
directory) also the commands that answer from stored files and need no model — `tasks
list`, `tasks show`, `results circuits|frontier|controls`, `sweep status`, `data info` —
none of which imports torch or Ray.
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
    ap.add_argument("--demo", help="a `csp demo` output directory: also time the commands that read its stores")
    args = ap.parse_args()
    csp = os.path.join(os.path.dirname(sys.executable), "csp")
    out: dict = {"runs": args.runs, "cpus": os.cpu_count()}
    commands = [("help", ["--help"]), ("train_help", ["train", "--help"]), ("version", ["--version"])]
    if args.demo:
        d = args.demo
        commands += [("tasks_list", ["tasks", "list"]), ("tasks_show", ["tasks", "show", "else_elif", "--n", "1"]),
                     ("results_circuits", ["results", "circuits", f"{d}/results"]),
                     ("results_frontier", ["results", "frontier", f"{d}/results"]),
                     ("results_controls", ["results", "controls", f"{d}/results"]),
                     ("sweep_status", ["sweep", "status", f"{d}/sweep"]), ("data_info", ["data", "info", f"{d}/data"])]
    for name, argv in commands:
        walls = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([csp, *argv], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
        out[f"{name}_seconds"] = round(statistics.median(walls), 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
