"""Node pruning: the smallest set of nodes that still does a task (Gao et al. 2025 §3).

One gate τ per node (residual-read channels, q/k/v channels, MLP neurons, residual-write
channels, per layer). Through the hook points each node's activation becomes
``x·H(τ) + μ·(1 − H(τ))``: Heaviside forward, a sigmoid surrogate gradient backward, τ
clamped to [−1, 1]. μ is the node's ablation value: its mean over pretraining data (mean
ablation, the default), 0 (zero ablation), or the activation at a random pretraining
position (resample ablation). Training minimises task loss + k_coef·Σ H(τ) on train pairs;
then the nodes are ranked by τ and k is bisected for the smallest top-k circuit whose loss
on held-out selection pairs is ≤ target. The circuit is verified on test pairs (a third,
disjoint seed): sufficiency (only the circuit kept) and necessity (only the circuit
ablated). Optionally a scale and shift of the final answer logits are fitted per circuit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from sparsity.circuit import NODE_LOCATIONS, Circuit, edges_between, node_sizes
from sparsity.errors import ConfigError
from sparsity.tasks.base import TEST_SEED, TRAIN_SEED, Batch, Task, encode, pair_accuracy, pair_loss

ABLATIONS = ("mean", "zero", "resample")
SELECT_SEED = TRAIN_SEED + 1  # held-out pairs for choosing k: neither train nor test


@dataclass(frozen=True)
class PruneConfig:
    """Hyperparameters of one pruning run (defaults tuned on the demo-size model)."""

    target: float = 0.15  # DESIGN.md: the circuit's task loss must be ≤ this
    ablation: str = "mean"
    k_coef: float = 1e-4  # weight of Σ H(τ); ~1500 nodes × 1e-4 ≈ the task loss scale
    steps: int = 300  # Adam steps on τ
    lr: float = 0.05
    surrogate_temp: float = 0.25  # backward of H(τ) is σ'(τ/temp)/temp
    n_train: int = 64  # contrast pairs for training τ
    n_select: int = 64  # held-out pairs for bisecting k
    n_test: int = 64  # held-out pairs for verification
    calibrate: bool = False  # fit a scale and shift on the answer logits per circuit
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ConfigError(f"{name}={getattr(self, name)!r} out of range: {allowed}")

        if not self.target > 0:
            bad("target", "must be > 0")
        if self.ablation not in ABLATIONS:
            bad("ablation", f"choose one of {', '.join(ABLATIONS)}")
        if self.k_coef < 0:
            bad("k_coef", "must be ≥ 0")
        for name in ("steps", "n_train", "n_select", "n_test"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                bad(name, "must be an integer ≥ 1")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not self.surrogate_temp > 0:
            bad("surrogate_temp", "must be > 0")


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
    """Each node's mean activation over pretraining data: {hook name: (width,)}."""
    names = node_names(model.config)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for x in batches:
        x = x.to(device)
        with model.hooks.record(names) as cache:
            model(x[:, :-1] if x.shape[1] > model.config.block_size else x)
        for n in names:
            s = cache[n].double().sum(dim=(0, 1))
            sums[n] = sums[n] + s if n in sums else s
        count += cache[names[0]].shape[0] * cache[names[0]].shape[1]
    if count == 0:
        raise ConfigError("node_means needs at least one batch of pretraining data")
    return {n: (s / count).float() for n, s in sums.items()}


