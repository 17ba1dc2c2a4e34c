"""Imported first by every benchmark script: puts the repository root on sys.path and
takes this folder off it (benchmarks/tokenize.py would otherwise shadow the stdlib's
`tokenize`, which torch and inspect import)."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))


def cpu_name() -> str:
    """This machine's CPU model, for the record a benchmark prints beside its figures."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
