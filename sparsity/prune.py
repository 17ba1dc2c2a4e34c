"""Node pruning: the smallest set of nodes that still does a task (Gao et al. 2025 §3 and
appendix "Pruning algorithm").

One gate τ per node (residual-read channels, q/k/v channels, MLP neurons, residual-write
channels, per layer). Through the hook points each node's activation becomes
``x·H(τ) + μ·(1 − H(τ))``: Heaviside forward, a sigmoid surrogate gradient backward, τ
clamped to [−1, 1]. μ is the node's ablation value: its mean over pretraining data (mean
ablation, the default), 0 (zero ablation), or the activation of a random pretraining
sequence at the same position (resample ablation: a different sequence per prompt, drawn
afresh every step). Training minimises task loss + k_coef·Σ H(τ), each step on a fresh
batch of train pairs; then the nodes are ranked by τ and k is bisected for the smallest
top-k circuit whose loss on held-out *selection* pairs is ≤ target (by a margin of one
standard error, so the chosen k is not the one their noise favours). The circuit is then
verified on *test* pairs (a third, disjoint seed): sufficiency (only the circuit kept: its
loss must meet the target for status ``ok``) and necessity (only the circuit ablated),
beside a matched baseline (as many random nodes ablated). Optionally a scale and shift of
the final answer logits are fitted per circuit (the paper's 16 LBFGS steps).

Defaults follow the paper's pruning hyper-parameters as restated from its Table 2 by the
community replication jacobcd52/sparse_pretrain_public (τ init N(0.1, 0.01), surrogate
temperature 1, AdamW lr 3e-3 with β (0.9, 0.95), 5% warmup then linear decay, 64 task
datapoints per step, target 0.15 on the reference's summed two-sided loss); the step count
and k_coef are csp's, chosen from a measured curve (docs/circuits.md, "Pruning").
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch

from sparsity.circuit import NODE_LOCATIONS, Circuit, edges_between, extra_edge_counts, node_sizes
from sparsity.config import ABLATIONS, PruneConfig  # noqa: F401  (re-exported: the pruning config lives with the others)
from sparsity.errors import ConfigError
from sparsity.tasks.base import CHANCE_LOSS, TEST_SEED, TRAIN_SEED, Task
from sparsity.tasks.tensors import Batch, encode, pair_accuracy, pair_loss

SELECT_SEED = TRAIN_SEED + 1  # held-out pairs for choosing k: neither train nor test
RANDOM_BASELINE_DRAWS = 5  # random node sets ablated for the necessity baseline
# Below this held-out accuracy a model is at chance on a task (64 pairs × 2 prompts: one
# standard error of a coin is ~0.044, so 0.6 is > 2 SE above 0.5).
CHANCE_ACCURACY = 0.6


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
            return torch.lerp(mu.to(x.dtype), x, g.to(x.dtype))

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


def _joint(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupt prompts as one (2n, T) batch and their answer positions (2n,)."""
    T = max(b.clean.shape[1], b.corrupt.shape[1])

    def pad(t):  # after each prompt's last token, where causal attention never looks back
        return torch.nn.functional.pad(t, (0, T - t.shape[1]))

    return torch.cat([pad(b.clean), pad(b.corrupt)]), torch.cat([b.clean_last, b.corrupt_last])


BUCKETS = 4  # a batch runs as this many length buckets, each trimmed to its own longest prompt
# ... and as this many when corrupt prompts share their clean twin's prefix: each bucket is
# then two passes (clean, then corrupt suffixes), and at these sizes a pass costs more in
# op overhead than padding does (a mask step on the demo's d128 model, 2 cores: 2 buckets
# 68-73 ms against 77-83 ms with 3 and 93-97 ms with 4; 4 unshared buckets: 87-93 ms)
PAIRED_BUCKETS = 2