@torch.no_grad()
def resample_pool(model, batches: Iterable[torch.Tensor], n: int = 512, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """``n`` activation vectors per node location from random pretraining positions: {name: (n, width)}."""
    names = node_names(model.config)
    g = torch.Generator().manual_seed(seed)
    x = torch.cat(list(batches)).to(device)
    x = x[:, : model.config.block_size]
    with model.hooks.record(names) as cache:
        model(x)
    B, T = x.shape
    rows, cols = torch.randint(0, B, (n,), generator=g), torch.randint(0, T, (n,), generator=g)
    return {name: cache[name][rows, cols] for name in names}


class Gates:
    """The τ parameters of one model and the hook replacements that apply them."""

    def __init__(self, model, ablate: dict[str, torch.Tensor], temp: float, init: float = 1.0):
        self.model, self.temp = model, temp
        self.names = node_names(model.config)
        dev = next(model.parameters()).device
        sizes = node_sizes(model.config)
        self.tau = {n: torch.full((sizes[n.split(".", 1)[1]],), init, device=dev, requires_grad=True) for n in self.names}
        self.ablate = ablate  # {name: (width,) or (B, width)}
        self.fixed: dict[str, torch.Tensor] | None = None  # a fixed 0/1 mask overrides τ
        # Running sum of τ over training: breaks ties between nodes clamped at the same τ
        # (a node that held on longer ranks higher).
        self.tau_sum = {n: torch.zeros_like(t, requires_grad=False) for n, t in self.tau.items()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tau.values())

    def mask(self, name: str) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed[name]
        return heaviside(self.tau[name], self.temp)

    def _fn(self, name: str):
        def apply(x: torch.Tensor) -> torch.Tensor:  # x: (B, T, width)
            g = self.mask(name)
            mu = self.ablate[name]
            if mu.dim() == 2:  # resample: one vector per example, broadcast over positions
                mu = mu[: x.shape[0], None, :]
            return x * g + mu * (1 - g)

        return apply

    @contextlib.contextmanager
    def active(self, fixed: dict[str, torch.Tensor] | None = None):
        """Run the model with gates applied (τ's Heaviside, or a fixed 0/1 mask)."""
        self.fixed = fixed
        try:
            with self.model.hooks.replace({n: self._fn(n) for n in self.names}):
                yield
        finally:
            self.fixed = None

    def l0(self) -> torch.Tensor:
        return sum(heaviside(t, self.temp).sum() for t in self.tau.values())

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


def ablation_values(model, ablation: str, batches: list[torch.Tensor] | None, n_examples: int, seed: int, device="cpu") -> dict[str, torch.Tensor]:
    """μ for every node location under the chosen ablation."""
    sizes = node_sizes(model.config)
    if ablation == "zero":
        return {n: torch.zeros(sizes[n.split(".", 1)[1]], device=device) for n in node_names(model.config)}
    if not batches:
        raise ConfigError(f"ablation={ablation!r} needs pretraining batches (mean/resample are taken over pretraining data)")
    if ablation == "mean":
        return node_means(model, batches, device)
    pool = resample_pool(model, batches, n=max(512, n_examples), seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, next(iter(pool.values())).shape[0], (n_examples,), generator=g)
    return {n: v[pick] for n, v in pool.items()}


@dataclass
class _Evaluator:
    model: object
    gates: Gates
    batch: Batch
    device: torch.device

    @torch.no_grad()
    def logits(self, fixed=None):
        c, x = self.batch.clean.to(self.device), self.batch.corrupt.to(self.device)
        with self.gates.active(fixed) if fixed is not None else contextlib.nullcontext():
            return self.model(c, last_only=True)[:, -1], self.model(x, last_only=True)[:, -1]

    def loss(self, fixed=None, calib=None) -> float:
        lc, lx = self.logits(fixed)
        if calib is not None:
            lc, lx = _calibrated(lc, lx, self.batch, *calib)
        return float(pair_loss(lc, lx, self.batch.target.to(self.device), self.batch.alt.to(self.device)).mean())

    def accuracy(self, fixed=None) -> float:
        lc, lx = self.logits(fixed)
        return float(pair_accuracy(lc, lx, self.batch.target.to(self.device), self.batch.alt.to(self.device)).mean())


def _calibrated(lc, lx, batch, scale, shift):
    """Scale the answer logits and shift the target's (the binary choice sees a·d + b)."""
    out = []
    for lg in (lc, lx):
        lg = lg * scale
        lg = lg.scatter_add(1, batch.target.to(lg.device)[:, None], torch.zeros_like(lg[:, :1]) + shift)
        out.append(lg)
    return out


def _fit_calibration(ev: _Evaluator, fixed) -> tuple[float, float]:
    lc, lx = ev.logits(fixed)
    a = torch.zeros((), requires_grad=True)  # scale = exp(a) > 0
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.1)
    t, al = ev.batch.target.to(lc.device), ev.batch.alt.to(lc.device)
    for _ in range(100):
        c2, x2 = _calibrated(lc, lx, ev.batch, a.exp(), b)
        loss = pair_loss(c2, x2, t, al).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(a.detach().exp()), float(b.detach())


