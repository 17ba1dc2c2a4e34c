"""Gates over a model's nodes for pruning (Gao et al. 2025, appendix "Pruning algorithm").

One gate τ per node (residual-read channels, q/k/v channels, MLP neurons, residual-write
channels, per layer). Through the hook points each node's activation becomes
``x·H(τ) + μ·(1 − H(τ))``: Heaviside forward, a sigmoid surrogate gradient backward, τ
clamped to [−1, 1]. μ is the node's ablation value (:func:`ablation_values`): its mean over
pretraining data, 0, or a random pretraining sequence's activation at the same position.
sparsity/prune.py trains the τ; sparsity/scoring.py scores fixed masks of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from sparsity import skip
from sparsity.circuit import NODE_LOCATIONS, node_sizes
from sparsity.errors import ConfigError


class _Heaviside(torch.autograd.Function):
    """H(τ) forward; σ'(τ/temp)/temp backward (a sigmoid surrogate)."""

    @staticmethod
    def forward(ctx, tau, temp):
        ctx.save_for_backward(tau)
        ctx.temp = temp
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temp)
        return grad * s * (1 - s) / ctx.temp, None


def heaviside(tau: torch.Tensor, temp: float) -> torch.Tensor:
    return _Heaviside.apply(tau, temp)


def node_names(cfg) -> list[str]:
    """Hook names of every node location, in forward order."""
    return [f"{layer}.{loc}" for layer in range(cfg.n_layer) for loc in NODE_LOCATIONS]


@torch.no_grad()
def node_means(model, batches: Iterable[torch.Tensor], device="cpu") -> dict[str, torch.Tensor]:
    """Each node's mean activation over pretraining data: {hook name: (width,)}.

    ``batches``: (B, T) token rows with no padding, so every position is a real one."""
    names = node_names(model.config)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for x in batches:
        x = x.to(device)[:, : model.config.block_size]
        with model.hooks.record(names) as cache:
            model(x)
        for n in names:
            s = cache[n].double().sum(dim=(0, 1))
            sums[n] = sums[n] + s if n in sums else s
        count += x.shape[0] * x.shape[1]
    if count == 0:
        raise ConfigError("node_means needs at least one batch of pretraining data")
    return {n: (s / count).float() for n, s in sums.items()}


@torch.no_grad()
def resample_pool(model, batches: Iterable[torch.Tensor], length: int, device="cpu") -> dict[str, torch.Tensor]:
    """Activations of pretraining sequences at their first ``length`` positions:
    {name: (P, length, width)}. Resample ablation gives each prompt one of these sequences,
    position by position."""
    names = node_names(model.config)
    x = torch.cat([b[:, :length] for b in batches]).to(device)
    if x.shape[1] < length:
        raise ConfigError(f"resample ablation needs pretraining rows of at least {length} tokens (got {x.shape[1]})")
    with model.hooks.record(names) as cache:
        model(x)
    return {n: cache[n] for n in names}


class _Masks(dict):
    """{location: H(τ)} as views of one tensor, ``flat``."""

    def __init__(self, items, flat: torch.Tensor):
        super().__init__(items)
        self.flat = flat


