"""Scoring circuits on fixed sets of task pairs: the answer logits of a batch under the
gates, the held-out evaluators, choosing k along a ranking of the nodes, verification on the
test pairs and the controls of a verified circuit (Gao et al. 2025, appendix "Pruning
algorithm"; csp's controls: docs/circuits.md). sparsity/prune.py calls these after training
the masks, and for a node set given by hand (``score_nodes``).
"""

from __future__ import annotations

import contextlib
import json
import time

import torch

from sparsity.config import PruneConfig
from sparsity.gates import Gates
from sparsity.tasks.tensors import Batch, pair_accuracy, pair_loss


class Clock:
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


RANDOM_BASELINE_DRAWS = 5  # random node sets ablated for the necessity baseline


def joint(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupt prompts as one (2n, T) batch and their answer positions (2n,)."""
    T = max(b.clean.shape[1], b.corrupt.shape[1])

    def pad(t):  # after each prompt's last token, where causal attention never looks back
        return torch.nn.functional.pad(t, (0, T - t.shape[1]))

    return torch.cat([pad(b.clean), pad(b.corrupt)]), torch.cat([b.clean_last, b.corrupt_last])


BUCKETS = 4  # a batch runs as this many length buckets, each trimmed to its own longest prompt
# ... and in buckets of about this many pairs when corrupt prompts share their clean twin's
# prefix. Those run packed (GPT.read_pairs: every position-wise op skips the padding), so
# padding costs only in attention's mixing, and each bucket is two passes whose op overhead
# is paid again: on the demo's d128 model, 2 cores, a mask step (64 pairs) in one bucket
# took 0.75-1.04 (mean 0.90) of the unpacked step in two, over 9 tasks, and a verification
# forward (128 pairs) in two buckets 0.76-1.02 (mean 0.89) (docs/pruning-speed.md)
PAIRS_PER_BUCKET = 64


def answer_logits(model, gates: Gates | None, tokens: torch.Tensor, last: torch.Tensor, fixed=None,
                   draw: torch.Tensor | None = None, masks: dict[str, torch.Tensor] | None = None,
                   cols: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits at each row's answer position, with gates applied (``gates`` None: the
    full model; ``masks``: this training step's H(τ)); with ``cols`` (B/2, K), the token ids
    each pair reads (its answer and the alternative), only those: (B, K). Rows run in length buckets, each
    trimmed to its own longest prompt, so short prompts do not pay for the long ones' padding
    (~30% of a step on the demo tasks); causal attention makes the result the same as one
    padded forward. The gates' masks are computed once for all buckets.

    ``tokens`` is a joint batch (clean prompts, then their corrupt twins: :func:`joint`).
    Under a fixed ablation (no ``draw``) each corrupt prompt runs only from where it departs
    from its clean twin, reading the twin's keys and values before that
    (``GPT.read_pairs``): the same logits for about a quarter fewer FLOPs (docs/pruning-speed.md)."""
    ctx = gates.active(fixed, draw, masks) if gates is not None else contextlib.nullcontext()
    n = tokens.shape[0] // 2
    with ctx:
        if draw is None and getattr(model, "share_prefixes", False) and model.read_positions_only and not model.hooks.recording and n:
            return paired_logits(model, tokens[:n], last[:n], tokens[n:], last[n:], cols)
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


def paired_logits(model, a, last_a, b, last_b, cols=None) -> torch.Tensor:
    """Logits of the joint batch (a; b) with each b row sharing its prefix with its a row,
    in length buckets of the pairs (``cols``: only those, as the unembedding of just the
    answer and the alternative)."""
    start = shared_prefix(a, b, last_a, last_b)
    order = torch.argsort(last_a, stable=True)
    pa, pb = [], []
    for idx in order.chunk(max(1, round(len(order) / PAIRS_PER_BUCKET))):
        ya, yb = model.read_pairs(a[idx], last_a[idx], b[idx], last_b[idx], start[idx], None if cols is None else cols[idx])
        pa.append(ya)
        pb.append(yb)
    back = torch.argsort(order)
    return torch.cat([torch.cat(pa)[back], torch.cat(pb)[back]])


ANSWER_COLS = (torch.tensor([0]), torch.tensor([1]))  # the answer's and the alternative's column in logits read with ``cols``


def split_pairs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = logits.shape[0] // 2
    return logits[:n], logits[n:]


class Evaluator:
    """One fixed set of pairs, scored under fixed masks (or no gates: the full model)."""

    def __init__(self, model, gates: Gates | None, batch: Batch, device, draw: torch.Tensor | None):
        self.model, self.gates, self.batch = model, gates, batch
        tokens, last = joint(batch)
        self.tokens, self.last = tokens.to(device), last.to(device)
        # the logits it scores are each pair's answer and alternative only: columns 0 and 1
        self.cols = torch.stack([batch.target, batch.alt], 1).to(device)
        self.target, self.alt = ANSWER_COLS[0].expand(len(batch.target)).to(device), ANSWER_COLS[1].expand(len(batch.target)).to(device)
        self.draw = draw

    @torch.no_grad()
    def logits(self, fixed=None) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.gates if fixed is not None else None
        return split_pairs(answer_logits(self.model, gates, self.tokens, self.last, fixed, self.draw, cols=self.cols))

    def scores(self, logits: tuple[torch.Tensor, torch.Tensor], calib=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses, per-pair accuracy) of logits from :meth:`logits`."""
        lc, lx = logits
        if calib is not None:
            lc, lx = calibrated(lc, lx, self.target, *calib)
        return pair_loss(lc, lx, self.target, self.alt), pair_accuracy(lc, lx, self.target, self.alt)

    def losses(self, fixed=None, calib=None) -> torch.Tensor:
        return self.scores(self.logits(fixed), calib)[0]

    def loss(self, fixed=None, calib=None) -> float:
        return float(self.losses(fixed, calib).mean())

    def accuracy(self, fixed=None, calib=None) -> float:
        return float(self.scores(self.logits(fixed), calib)[1].mean())


def calibrated(lc, lx, target, scale, shift):
    """Scale the answer logits and shift the target's (the binary choice sees a·d + b)."""
    out = []
    for lg in (lc, lx):
        lg = lg * scale
        lg = lg.scatter_add(1, target[:, None], torch.zeros_like(lg[:, :1]) + shift)
        out.append(lg)
    return out


def fit_calibration(ev: Evaluator, fixed) -> tuple[float, float]:
    """Scale and shift of the final logits by 16 LBFGS steps (the paper's mask-discretization
    calibration)."""
    lc, lx = (t.detach().float() for t in ev.logits(fixed))
    a = torch.zeros((), requires_grad=True, device=lc.device)  # scale = exp(a) > 0
    b = torch.zeros((), requires_grad=True, device=lc.device)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        c2, x2 = calibrated(lc, lx, ev.target, a.exp(), b)
        loss = pair_loss(c2, x2, ev.target, ev.alt).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(a.detach().exp()), float(b.detach())



class Selector:
    """Scores top-k circuits along a ranking on the held-out selection pairs (mean loss plus
    ``select_se`` standard errors), with each k's calibration fitted once."""

    def __init__(self, gates: Gates, select_ev: Evaluator, cfg: PruneConfig):
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
            self._calib[k] = fit_calibration(self.ev, fixed)
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


def choose_k(sel: Selector, target: float, n_nodes: int, n_open: int) -> tuple[str, int]:
    """(status, k): the smallest k along the ranking whose selection bound meets ``target``.

    The loss along the ranking is not monotone (ablating a harmful node can help, so the
    trained mask may beat the whole model): probe a doubling grid plus the trained mask's
    own size, then bisect below the smallest probe that meets the target. The probes run
    smallest first and stop at the first that meets it: the larger ones cannot change k."""
    grid = sorted({0, n_open, n_nodes} | {2**i for i in range(n_nodes.bit_length()) if 2**i < n_nodes})
    probes: dict[int, float] = {}
    for k in grid:
        probes[k] = sel.bound(k)
        if k and probes[k] <= target:  # k = 0 meeting it is a trivial target, decided before
            break
    else:
        return "target_not_reached", min(grid, key=lambda k: (probes[k], k))  # the best circuit found, with its verdict
    hi = k
    lo = max(g for g in grid if g < hi)  # fails the target
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


def mask_of(gates: Gates, picks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    m = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in gates.tau.items()}
    for n, idx in picks.items():
        if idx:
            m[n][torch.tensor(idx, device=m[n].device)] = 1.0
    return m


def sufficiency_controls(gates: Gates, test_ev: Evaluator, select_ev: Evaluator, kept, cfg: PruneConfig,
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
        measured[("controls", k)] = control_losses(gates, test_ev, select_ev, kept, cfg, calib, counts)
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


def control_losses(gates: Gates, test_ev: Evaluator, select_ev: Evaluator, kept, cfg: PruneConfig, calib,
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
        draws.append(("any", mask_of(gates, pick)))
    for _ in range(RANDOM_KEEP_DRAWS):
        pick = {n: torch.randperm(len(gates.tau[n]), generator=gen)[:c].tolist() for n, c in counts.items()}
        draws.append(("loc", mask_of(gates, pick)))
    scored = []
    for kind, m in draws:
        cal = fit_calibration(select_ev, m) if cfg.calibrate else None
        scored.append((kind, test_ev.losses(m, cal)))
    partial = []
    for _ in range(PARTIAL_DRAWS):
        m = {n: torch.maximum(v, (torch.rand(v.shape, generator=gen) < 0.5).float().to(v.device)) for n, v in kept.items()}
        partial.append(test_ev.loss(m, calib))
    return scored, partial


def verify(model, gates: Gates, test_ev: Evaluator, select_ev: Evaluator, ranking, k: int, status: str,
            cfg: PruneConfig, calib, n_nodes: int, ablated_loss: float, clock: Clock | None = None,
            measured: dict | None = None) -> tuple[str, dict, dict]:
    """Score the top-k circuit on the test pairs: sufficiency (only the circuit; its loss must
    meet the target for ``ok``), necessity (only the circuit ablated) beside as many random
    nodes ablated, and for a verified circuit its random-keep and partial-ablation controls.
    ``measured`` (:attr:`Selector.measured`): what was already measured for this ranking's
    top-k circuit, for another target; reused and added to. Returns (status, kept mask, metrics)."""
    kept = gates.top_k_mask(ranking, k)
    measured = {} if measured is None else measured
    if ("verify", k) not in measured:
        measured[("verify", k)] = verify_losses(gates, test_ev, kept, k, cfg, calib, n_nodes)
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
        with (clock or Clock()).phase("controls"):
            metrics.update(sufficiency_controls(gates, test_ev, select_ev, kept, cfg, calib, ablated_loss, circ, measured))
    return status, kept, metrics


def verify_losses(gates: Gates, test_ev: Evaluator, kept, k: int, cfg: PruneConfig, calib,
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
