"""Imported first by every benchmark script: puts the repository root on sys.path and
takes this folder off it (benchmarks/tokenize.py would otherwise shadow the stdlib's
`tokenize`, which torch and inspect import)."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