def prune(model, task: Task, tokenizer, cfg: PruneConfig | None = None, pretrain_batches: list[torch.Tensor] | None = None,
          device="cpu", provenance: dict | None = None, ablate: dict[str, torch.Tensor] | None = None) -> Circuit:
    """The minimal verified circuit of ``model`` for ``task`` (see the module docstring).

    ``ablate`` passes precomputed ablation values (e.g. cached node means) instead of
    computing them from ``pretrain_batches``."""
    t0 = time.perf_counter()
    cfg = cfg or PruneConfig()
    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = model.config.block_size
    train_b = encode(task, tokenizer, cfg.n_train, TRAIN_SEED, ctx)
    seen = frozenset(p.clean for p in train_b.pairs)
    select_b = encode(task, tokenizer, cfg.n_select, SELECT_SEED, ctx, exclude=seen)
    test_b = encode(task, tokenizer, cfg.n_test, TEST_SEED, ctx, exclude=seen | {p.clean for p in select_b.pairs})
    n_max = max(cfg.n_train, cfg.n_select, cfg.n_test)
    if ablate is None:
        ablate = ablation_values(model, cfg.ablation, pretrain_batches, n_max, cfg.seed, dev)
    ablate = {n: v.to(dev) for n, v in ablate.items()}
    torch.manual_seed(cfg.seed)
    gates = Gates(model, ablate, cfg.surrogate_temp)
    names = gates.names
    n_nodes = sum(t.numel() for t in gates.tau.values())

    test_ev = _Evaluator(model, gates, test_b, dev)
    select_ev = _Evaluator(model, gates, select_b, dev)
    full_loss, full_acc = test_ev.loss(), test_ev.accuracy()

    # 1. train τ: task loss + k_coef · Σ H(τ)
    opt = torch.optim.Adam(gates.parameters(), lr=cfg.lr)
    c, x = train_b.clean.to(dev), train_b.corrupt.to(dev)
    tgt, alt = train_b.target.to(dev), train_b.alt.to(dev)
    for _ in range(cfg.steps):
        with gates.active():
            task_loss = pair_loss(model(c, last_only=True)[:, -1], model(x, last_only=True)[:, -1], tgt, alt).mean()
        loss = task_loss + cfg.k_coef * gates.l0()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, t in gates.tau.items():
                t.clamp_(-1.0, 1.0)
                gates.tau_sum[n] += t

    # 2. rank nodes by τ and bisect k on held-out selection pairs
    ranking = gates.ranking()
    calib_cache: dict[int, tuple[float, float]] = {}

    def sel_loss(k: int) -> float:
        fixed = gates.top_k_mask(ranking, k)
        calib = None
        if cfg.calibrate:
            calib = calib_cache.setdefault(k, _fit_calibration(select_ev, fixed))
        return select_ev.loss(fixed, calib)

    # The loss along the ranking is not monotone (ablating a harmful node can help, so the
    # trained mask may beat the whole model): probe a doubling grid plus the trained mask's
    # own size, then bisect below the smallest probe that meets the target.
    n_open = sum(int((t.detach() > 0).sum()) for t in gates.tau.values())
    grid = sorted({0, n_open, n_nodes} | {2**i for i in range(n_nodes.bit_length()) if 2**i < n_nodes})
    probes = {k: sel_loss(k) for k in grid}
    meeting = [k for k in grid if probes[k] <= cfg.target]
    if not meeting:
        status = "target_not_reached"
        k = min(grid, key=lambda k: (probes[k], k))  # keep the best circuit found, with its verdict
    elif meeting[0] == 0:
        status, k = "trivial", 0  # the fully ablated model already meets the target
    else:
        status = "ok"
        lo = max(g for g in grid if g < meeting[0])  # fails the target
        hi = meeting[0]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sel_loss(mid) <= cfg.target:
                hi = mid
            else:
                lo = mid
        k = hi
    kept = gates.top_k_mask(ranking, k)
    calib = calib_cache.get(k) if cfg.calibrate else None

    # 3. verify on test pairs: sufficiency (only the circuit) and necessity (circuit ablated)
    suff = test_ev.loss(kept, calib)
    suff_acc = test_ev.accuracy(kept)
    ablated = {n: 1.0 - m for n, m in kept.items()}
    nec = test_ev.loss(ablated)
    kept_bool = {n: m.bool().cpu() for n, m in kept.items()}
    nodes = [(int(n.split(".", 1)[0]), n.split(".", 1)[1], i) for n in names for i in kept_bool[n].nonzero()[:, 0].tolist()]
    edges = edges_between(model.cpu(), kept_bool) if k else []
    model.to(dev)
    metrics = {
        "status": status,
        "k": k,
        "nodes_total": n_nodes,
        "target": cfg.target,
        "full_loss": full_loss,
        "full_accuracy": full_acc,
        "full_misses_target": full_loss > cfg.target,
        "sufficiency_loss": suff,
        "sufficiency_accuracy": suff_acc,
        "necessity_loss": nec,
        "calibration_scale": calib[0] if calib else None,
        "calibration_shift": calib[1] if calib else None,
        "prune_seconds": time.perf_counter() - t0,
    }
    prov = {"prune_config": asdict(cfg), "task": task.name, "seeds": {"train": TRAIN_SEED, "select": SELECT_SEED, "test": TEST_SEED}}
    prov.update(provenance or {})
    return Circuit(task.name, nodes, edges, metrics, prov)
