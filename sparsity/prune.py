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

This module trains the masks and runs a pair end to end; the gates are in
sparsity/gates.py, and the scoring of fixed masks on held-out pairs (choosing k,
verification, controls) in sparsity/scoring.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch

from sparsity.allocator import keep_freed_memory
from sparsity.circuit import Circuit, edges_between, extra_edge_counts, node_sizes
from sparsity.config import ABLATIONS, PruneConfig  # noqa: F401  (re-exported: the pruning config lives with the others)
from sparsity.errors import ConfigError
from sparsity.gates import (  # noqa: F401  (heaviside, node_means, node_names, resample_pool: re-exported)
    Gates,
    ablation_values,
    heaviside,
    node_means,
    node_names,
    resample_pool,
)
from sparsity.scoring import (
    ANSWER_COLS,
    Clock,
    Evaluator,
    Selector,
    answer_logits,
    choose_k,
    fit_calibration,
    joint,
    mask_of,
    split_pairs,
    sufficiency_controls,
    verify,
)
from sparsity.tasks.base import CHANCE_LOSS, TEST_SEED, TRAIN_SEED, Task
from sparsity.tasks.tensors import Batch, encode, pair_loss

SELECT_SEED = TRAIN_SEED + 1  # held-out pairs for choosing k: neither train nor test
# Below this held-out accuracy a model is at chance on a task (64 pairs × 2 prompts: one
# standard error of a coin is ~0.044, so 0.6 is > 2 SE above 0.5).
CHANCE_ACCURACY = 0.6


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
        tokens, last = joint(b)
        masks = gates.masks()
        cols = torch.stack([b.target, b.alt], 1).to(dev)
        lc, lx = split_pairs(answer_logits(model, gates, tokens.to(dev), last.to(dev), draw=draw(tokens.shape[0], gen), masks=masks, cols=cols))
        task_loss = pair_loss(lc, lx, *(t.expand(len(cols)).to(dev) for t in ANSWER_COLS)).mean()
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


def score_nodes(model, task: Task, tokenizer, nodes: Iterable[tuple[int, str, int]], cfg: PruneConfig | None = None,
                pretrain_batches: list[torch.Tensor] | None = None, device="cpu",
                ablate: dict[str, torch.Tensor] | None = None) -> dict:
    """Score a given node set as a circuit on ``task``'s test pairs, everything else ablated
    as ``cfg`` says: sufficiency, necessity (with its random baseline), the fully ablated
    model, and the sufficiency controls (random-keep baselines, partial ablation) that a
    verified circuit gets — for circuits from elsewhere, or node sets drawn by hand."""
    keep_freed_memory()
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

    test_ev = Evaluator(model, gates, test_b, dev, draw(2 * len(test_b)))
    select_ev = Evaluator(model, gates, select_b, dev, draw(2 * len(select_b)))
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
    kept = mask_of(gates, picks)
    k = int(sum(m.sum() for m in kept.values()))
    n_nodes = sum(t.numel() for t in gates.tau.values())
    calib = fit_calibration(select_ev, kept) if cfg.calibrate else None
    zero = gates.top_k_mask([], 0)
    ablated = test_ev.loss(zero, fit_calibration(select_ev, zero) if cfg.calibrate else None)
    ranking = [(n, i) for n, idx in picks.items() for i in idx]
    measured: dict = {}
    _, _, metrics = verify(model, gates, test_ev, select_ev, ranking, k, "scored", cfg, calib, n_nodes, ablated, measured=measured)
    if 0 < k < n_nodes:
        circ = measured[("verify", k)][0]
        metrics.update(sufficiency_controls(gates, test_ev, select_ev, kept, cfg, calib, ablated, circ, measured))
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
    keep_freed_memory()  # a mask step's activations, freed and allocated again, stay mapped
    clock = Clock()
    cfg = cfg or PruneConfig()
    dev = torch.device(device)
    model = model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = model.config.block_size
    test_b = encode(task, tokenizer, cfg.n_test, TEST_SEED, ctx)
    sizes = node_sizes(model.config)
    n_nodes = model.config.n_layer * sum(sizes.values())
    full_ev = Evaluator(model, None, test_b, dev, None)
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
    test_ev = Evaluator(model, gates, test_b, dev, draw(2 * len(test_b), eval_gen))
    select_ev = Evaluator(model, gates, select_b, dev, draw(2 * len(select_b), eval_gen))
    sel = Selector(gates, select_ev, cfg)
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
                status, k = ("trivial", 0) if trivial[t] else choose_k(sel, t, n_nodes, n_open)
                kept_f = gates.top_k_mask(ranking, k)
                calib = sel.calib(k, kept_f)
            with clock.phase("verify"):
                status, kept, checks = verify(model, gates, test_ev, select_ev, ranking, k, status, tcfg, calib, n_nodes,
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