def _answer_logits(model, gates: Gates | None, tokens: torch.Tensor, last: torch.Tensor, fixed=None,
                   draw: torch.Tensor | None = None, masks: dict[str, torch.Tensor] | None = None,
                   cols: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits at each row's answer position, with gates applied (``gates`` None: the
    full model; ``masks``: this training step's H(τ)); with ``cols`` (B/2, K), the token ids
    each pair reads (its answer and the alternative), only those: (B, K). Rows run in length buckets, each
    trimmed to its own longest prompt, so short prompts do not pay for the long ones' padding
    (~30% of a step on the demo tasks); causal attention makes the result the same as one
    padded forward. The gates' masks are computed once for all buckets.

    ``tokens`` is a joint batch (clean prompts, then their corrupt twins: :func:`_joint`).
    Under a fixed ablation (no ``draw``) each corrupt prompt runs only from where it departs
    from its clean twin, reading the twin's keys and values before that
    (``GPT.read_pairs``): the same logits for about a quarter fewer FLOPs (docs/pruning-speed.md)."""
    ctx = gates.active(fixed, draw, masks) if gates is not None else contextlib.nullcontext()
    n = tokens.shape[0] // 2
    with ctx:
        if draw is None and getattr(model, "share_prefixes", False) and model.read_positions_only and not model.hooks.recording and n:
            return _paired_logits(model, tokens[:n], last[:n], tokens[n:], last[n:], cols)
        order = torch.argsort(last, stable=True)
        pieces = []
        for idx in order.chunk(min(BUCKETS, len(order))):
            T = int(last[idx].max()) + 1
            if gates is not None and draw is not None:
                gates.draw = draw[idx]
            pieces.append(model(tokens[idx, :T], at=last[idx]))
    out = torch.cat(pieces)[torch.argsort(order)]
    return out if cols is None else out.gather(1, torch.cat([cols, cols]))


def shared_prefix(a: torch.Tensor, b: torch.Tensor, last_a: torch.Tensor, last_b: torch.Tensor) -> torch.Tensor:
    """(n,) how many first tokens row b shares with row a, at most up to b's answer
    position (which b computes itself) and within both prompts."""
    same = (a == b).long().cumprod(1).sum(1)
    return torch.minimum(torch.minimum(same, torch.minimum(last_a, last_b) + 1), last_b)


def _paired_logits(model, a, last_a, b, last_b, cols=None) -> torch.Tensor:
    """Logits of the joint batch (a; b) with each b row sharing its prefix with its a row,
    in length buckets of the pairs (``cols``: only those, as the unembedding of just the
    answer and the alternative)."""
    start = shared_prefix(a, b, last_a, last_b)
    order = torch.argsort(last_a, stable=True)
    pa, pb = [], []
    for idx in order.chunk(min(PAIRED_BUCKETS, len(order))):
        ya, yb = model.read_pairs(a[idx, : int(last_a[idx].max()) + 1], last_a[idx],
                                  b[idx, : int(last_b[idx].max()) + 1], last_b[idx], start[idx],
                                  None if cols is None else cols[idx])
        pa.append(ya)
        pb.append(yb)
    back = torch.argsort(order)
    return torch.cat([torch.cat(pa)[back], torch.cat(pb)[back]])


_TWO = (torch.tensor([0]), torch.tensor([1]))  # the answer's and the alternative's column in logits read with ``cols``


def _split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = logits.shape[0] // 2
    return logits[:n], logits[n:]


class _Evaluator:
    """One fixed set of pairs, scored under fixed masks (or no gates: the full model)."""

    def __init__(self, model, gates: Gates | None, batch: Batch, device, draw: torch.Tensor | None):
        self.model, self.gates, self.batch = model, gates, batch
        tokens, last = _joint(batch)
        self.tokens, self.last = tokens.to(device), last.to(device)
        # the logits it scores are each pair's answer and alternative only: columns 0 and 1
        self.cols = torch.stack([batch.target, batch.alt], 1).to(device)
        self.target, self.alt = _TWO[0].expand(len(batch.target)).to(device), _TWO[1].expand(len(batch.target)).to(device)
        self.draw = draw

    @torch.no_grad()
    def logits(self, fixed=None) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.gates if fixed is not None else None
        return _split(_answer_logits(self.model, gates, self.tokens, self.last, fixed, self.draw, cols=self.cols))

    def scores(self, logits: tuple[torch.Tensor, torch.Tensor], calib=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses, per-pair accuracy) of logits from :meth:`logits`."""
        lc, lx = logits
        if calib is not None:
            lc, lx = _calibrated(lc, lx, self.target, *calib)
        return pair_loss(lc, lx, self.target, self.alt), pair_accuracy(lc, lx, self.target, self.alt)

    def losses(self, fixed=None, calib=None) -> torch.Tensor:
        return self.scores(self.logits(fixed), calib)[0]

    def loss(self, fixed=None, calib=None) -> float:
        return float(self.losses(fixed, calib).mean())

    def accuracy(self, fixed=None, calib=None) -> float:
        return float(self.scores(self.logits(fixed), calib)[1].mean())


def _calibrated(lc, lx, target, scale, shift):
    """Scale the answer logits and shift the target's (the binary choice sees a·d + b)."""
    out = []
    for lg in (lc, lx):
        lg = lg * scale
        lg = lg.scatter_add(1, target[:, None], torch.zeros_like(lg[:, :1]) + shift)
        out.append(lg)
    return out


def _fit_calibration(ev: _Evaluator, fixed) -> tuple[float, float]:
    """Scale and shift of the final logits by 16 LBFGS steps (the paper's mask-discretization
    calibration)."""
    lc, lx = (t.detach().float() for t in ev.logits(fixed))
    a = torch.zeros((), requires_grad=True, device=lc.device)  # scale = exp(a) > 0
    b = torch.zeros((), requires_grad=True, device=lc.device)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        c2, x2 = _calibrated(lc, lx, ev.target, a.exp(), b)
        loss = pair_loss(c2, x2, ev.target, ev.alt).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach().exp()), float(b.detach())


