"""Weight sparsity: after every optimizer step each matrix keeps its top-k entries by |w|.

k = density_t · numel with one density for every block matrix (L0frac = pfrac/(ef·ef_mlp))
and the embedding fraction for wte / wpe / lm_head; biases, norms and the bigram table stay
dense. The floor: no MLP neuron or attention channel keeps fewer than ``min_per_unit``
weights — each unit's top ones win before the global top-k (so k is at least
min_per_unit × units).

Selection is exact but cheap. A full ``kthvalue`` over every matrix costs ~8% of a CPU
step at d_model 256; instead a random sample of |w| brackets the k-th largest value, one
pass counts what lies above the bracket, and ``kthvalue`` runs only on the ~3% of entries
inside it. If the bracket misses (rare) or ties make the count differ from k, the exact
fallback (``topk``) runs. The result never depends on the sample, only the speed does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from sparsity.config import SparsityConfig
from sparsity.schedule import l0_at

_SAMPLE = 8192


@dataclass(frozen=True)
class Target:
    """One sparsified matrix: ``units_dim`` is the axis indexing its neurons/channels
    (0: rows, 1: columns) for the floor, or None for no floor."""

    name: str
    param: nn.Parameter
    kind: str  # "block" or "embed"
    units_dim: int | None

    @property
    def n_units(self) -> int:
        return 0 if self.units_dim is None else self.param.shape[self.units_dim]


def sparse_targets(model: nn.Module) -> list[Target]:
    """The matrices weight sparsity applies to, with their floor axis."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")):
            out.append(Target(name, p, "block", 0))  # rows: q/k/v channels, MLP neurons (their inputs)
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            out.append(Target(name, p, "block", 1))  # columns: attention channels, MLP neurons (their outputs)
        elif name in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            out.append(Target(name, p, "embed", None))
    return out


def scheduled_k(t: Target, density: float, floor: int) -> int:
    """Nonzeros allowed in ``t`` at ``density``: at least the floor, at most numel."""
    n = t.param.numel()
    fan = n // max(1, t.n_units) if t.n_units else 0
    return min(n, max(int(round(density * n)), min(floor, fan) * t.n_units))


def _topk_mask(score: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries of ``score`` (fewer where the k-th
    largest is 0: zeros are never "kept")."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k >= n:
        return score > 0
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    # Bracket the k-th largest value between two quantiles of a random sample.
    sample = flat[torch.randint(0, n, (_SAMPLE,), generator=gen, device="cpu").to(flat.device)]
    p = k / n
    slack = 4.0 * math.sqrt(p * (1 - p) / _SAMPLE) + 2.0 / _SAMPLE
    hi = sample.kthvalue(min(_SAMPLE, int((1 - p + slack) * _SAMPLE) + 1)).values
    lo = sample.kthvalue(max(1, int((1 - p - slack) * _SAMPLE))).values
    cand = flat[flat >= lo]  # the one full pass: everything at or above the bracket (~p + slack of n)
    if cand.numel() >= k:
        above = cand > hi
        n_above = int(torch.count_nonzero(above))
        band = cand[~above]  # small: the bracket holds ~2·slack of n
        need = k - n_above
        thr, ties = None, 0
        if need == 0 and n_above:
            thr = cand[above].min()
        elif 0 < need <= band.numel():
            thr = band.kthvalue(band.numel() - need + 1).values
            ties = int(torch.count_nonzero(band == thr)) - 1  # only the band can hold values equal to thr
        if thr is not None and float(thr) == 0.0:
            return score > 0
        if thr is not None and ties == 0:
            return score >= thr  # exactly k: n_above above the bracket, `need` inside it
    idx = flat.topk(k, sorted=False).indices  # exact fallback: bracket missed, or ties
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    mask[idx] = True
    return mask.view_as(score) & (score > 0)


def project_(t: Target, k: int, floor: int, gen: torch.Generator) -> None:
    """Zero all but the top-k |w| of one matrix in place, honouring the unit floor."""
    w = t.param.data
    if k >= w.numel():
        return
    a = w.abs()
    keep = _topk_mask(a, k, gen)
    if floor > 0 and t.units_dim is not None:
        reduce_dim = 1 - t.units_dim
        if bool((keep.sum(dim=reduce_dim) < min(floor, w.shape[reduce_dim])).any()):
            # Some unit fell under the floor: its top weights win first, the rest compete.
            units = a if t.units_dim == 0 else a.t()  # (units, fan)
            top = units.topk(min(floor, units.shape[1]), dim=1, sorted=False).indices
            forced = torch.zeros_like(units, dtype=torch.bool).scatter_(1, top, True)
            if t.units_dim == 1:
                forced = forced.t()
            keep = _topk_mask(a.masked_fill(forced, float("inf")), k, gen) & (a > 0)
    w.mul_(keep)


class WeightSparsifier:
    """Applies the scheduled top-k projection to every target matrix of a model."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig, steps: int, seed: int = 0):
        self.targets = sparse_targets(model)
        self.cfg, self.steps = cfg, steps
        # Only the speed of selection depends on this generator, never its result.
        self.gen = torch.Generator().manual_seed(seed)

    def ks(self, step: int) -> dict[str, int]:
        """{matrix name: allowed nonzeros} after optimizer step ``step``."""
        block, embed = l0_at(step, self.steps, self.cfg)
        return {t.name: scheduled_k(t, block if t.kind == "block" else embed, self.cfg.min_per_unit) for t in self.targets}

    @torch.no_grad()
    def apply(self, step: int) -> None:
        ks = self.ks(step)
        for t in self.targets:
            project_(t, ks[t.name], self.cfg.min_per_unit, self.gen)

    @torch.no_grad()
    def nonzeros(self) -> dict[str, int]:
        return {t.name: int((t.param != 0).sum()) for t in self.targets}
