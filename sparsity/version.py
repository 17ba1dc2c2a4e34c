"""Which code made a result: the package version, and the git commit (with a dirty flag)
when csp runs from a checkout. Computed once per process; stdlib only."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def code_version() -> str:
    """``0.1.0+g1a2b3c4d5e6f`` in a clean checkout, ``…+g1a2b3c4d5e6f.dirty`` with local
    changes, plain ``0.1.0`` in an installed copy without .git (e.g. a Ray job's upload)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("csp")
    except PackageNotFoundError:
        v = "unknown"
    if not (ROOT / ".git").exists():
        return v
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return v
    desc = out.stdout.strip()
    if out.returncode != 0 or not desc:
        return v
    commit = desc.removesuffix("-dirty")
    return f"{v}+g{commit}{'.dirty' if desc.endswith('-dirty') else ''}"