def _held_out_and_train(task: Task, tokenizer, cfg: PruneConfig, ctx: int, test_b: Batch) -> tuple[Batch, Batch]:
    """(train pool, selection): disjoint from the test pairs and each other. Test and
    selection come first, so a task with few distinct prompts shrinks its train pool, never
    its held-out sets."""
    seen = frozenset(p.clean for p in test_b.pairs)
    select_b = encode(task, tokenizer, cfg.n_select, SELECT_SEED, ctx, exclude=seen)
    seen |= {p.clean for p in select_b.pairs}
    train_b = encode(task, tokenizer, cfg.n_train, TRAIN_SEED, ctx, exclude=seen, at_least=min(cfg.n_train, 8))
    return train_b, select_b


def verdict(loss: float, accuracy: float, target: float) -> str | None:
    """What a full model's held-out numbers say before pruning: ``chance`` (no better than a
    coin on accuracy, or a loss no better than chance's), ``model_misses_target``, or None
    (the model does the task: prune it)."""
    if accuracy < CHANCE_ACCURACY or loss >= CHANCE_LOSS:
        return "chance"
    if loss > target:
        return "model_misses_target"
    return None


def prune(model, task: Task, tokenizer, cfg: PruneConfig | None = None, pretrain_batches: list[torch.Tensor] | None = None,
          device="cpu", provenance: dict | None = None, ablate: dict[str, torch.Tensor] | None = None) -> Circuit:
    """The minimal verified circuit of ``model`` for ``task`` at ``cfg.target`` alone (see
    the module docstring; :func:`prune_targets` bisects several targets from one training)."""
    cfg = cfg or PruneConfig()
    return prune_targets(model, task, tokenizer, cfg.for_target(cfg.target), pretrain_batches, device, provenance, ablate)[0]


class _Selector:
    """Scores top-k circuits along a ranking on the held-out selection pairs (mean loss plus
    ``select_se`` standard errors), with each k's calibration fitted once."""

    def __init__(self, gates: Gates, select_ev: _Evaluator, cfg: PruneConfig):
        self.gates, self.ev, self.cfg = gates, select_ev, cfg
        self.ranking: list = []
        self.mean: dict[int, float] = {}  # k → mean selection loss
        self._bound: dict[int, float] = {}
        self._calib: dict[int, tuple[float, float]] = {}
        # The test-pair measurements of the top-k circuit (verification, controls): a second
        # target that lands on the same k (often: the circuit meets both) reuses them.
        self.measured: dict[tuple[str, int], object] = {}

    def rank(self, ranking: list) -> None:
        """Score along ``ranking`` from now on (k = 0, every node ablated, needs none)."""
        self.ranking = ranking
        for d in (self.mean, self._bound, self._calib):
            for k in [k for k in d if k]:
                del d[k]
        self.measured.clear()

    def calib(self, k: int, fixed) -> tuple[float, float] | None:
        if not self.cfg.calibrate:
            return None
        if k not in self._calib:
            self._calib[k] = _fit_calibration(self.ev, fixed)
        return self._calib[k]

    def bound(self, k: int) -> float:
        """Selection loss of the top-k circuit plus ``select_se`` standard errors: k must meet
        the target with that margin, since the smallest k that just meets it on these pairs
        is the one their noise favours most (a winner's curse on the test pairs)."""
        if k not in self._bound:
            fixed = self.gates.top_k_mask(self.ranking, k)
            losses = self.ev.losses(fixed, self.calib(k, fixed))
            self.mean[k] = float(losses.mean())
            se = float(losses.std()) / len(losses) ** 0.5 if len(losses) > 1 else 0.0
            self._bound[k] = self.mean[k] + self.cfg.select_se * se
        return self._bound[k]


