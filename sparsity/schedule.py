"""Schedules: pure functions of the step (unit-tested at their boundaries).

Step s runs from 0 to steps-1; "progress" is s / steps.
"""

from __future__ import annotations

import math

from sparsity.config import SparsityConfig, TrainConfig


def density_at(step: int, steps: int, target: float, start: float, end: float) -> float:
    """Weight density: 1 (dense) until ``start``·steps, then linear to ``target`` at
    ``end``·steps, then ``target``."""
    p = step / steps
    if p <= start:
        return 1.0
    if p >= end or end <= start:
        return target
    return 1.0 - (1.0 - target) * (p - start) / (end - start)


def l0_at(step: int, steps: int, sp: SparsityConfig) -> tuple[float, float]:
    """(block density, embedding density) at ``step``."""
    return (
        density_at(step, steps, sp.l0frac, sp.anneal_start, sp.anneal_end),
        density_at(step, steps, sp.embed_l0frac, sp.anneal_start, sp.anneal_end),
    )


def lr_at(step: int, tc: TrainConfig, sp: SparsityConfig) -> float:
    """Learning rate: linear warmup over warmup_frac, linear decay to 0, times
    sqrt(L0_final / L0_t) while the density anneals (smaller steps while still dense)."""
    warm = max(1, math.ceil(tc.warmup_frac * tc.steps)) if tc.warmup_frac > 0 else 0
    if step < warm:
        base = tc.lr * (step + 1) / warm
    else:
        base = tc.lr * max(0.0, (tc.steps - step) / max(1, tc.steps - warm))
    l0_t, _ = l0_at(step, tc.steps, sp)
    return base * math.sqrt(sp.l0frac / l0_t)