class Gates:
    """The τ parameters of one model and the hook replacements that apply them.

    ``ablate``: {name: (width,)} fixed values (mean, zero), or {name: (P, T, width)} a
    resample pool, from which :attr:`draw` ((B,) sequence indices) picks each row's values."""

    def __init__(self, model, ablate: dict[str, torch.Tensor], temp: float, init: float = 0.1, noise: float = 0.0,
                 generator: torch.Generator | None = None):
        self.model, self.temp = model, temp
        self.names = node_names(model.config)
        dev = next(model.parameters()).device
        sizes = node_sizes(model.config)
        self.widths = [sizes[n.split(".", 1)[1]] for n in self.names]
        parts = []
        for w in self.widths:
            t = torch.full((w,), float(init))
            if noise:
                t += noise * torch.randn(t.shape, generator=generator)
            parts.append(t.clamp_(-1.0, 1.0))
        # Every location's τ lives in one tensor, the only parameter: H(τ), its gradient, the
        # clamp and the optimizer are one op each per step instead of one per location.
        # ``tau`` holds read-only views of it, one per location. Unfused (the earlier path,
        # for benchmarks/prune.py): one parameter per location, as before.
        self.flat: torch.Tensor | None = None
        if self.fused:
            self.flat = torch.cat(parts).to(dev).requires_grad_(True)
            with torch.no_grad():
                self.tau = dict(zip(self.names, self.flat.split(self.widths), strict=True))
        else:
            self.tau = {n: t.to(dev).requires_grad_(True) for n, t in zip(self.names, parts, strict=True)}
        self.ablate = ablate
        self.draw: torch.Tensor | None = None  # resample: the pool row of each batch row
        self._masks: dict[str, torch.Tensor] = {}  # what the active gates apply: H(τ) or a fixed 0/1 mask
        # Running sum of τ over training: breaks ties between nodes clamped at the same τ
        # (a node that held on longer ranks higher).
        self.flat_sum = torch.zeros(sum(self.widths), device=dev)
        self.tau_sum = dict(zip(self.names, self.flat_sum.split(self.widths), strict=True))

    @property
    def resample(self) -> bool:
        return next(iter(self.ablate.values())).dim() == 3

    def parameters(self) -> list[torch.Tensor]:
        return [self.flat] if self.flat is not None else list(self.tau.values())

    def masks(self) -> dict[str, torch.Tensor]:
        """H(τ) of every location: computed once per training step and shared by every
        forward of that step (the gradients of all of them meet in one backward of H)."""
        if self.flat is None:
            return {n: heaviside(t, self.temp) for n, t in self.tau.items()}
        h = heaviside(self.flat, self.temp)
        return _Masks(zip(self.names, h.split(self.widths), strict=True), flat=h)

    @torch.no_grad()
    def clamp_and_sum(self) -> None:
        """After an optimizer step: τ back into [−1, 1], and added to its running sum."""
        if self.flat is not None:
            self.flat.clamp_(-1.0, 1.0)
            self.flat_sum += self.flat
            return
        for n, t in self.tau.items():
            t.clamp_(-1.0, 1.0)
            self.tau_sum[n] += t

    # False: the earlier formulation, x·g + μ·(1 − g) with H(τ) at every hook call (kept so
    # that benchmarks/prune.py measures against it)
    fused = True

    def _fn(self, name: str):
        def apply(x: torch.Tensor) -> torch.Tensor:  # x: (B, T, width)
            g = self._masks.get(name)
            if g is None:  # unfused: H(τ) at each hook call
                g = heaviside(self.tau[name], self.temp)
            mu = self.ablate[name]
            if mu.dim() == 3:  # resample: row b takes pool sequence draw[b], position by position
                pos = self.model.hooks.positions  # set where x holds one read position per row
                mu = mu[self.draw][:, : x.shape[1]] if pos is None else mu[self.draw, pos].unsqueeze(1)  # (B, T or 1, width)
            if not self.fused:
                return x * g + mu * (1 - g)
            # x·g + μ·(1 − g) in one op: lerp is exact at g ∈ {0, 1} and its gradient in g is x − μ
            z = torch.lerp(mu.to(x.dtype), x, g.to(x.dtype))
            if mu.dim() == 1 and skip.enabled and z.is_cpu:  # closed nodes hold μ everywhere: a linear layer reading z may skip them
                g = g.detach()
                open_cols = g.nonzero().squeeze(1)
                if open_cols.numel() <= skip.MAX_SHARE * g.numel():
                    skip.mark(z, open_cols, (mu * (1 - g)).to(x.dtype))
            return z

        return apply

    @contextlib.contextmanager
    def active(self, fixed: dict[str, torch.Tensor] | None = None, draw: torch.Tensor | None = None,
               masks: dict[str, torch.Tensor] | None = None):
        """Run the model with gates applied: a fixed 0/1 mask, else ``masks`` (this step's
        :meth:`masks`), else H(τ) computed now. ``draw``: each batch row's resample pool row
        (reassign :attr:`draw` between forwards to score other rows under the same masks)."""
        if self.resample and draw is None:
            raise ValueError("resample ablation needs a draw of pool rows for the batch")
        if fixed is not None:
            self._masks = fixed
        elif self.fused:
            self._masks = masks if masks is not None else self.masks()
        else:
            self._masks = {}  # unfused: H(τ) at each hook call
        self.draw = draw
        try:
            with self.model.hooks.replace({n: self._fn(n) for n in self.names}):
                yield
        finally:
            self._masks, self.draw = {}, None

    def l0(self, masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Σ H(τ): the open gates, differentiable (pass the step's ``masks`` to share them)."""
        masks = masks or self.masks()
        flat = getattr(masks, "flat", None)
        return flat.sum() if flat is not None else sum(m.sum() for m in masks.values())

    def n_open(self) -> int:
        if self.flat is not None:
            return int((self.flat.detach() > 0).sum())
        return sum(int((t.detach() > 0).sum()) for t in self.tau.values())

    def all_nodes(self) -> list[tuple[str, int]]:
        return [(n, i) for n, t in self.tau.items() for i in range(t.numel())]

    def ranking(self) -> list[tuple[str, int]]:
        """Every node, highest τ first; ties by τ summed over training, then name and index."""
        items = []
        for n, t in self.tau.items():
            for i, (v, acc) in enumerate(zip(t.detach().cpu().tolist(), self.tau_sum[n].cpu().tolist(), strict=True)):
                items.append((v, acc, n, i))
        items.sort(key=lambda r: (-r[0], -r[1], r[2], r[3]))
        return [(n, i) for _, _, n, i in items]

    def top_k_mask(self, ranking: list[tuple[str, int]], k: int) -> dict[str, torch.Tensor]:
        dev = next(iter(self.tau.values())).device
        m = {n: torch.zeros_like(t, dtype=torch.float32, device=dev) for n, t in self.tau.items()}
        for n, i in ranking[:k]:
            m[n][i] = 1.0
        return m


def ablation_values(model, ablation: str, batches: list[torch.Tensor] | None, length: int, device="cpu") -> dict[str, torch.Tensor]:
    """μ for every node location under the chosen ablation: (width,) each, or for resample
    a pool of pretraining sequences' activations (P, length, width)."""
    sizes = node_sizes(model.config)
    if ablation == "zero":
        return {n: torch.zeros(sizes[n.split(".", 1)[1]], device=device) for n in node_names(model.config)}
    if not batches:
        raise ConfigError(f"ablation={ablation!r} needs pretraining batches (mean/resample are taken over pretraining data)")
    if ablation == "mean":
        return node_means(model, batches, device)
    return resample_pool(model, batches, length, device)