# Stopping when the mask has converged (PruneConfig.stop_window > 0), judged at the points of
# the convergence record (every steps/20), never before the floor (2 points, the warmup, the
# window): over the last ``stop_window`` steps the open-gate count must stay within
# ``stop_open_tol`` of itself (at least one gate either way) and the smoothed task loss must
# move by at most STOP_LOSS_TOL (summed-loss units: a tenth of the 0.15 target). Chosen from 18
# rules by benchmarks/prune_early_stop.py on 24 (checkpoint, task) pairs of the demo's models
# whose full model meets 0.30, two seeds each (docs/pruning-speed.md): the fewest steps (0.78
# of 400 on average) with no verified circuit lost and circuits larger on average by less
# than two seeds differ (+0.9 nodes and +14 edges against a seed gap of 3.6 nodes and 68
# edges). A 5% tolerance, chosen on the first 15 pairs, grew them by +4.7 / +125.
STOP_LOSS_TOL = 0.015
STOP_SMOOTHING = 0.05  # the task loss's exponential moving average (each step's batch is fresh)


def converged(curve: list[list[float]], window: int, floor: int = 0, open_tol: float = PruneConfig.stop_open_tol,
              loss_tol: float = STOP_LOSS_TOL) -> bool:
    """Whether the masks have stopped moving, from the convergence record so far ([step, task
    loss, open gates, smoothed task loss], …): flat over the last ``window`` steps."""
    if window <= 0 or not curve or curve[-1][0] < max(floor, window):
        return False
    start = [i for i, p in enumerate(curve) if p[0] <= curve[-1][0] - window]
    if not start:
        return False
    span = curve[start[-1] :]  # the window, from the last point at or before its start
    opens = [p[2] for p in span]
    if max(opens) - min(opens) > max(1, round(open_tol * opens[-1])):
        return False
    return abs(span[-1][3] - span[0][3]) <= loss_tol


class _Clock:
    """Seconds spent in each named phase of one pruning run; a phase inside another is
    counted in its own name only."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds taken by phases inside it

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - t
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def json(self) -> str:
        return json.dumps({k: round(v, 3) for k, v in self.seconds.items()})


def _train_masks(model, gates: Gates, train_b: Batch, cfg: PruneConfig, dev, gen: torch.Generator, draw,
                 observe=None) -> tuple[list[list[float]], str]:
    """Train τ: task loss + k_coef · Σ H(τ), a fresh batch of train pairs every step, for
    ``cfg.steps`` or until :func:`converged` (with ``cfg.stop_window``).

    Returns the convergence record [[step, task loss, open gates, smoothed task loss], …]
    (about 20 points; the last is the final step) and why training stopped: ``converged`` or ``max_steps``.
    ``observe(step, record)``, if given, is called at each point of the record."""
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup_frac * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    every = max(1, cfg.steps // 20)
    floor = max(2 * every, warm)
    curve: list[list[float]] = []
    smooth = None
    for step in range(cfg.steps):
        if len(train_b) >= cfg.batch_pairs:
            idx = torch.randperm(len(train_b), generator=gen)[: cfg.batch_pairs]
        else:
            idx = torch.randint(0, len(train_b), (cfg.batch_pairs,), generator=gen)
        b = train_b.subset(idx)
        tokens, last = _joint(b)
        masks = gates.masks()
        cols = torch.stack([b.target, b.alt], 1).to(dev)
        lc, lx = _split(_answer_logits(model, gates, tokens.to(dev), last.to(dev), draw=draw(tokens.shape[0], gen), masks=masks, cols=cols))
        task_loss = pair_loss(lc, lx, *(t.expand(len(cols)).to(dev) for t in _TWO)).mean()
        loss = task_loss + cfg.k_coef * gates.l0(masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip_rms is not None:
            _clip_rms(gates.parameters(), cfg.grad_clip_rms)
        opt.step()
        sched.step()
        gates.clamp_and_sum()
        value = float(task_loss.detach())
        smooth = value if smooth is None else smooth + STOP_SMOOTHING * (value - smooth)
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            curve.append([step + 1, round(value, 5), gates.n_open(), round(smooth, 5)])
            if observe is not None:
                observe(step + 1, curve)
            if converged(curve, cfg.stop_window, floor, cfg.stop_open_tol, STOP_LOSS_TOL):
                return curve, "converged"
    return curve, "max_steps"


@torch.no_grad()
def _clip_rms(params: list[torch.Tensor], limit: float) -> None:
    """Scale the gradients of ``params`` so that their joint RMS is at most ``limit``."""
    grads = [p.grad for p in params if p.grad is not None]
    n = sum(g.numel() for g in grads)
    if not n:
        return
    rms = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads) / n))
    if rms > limit:
        for g in grads:
            g.mul_(limit / (rms + 1e-6))


def _choose_k(sel: _Selector, target: float, n_nodes: int, n_open: int) -> tuple[str, int]:
    """(status, k): the smallest k along the ranking whose selection bound meets ``target``.

    The loss along the ranking is not monotone (ablating a harmful node can help, so the
    trained mask may beat the whole model): probe a doubling grid plus the trained mask's
    own size, then bisect below the smallest probe that meets the target."""
    grid = sorted({0, n_open, n_nodes} | {2**i for i in range(n_nodes.bit_length()) if 2**i < n_nodes})
    probes = {k: sel.bound(k) for k in grid}
    meeting = [k for k in grid if probes[k] <= target]  # k = 0 is not among them: not trivial
    if not meeting:
        return "target_not_reached", min(grid, key=lambda k: (probes[k], k))  # the best circuit found, with its verdict
    lo = max(g for g in grid if g < meeting[0])  # fails the target
    hi = meeting[0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sel.bound(mid) <= target:
            hi = mid
        else:
            lo = mid
    return "ok", hi


# Controls of a verified circuit's sufficiency, on the test pairs (issue: a circuit barely
# better than any node set of its size explains little):
RANDOM_KEEP_DRAWS = 8  # random node sets of the circuit's size kept instead (and 8 more with its per-location counts)
# A circuit beats its random sets when the best of them is worse than the circuit by at
# least the target itself (the scale on which the run calls a loss good: a random set within
# one target of the circuit does nearly as well, as on a task the direct path mostly solves),
# and by more than two standard errors of the paired per-pair difference (not the pairs' noise).
PARTIAL_DRAWS = 16  # draws of partial ablation: each non-circuit node ablated with probability ½


def _mask_of(gates: Gates, picks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    m = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in gates.tau.items()}
    for n, idx in picks.items():
        if idx:
            m[n][torch.tensor(idx, device=m[n].device)] = 1.0
    return m


def _sufficiency_controls(gates: Gates, test_ev: _Evaluator, select_ev: _Evaluator, kept, cfg: PruneConfig,
                          calib, ablated_loss: float, circ: torch.Tensor, measured: dict | None = None) -> dict:
    """Random-keep baselines and partial ablation of one circuit, on the test pairs
    (``circ``: the circuit's own per-pair losses there; ``measured``: losses already taken
    for this circuit, keyed by its size, reused and added to).

    random_keep: the circuit's nodes swapped for as many random ones (uniform over all nodes,
    and with the circuit's count at every location), everything else ablated as for the
    circuit; partial ablation: the circuit kept and each other node ablated with probability
    ½ (complete ablation of the complement could reach a low loss through effects that
    cancel out; the circuit should still work when only some of them are ablated)."""
    counts = {n: int(m.sum()) for n, m in kept.items()}
    k = sum(counts.values())
    measured = {} if measured is None else measured
    if ("controls", k) not in measured:
        measured[("controls", k)] = _control_losses(gates, test_ev, select_ev, kept, cfg, calib, counts)
    scored, partial = measured[("controls", k)]
    means = {kind: [float(v.mean()) for kd, v in scored if kd == kind] for kind in ("any", "loc")}
    best = min(scored, key=lambda kv: float(kv[1].mean()))[1]
    diff = best - circ
    se = float(diff.std()) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
    suff, best_mean = float(circ.mean()), float(best.mean())
    recovered = (ablated_loss - best_mean) / (ablated_loss - suff) if ablated_loss > suff else None
    return {
        "random_keep_loss": sum(means["any"]) / len(means["any"]),
        "random_keep_loc_loss": sum(means["loc"]) / len(means["loc"]),
        "random_keep_best": best_mean,
        "random_keep_recovered": recovered,
        "beats_random_keep": bool(float(diff.mean()) >= cfg.target and float(diff.mean()) > 2 * se),
        "partial_ablation_loss": sum(partial) / len(partial),
        "partial_ablation_worst": max(partial),
    }


def _control_losses(gates: Gates, test_ev: _Evaluator, select_ev: _Evaluator, kept, cfg: PruneConfig, calib,
                    counts: dict[str, int]) -> tuple[list[tuple[str, torch.Tensor]], list[float]]:
    """The controls' draws scored: ([(kind, per-pair losses)] of the random node sets,
    [mean loss] of the partial ablations)."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    everything = gates.all_nodes()
    k = sum(counts.values())
    draws: list[tuple[str, torch.Tensor]] = []
    for _ in range(RANDOM_KEEP_DRAWS):
        pick: dict[str, list[int]] = {}
        for i in torch.randperm(len(everything), generator=gen)[:k].tolist():
            n, j = everything[i]
            pick.setdefault(n, []).append(j)
        draws.append(("any", _mask_of(gates, pick)))
    for _ in range(RANDOM_KEEP_DRAWS):
        pick = {n: torch.randperm(len(gates.tau[n]), generator=gen)[:c].tolist() for n, c in counts.items()}
        draws.append(("loc", _mask_of(gates, pick)))
    scored = []
    for kind, m in draws:
        cal = _fit_calibration(select_ev, m) if cfg.calibrate else None
        scored.append((kind, test_ev.losses(m, cal)))
    partial = []
    for _ in range(PARTIAL_DRAWS):
        m = {n: torch.maximum(v, (torch.rand(v.shape, generator=gen) < 0.5).float().to(v.device)) for n, v in kept.items()}
        partial.append(test_ev.loss(m, calib))
    return scored, partial


def _verify(model, gates: Gates, test_ev: _Evaluator, select_ev: _Evaluator, ranking, k: int, status: str,
            cfg: PruneConfig, calib, n_nodes: int, ablated_loss: float, clock: _Clock | None = None,
            measured: dict | None = None) -> tuple[str, dict, dict]:
    """Score the top-k circuit on the test pairs: sufficiency (only the circuit; its loss must
    meet the target for ``ok``), necessity (only the circuit ablated) beside as many random
    nodes ablated, and for a verified circuit its random-keep and partial-ablation controls.
    ``measured`` (:attr:`_Selector.measured`): what was already measured for this ranking's
    top-k circuit, for another target; reused and added to. Returns (status, kept mask, metrics)."""
    kept = gates.top_k_mask(ranking, k)
    measured = {} if measured is None else measured
    if ("verify", k) not in measured:
        measured[("verify", k)] = _verify_losses(gates, test_ev, kept, k, cfg, calib, n_nodes)
    circ, suff_acc, nec, rand = measured[("verify", k)]
    suff = float(circ.mean())
    if status == "ok" and suff > cfg.target:
        status = "not_verified"  # chosen on selection pairs, but misses the target on test pairs
    metrics = {
        "sufficiency_loss": suff,
        "sufficiency_accuracy": suff_acc,
        "necessity_loss": nec,
        "necessity_random_loss": float(sum(rand) / len(rand)) if rand else None,
        "ablated_loss": ablated_loss,
    }
    if status == "ok" and 0 < k < n_nodes:
        with (clock or _Clock()).phase("controls"):
            metrics.update(_sufficiency_controls(gates, test_ev, select_ev, kept, cfg, calib, ablated_loss, circ, measured))
    return status, kept, metrics


def _verify_losses(gates: Gates, test_ev: _Evaluator, kept, k: int, cfg: PruneConfig, calib,
                   n_nodes: int) -> tuple[torch.Tensor, float, float, list[float]]:
    """(the circuit's per-pair losses, its accuracy, the loss with it ablated, the losses with
    as many random nodes ablated) on the test pairs."""
    circ, acc = test_ev.scores(test_ev.logits(kept), calib)
    nec = test_ev.loss({n: 1.0 - m for n, m in kept.items()})
    everything = gates.all_nodes()
    base_gen = torch.Generator().manual_seed(cfg.seed + 2)
    rand = []
    for _ in range(RANDOM_BASELINE_DRAWS if 0 < k < n_nodes else 0):
        pick = [everything[i] for i in torch.randperm(n_nodes, generator=base_gen)[:k].tolist()]
        m = gates.top_k_mask(pick, k)
        rand.append(test_ev.loss({n: 1.0 - v for n, v in m.items()}))
    return circ, float(acc.mean()), nec, rand


def score_nodes(model, task: Task, tokenizer, nodes: Iterable[tuple[int, str, int]], cfg: PruneConfig | None = None,
                pretrain_batches: list[torch.Tensor] | None = None, device="cpu",
                ablate: dict[str, torch.Tensor] | None = None) -> dict:
    """Score a given node set as a circuit on ``task``'s test pairs, everything else ablated
    as ``cfg`` says: sufficiency, necessity (with its random baseline), the fully ablated
    model, and the sufficiency controls (random-keep baselines, partial ablation) that a
    verified circuit gets — for circuits from elsewhere, or node sets drawn by hand."""
    cfg = cfg or PruneConfig()
    dev = torch.device(device)
    model = model.to(dev).eval()
    ctx = model.config.block_size
    test_b = encode(task, tokenizer, cfg.n_test, TEST_SEED, ctx)
    select_b = encode(task, tokenizer, cfg.n_select, SELECT_SEED, ctx, exclude=frozenset(p.clean for p in test_b.pairs))
    length = max(b.shape[1] for b in (test_b.clean, test_b.corrupt, select_b.clean, select_b.corrupt))
    if ablate is None:
        ablate = ablation_values(model, cfg.ablation, pretrain_batches, length, dev)
    gates = Gates(model, {n: v.to(dev) for n, v in ablate.items()}, cfg.surrogate_temp)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    pool_n = next(iter(ablate.values())).shape[0] if gates.resample else 0

    def draw(n: int):
        return torch.randint(0, pool_n, (n,), generator=eval_gen).to(dev) if gates.resample else None

    test_ev = _Evaluator(model, gates, test_b, dev, draw(2 * len(test_b)))
    select_ev = _Evaluator(model, gates, select_b, dev, draw(2 * len(select_b)))
    picks: dict[str, list[int]] = {}
    for layer, loc, i in nodes:
        picks.setdefault(f"{layer}.{loc}", []).append(int(i))
    unknown = sorted(set(picks) - set(gates.names))
    if unknown:
        raise ConfigError(f"nodes at {', '.join(unknown)}: not node locations of this model ({gates.names[0]} … {gates.names[-1]})")
    picks = {n: sorted(set(idx)) for n, idx in picks.items()}
    for n, idx in picks.items():
        if idx[0] < 0 or idx[-1] >= len(gates.tau[n]):
            raise ConfigError(f"node index {idx[0] if idx[0] < 0 else idx[-1]} at {n}: out of range 0..{len(gates.tau[n]) - 1}")
    kept = _mask_of(gates, picks)
    k = int(sum(m.sum() for m in kept.values()))
    n_nodes = sum(t.numel() for t in gates.tau.values())
    calib = _fit_calibration(select_ev, kept) if cfg.calibrate else None
    zero = gates.top_k_mask([], 0)
    ablated = test_ev.loss(zero, _fit_calibration(select_ev, zero) if cfg.calibrate else None)
    ranking = [(n, i) for n, idx in picks.items() for i in idx]
    measured: dict = {}
    _, _, metrics = _verify(model, gates, test_ev, select_ev, ranking, k, "scored", cfg, calib, n_nodes, ablated, measured=measured)
    if 0 < k < n_nodes:
        circ = measured[("verify", k)][0]
        metrics.update(_sufficiency_controls(gates, test_ev, select_ev, kept, cfg, calib, ablated, circ, measured))
    return {"k": k, **metrics}


def prune_targets(model, task: Task, tokenizer, cfg: PruneConfig | None = None,
                  pretrain_batches: list[torch.Tensor] | None = None, device="cpu", provenance: dict | None = None,
                  ablate: dict[str, torch.Tensor] | None = None, observe=None) -> list[Circuit]:
    """The minimal verified circuit of ``model`` for ``task`` at each of ``cfg.targets``, in
    that order, from one training of the masks (see the module docstring).

    First the full model is scored on the test pairs: at a target the model is at chance
    for, or misses, that circuit is returned as the verdict with no nodes (it has nothing to
    explain) unless ``cfg.prune_anyway``. Each circuit is what a run at its target alone
    (:meth:`PruneConfig.for_target`) returns. ``ablate`` passes precomputed mean/zero values
    (e.g. cached node means) instead of computing them from ``pretrain_batches``.
    ``observe(step, record, circuits_now)``, for studies of mask training, is called at each
    point of the convergence record (the record so far); ``circuits_now()`` returns, for the targets pruned, the circuits
    that stopping at that step would give (training then goes on unchanged)."""
    t0 = time.perf_counter()
    clock = _Clock()
    cfg = cfg or PruneConfig()
    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = model.config.block_size
    test_b = encode(task, tokenizer, cfg.n_test, TEST_SEED, ctx)
    sizes = node_sizes(model.config)
    n_nodes = model.config.n_layer * sum(sizes.values())
    full_ev = _Evaluator(model, None, test_b, dev, None)
    full_losses, full_accs = full_ev.scores(full_ev.logits())
    full_loss, full_acc = float(full_losses.mean()), float(full_accs.mean())

    def prov(t: float) -> dict:
        c = cfg.for_target(t)
        return {"prune_config": asdict(c), "prune_key": c.key(), "task": task.name,
                "seeds": {"train": TRAIN_SEED, "select": SELECT_SEED, "test": TEST_SEED}, **(provenance or {})}

    def base(t: float) -> dict:
        return {"k": 0, "nodes_total": n_nodes, "target": t, "full_loss": full_loss, "full_accuracy": full_acc,
                "full_misses_target": full_loss > t}

    pre = {t: verdict(full_loss, full_acc, t) for t in cfg.targets}
    todo = [t for t in cfg.targets if pre[t] is None or cfg.prune_anyway]
    out: dict[float, Circuit] = {}
    for t in cfg.targets:
        if t not in todo:
            out[t] = Circuit(task.name, [], [], {**base(t), "status": pre[t], "prune_seconds": time.perf_counter() - t0}, prov(t))
    if not todo:
        return [out[t] for t in cfg.targets]
    train_b, select_b = _held_out_and_train(task, tokenizer, cfg, ctx, test_b)

    length = max(b.clean.shape[1] for b in (train_b, select_b, test_b))
    length = max(length, *(b.corrupt.shape[1] for b in (train_b, select_b, test_b)))
    if ablate is None:
        ablate = ablation_values(model, cfg.ablation, pretrain_batches, length, dev)
    ablate = {n: v.to(dev) for n, v in ablate.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    gates = Gates(model, ablate, cfg.surrogate_temp, cfg.init, cfg.init_noise, gen)
    pool_n = next(iter(ablate.values())).shape[0] if gates.resample else 0

    def draw(n: int, g: torch.Generator) -> torch.Tensor | None:
        return torch.randint(0, pool_n, (n,), generator=g).to(dev) if gates.resample else None

    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)  # fixed draws for held-out scoring
    test_ev = _Evaluator(model, gates, test_b, dev, draw(2 * len(test_b), eval_gen))
    select_ev = _Evaluator(model, gates, select_b, dev, draw(2 * len(select_b), eval_gen))
    sel = _Selector(gates, select_ev, cfg)
    # A target the fully ablated model already meets needs no circuit ("trivial"): that does
    # not depend on the masks, so it is checked first and no mask is trained unless another
    # target needs one.
    trivial = {t: sel.bound(0) <= t for t in todo}
    zero = gates.top_k_mask([], 0)
    ablated_loss = test_ev.loss(zero, sel.calib(0, zero))
    answers = sorted({int(t) for t in test_b.target} | {int(a) for a in test_b.alt})
    clock.seconds["setup"] = time.perf_counter() - t0  # pairs, ablation values, the full model's scores

    def circuits(curve: list, stopped: str | None) -> None:
        """Steps 2-4 from the masks as they are now: fills ``out``. ``stopped``: why mask
        training stopped (None: no mask was trained)."""
        n_open = gates.n_open() if stopped else None
        if stopped:
            sel.rank(gates.ranking())  # 2. rank nodes by τ
        ranking = sel.ranking
        for t in todo:
            tcfg = cfg.for_target(t)
            # 3. bisect k on held-out selection pairs, then 4. verify on test pairs
            with clock.phase("choose_k"):
                status, k = ("trivial", 0) if trivial[t] else _choose_k(sel, t, n_nodes, n_open)
                kept_f = gates.top_k_mask(ranking, k)
                calib = sel.calib(k, kept_f)
            with clock.phase("verify"):
                status, kept, checks = _verify(model, gates, test_ev, select_ev, ranking, k, status, tcfg, calib, n_nodes,
                                               ablated_loss, clock, sel.measured)
            with clock.phase("edges"):
                kept_bool = {n: m.bool().cpu() for n, m in kept.items()}
                nodes = [(int(n.split(".", 1)[0]), n.split(".", 1)[1], i) for n in gates.names for i in kept_bool[n].nonzero()[:, 0].tolist()]
                edges = edges_between(model.cpu(), kept_bool) if k else []
                aux = extra_edge_counts(model, kept_bool, answers)
                model.to(dev)
            metrics = {
                **base(t),
                "n_train_pairs": len(train_b),
                "status": status,
                "k": k,
                "n_open": None if trivial[t] else n_open,  # no mask trained for this target: None
                "selection_loss": sel.mean[k],  # every k the bisection can end on was scored
                **checks,
                "calibration_scale": calib[0] if calib else None,
                "calibration_shift": calib[1] if calib else None,
                "convergence": json.dumps([] if trivial[t] else curve),
                "mask_steps": curve[-1][0] if curve and not trivial[t] else None,
                "stop_reason": None if trivial[t] else stopped,
                "prune_seconds": time.perf_counter() - t0,
                "phase_seconds": clock.json(),  # so far: this target's row counts the phases before it
            }
            out[t] = Circuit(task.name, nodes, edges, metrics, prov(t), aux)

    if all(trivial.values()):
        circuits([], None)
    else:
        watch = None
        if observe is not None:  # a look at the circuits as they would be if training stopped here
            def watch(step, curve):
                def now() -> list[Circuit]:
                    circuits(list(curve), "observed")
                    return [out[t] for t in todo]
                observe(step, curve, now)
        with clock.phase("masks"):
            curve, stopped = _train_masks(model, gates, train_b, cfg, dev, gen, draw, watch)  # 1. train τ
        circuits(curve, stopped)
    return [out[t] for t in cfg.targets]
