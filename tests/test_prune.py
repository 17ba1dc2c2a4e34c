import random

import pytest
import torch

from sparsity import prune as prune_lib
from sparsity.circuit import NODE_LOCATIONS, Circuit, edges_between
from sparsity.config import ModelConfig
from sparsity.model import GPT
from sparsity.tasks.base import Pair, Task


def _quote_task():
    names = ["name", "path", "value", "key", "label", "title", "text", "word"]
    words = ["hello", "data", "spam", "eggs", "alpha", "beta", "user", "item", "main", "test"]

    def make(rng: random.Random) -> Pair:
        var, w = rng.choice(names), rng.choice(words)
        return Pair(f"{var} = '{w}", f'{var} = "{w}', "'\n", '"\n')

    return Task("mini_quote", "single vs double quote", make)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=2048, block_size=32, n_layer=2, d_model=32, n_head=2, d_head=8, d_mlp=64, afrac=0.5)
    cfg.update(kw)
    m = GPT(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand_like(p) < 0.3)  # sparse weights, so edges are a strict subset
    return m


def _pretrain(rows, n=4, b=8, t=32):
    return [torch.from_numpy(rows[i * b : (i + 1) * b, :t].astype("int64")) for i in range(n)]


def _gates(model, rows):
    mu = prune_lib.ablation_values(model, "mean", _pretrain(rows), 32)
    return prune_lib.Gates(model, mu, 1.0), mu


def test_all_gates_open_reproduces_the_model_exactly(stdlib_rows):
    """With every gate open the pruned model's logits equal the unpruned model's, bit for bit."""
    model = _model()
    gates, _ = _gates(model, stdlib_rows[0])
    idx = torch.from_numpy(stdlib_rows[1][:4, :32].astype("int64"))
    with torch.no_grad():
        base = model(idx)
        with gates.active():
            gated = model(idx)
    assert torch.equal(gated, base)


def test_all_gates_closed_equals_the_fully_mean_ablated_model(stdlib_rows):
    """With every gate closed the logits equal replacing every node location by its mean."""
    model = _model()
    gates, mu = _gates(model, stdlib_rows[0])
    for t in gates.tau.values():
        t.data.fill_(-1.0)
    idx = torch.from_numpy(stdlib_rows[1][:4, :32].astype("int64"))
    with torch.no_grad():
        with gates.active():
            closed = model(idx)
        with model.hooks.replace({n: (lambda v: (lambda x: v.expand_as(x).clone()))(mu[n]) for n in mu}):
            ablated = model(idx)
    assert torch.equal(closed, ablated)
    assert not torch.allclose(closed, model(idx))


def test_edges_are_exactly_the_nonzero_weights_among_kept_nodes():
    """Recompute edges from the weight matrices for a random kept set and compare."""
    model = _model()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    from sparsity.circuit import node_sizes

    sizes = node_sizes(cfg)
    kept = {f"{layer}.{loc}": torch.rand(sizes[loc], generator=g) < 0.4 for layer in range(2) for loc in NODE_LOCATIONS}
    got = {(e["src"], e["dst"], e["kind"]) for e in edges_between(model, kept) if e["kind"] != "resid"}
    want = set()
    a = cfg.d_attn
    for layer, blk in enumerate(model.transformer.h):
        Wqkv = blk.attn.c_attn.weight
        mats = [
            ("attn.q", Wqkv[:a], "attn.act_in", "attn.q"),
            ("attn.k", Wqkv[a : 2 * a], "attn.act_in", "attn.k"),
            ("attn.v", Wqkv[2 * a :], "attn.act_in", "attn.v"),
            ("attn.out", blk.attn.c_proj.weight, "attn.v", "attn.resid_delta"),
            ("mlp.in", blk.mlp.c_fc.weight, "mlp.act_in", "mlp.post_act"),
            ("mlp.out", blk.mlp.c_proj.weight, "mlp.post_act", "mlp.resid_delta"),
        ]
        for kind, W, src, dst in mats:
            for i in range(W.shape[0]):
                for j in range(W.shape[1]):
                    if W[i, j] != 0 and kept[f"{layer}.{src}"][j] and kept[f"{layer}.{dst}"][i]:
                        want.add(((layer, src, j), (layer, dst, i), kind))
    assert got == want and len(want) > 50


def test_prune_returns_a_verified_circuit_and_rows_round_trip(stdlib_rows, stdlib_tokenizer):
    """A pruning run yields nodes, edges, losses on held-out pairs, and survives to_rows/from_rows."""
    model = _model(block_size=32)
    task, pre = _quote_task(), _pretrain(stdlib_rows[0])
    small = dict(n_train=16, n_select=16, n_test=16, batch_pairs=8, prune_anyway=True)
    probe = prune_lib.prune(model, task, stdlib_tokenizer, prune_lib.PruneConfig(steps=50, target=100.0, **small), pre)
    assert probe.metrics["status"] == "trivial" and probe.nodes == []  # any loss ≤ 100: nothing is needed
    # ... found before any mask is trained: no training curve, no gate counted open
    assert probe.metrics["convergence"] == "[]" and probe.metrics["n_open"] is None
    target = probe.metrics["full_loss"] * 1.001  # just above what the whole model does
    cfg = prune_lib.PruneConfig(steps=20, target=target, **small)
    c = prune_lib.prune(model, task, stdlib_tokenizer, cfg, pre)
    m = c.metrics
    assert m["status"] in ("ok", "not_verified", "trivial", "target_not_reached") and m["k"] == len(c.nodes)
    assert (m["status"] == "ok") == (m["sufficiency_loss"] <= target) or m["status"] == "trivial"
    for key in ("full_loss", "sufficiency_loss", "necessity_loss"):
        assert m[key] > 0
    back = Circuit.from_rows(*c.to_rows())
    assert back.nodes == c.nodes and back.edges == c.edges and back.metrics == c.metrics
    assert back.provenance["prune_config"]["target"] == target and back.provenance["prune_key"] == cfg.key()


def test_a_model_at_chance_is_a_verdict_without_pruning(stdlib_rows, stdlib_tokenizer):
    """A random model is at chance on the task: status `chance`, no nodes, nothing trained."""
    model = _model(block_size=32)
    c = prune_lib.prune(model, _quote_task(), stdlib_tokenizer, prune_lib.PruneConfig(n_train=16, n_select=16, n_test=16), _pretrain(stdlib_rows[0]))
    assert c.metrics["status"] == "chance" and c.nodes == [] and "convergence" not in c.metrics
    assert c.metrics["full_accuracy"] < prune_lib.CHANCE_ACCURACY or c.metrics["full_loss"] >= prune_lib.CHANCE_LOSS


def test_verdict_judges_loss_as_well_as_accuracy():
    assert prune_lib.verdict(0.1, 0.99, 0.15) is None
    assert prune_lib.verdict(0.5, 0.99, 0.15) == "model_misses_target"
    assert prune_lib.verdict(0.5, 0.55, 0.15) == "chance"
    assert prune_lib.verdict(1.5, 0.9, 0.15) == "chance"  # accurate but a loss worse than chance's is not above chance


def test_resample_ablation_draws_a_different_pretraining_sequence_per_prompt(stdlib_rows):
    """With every gate closed, identical prompts in one batch get different activations (their own draw)."""
    model = _model()
    pool = prune_lib.ablation_values(model, "resample", _pretrain(stdlib_rows[0]), 16)
    assert next(iter(pool.values())).shape[:2] == (32, 16)
    gates = prune_lib.Gates(model, pool, 1.0)
    for t in gates.tau.values():
        t.data.fill_(-1.0)
    idx = torch.from_numpy(stdlib_rows[1][:1, :16].astype("int64")).repeat(4, 1)
    with torch.no_grad(), gates.active(draw=torch.tensor([0, 1, 2, 0])):
        out = model(idx)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    torch.testing.assert_close(out[0], out[3])  # the same draw: the same activations
    with pytest.raises(ValueError, match="draw"), gates.active():
        pass


def test_unreachable_target_is_a_plain_verdict_not_an_empty_circuit(stdlib_rows, stdlib_tokenizer):
    model = _model(block_size=32)
    cfg = prune_lib.PruneConfig(steps=5, n_train=8, n_select=8, n_test=8, batch_pairs=8, target=1e-6, prune_anyway=True)
    c = prune_lib.prune(model, _quote_task(), stdlib_tokenizer, cfg, _pretrain(stdlib_rows[0]))
    m = c.metrics
    assert m["status"] == "target_not_reached" and m["k"] == len(c.nodes) and m["sufficiency_loss"] > 1e-6


@pytest.mark.parametrize("ablation", ["zero", "resample"])
def test_other_ablations_run(stdlib_rows, stdlib_tokenizer, ablation):
    model = _model(block_size=32)
    cfg = prune_lib.PruneConfig(steps=5, n_train=8, n_select=8, n_test=8, batch_pairs=8, target=100.0, ablation=ablation, prune_anyway=True)
    c = prune_lib.prune(model, _quote_task(), stdlib_tokenizer, cfg, _pretrain(stdlib_rows[0]))
    assert c.metrics["status"] == "trivial" and c.metrics["necessity_loss"] > 0


def test_heaviside_surrogate_gradient():
    tau = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    h = prune_lib.heaviside(tau, 0.25)
    assert h.tolist() == [0.0, 0.0, 1.0]
    h.sum().backward()
    s = torch.sigmoid(tau.detach() / 0.25)
    torch.testing.assert_close(tau.grad, s * (1 - s) / 0.25)


def test_prune_key_covers_every_field():
    """Two configs that differ in any field have different keys; equal configs share one."""
    import dataclasses

    base = prune_lib.PruneConfig()
    assert base.key() == prune_lib.PruneConfig().key()
    changed = {"ablation": "zero", "target": 0.2, "steps": 7, "k_coef": 1e-2, "seed": 3, "lr": 1e-2, "prune_anyway": True,
               "grad_clip_rms": 1.0, "warmup_frac": 0.0, "stop_window": 17, "stop_open_tol": 0.1}
    keys = {dataclasses.replace(base, **{k: v}).key() for k, v in changed.items()}
    assert len(keys) == len(changed) and base.key() not in keys


def test_prune_keys_of_earlier_stores_stay_valid():
    """A row's key is its own target's: the run's other targets are not in it, and fields added
    later enter it only when set — so a default config keys as it did before either existed."""
    import dataclasses
    import hashlib
    import json

    base = prune_lib.PruneConfig(stop_window=0)  # what a default run was before early stopping
    fields = dataclasses.asdict(base)
    for later in ("also_targets", "grad_clip_rms", "stop_window", "stop_open_tol"):
        fields.pop(later)
    assert base.key() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    assert prune_lib.PruneConfig(stop_window=0, stop_open_tol=0.3).key() == base.key()  # no early stop: the tolerance is moot
    # rows stored by early stopping before the tolerance was a field stopped at 5%: they key as that config does
    early = dataclasses.asdict(prune_lib.PruneConfig())
    for later in ("also_targets", "grad_clip_rms", "stop_open_tol"):
        early.pop(later)
    old_key = hashlib.sha256(json.dumps(early, sort_keys=True).encode()).hexdigest()[:10]
    assert prune_lib.PruneConfig(stop_open_tol=0.05).key() == old_key != prune_lib.PruneConfig().key()
    assert prune_lib.PruneConfig(also_targets=(), stop_window=0).key() == base.key() == base.for_target(0.15).key()
    assert prune_lib.PruneConfig(target=0.3).also_targets == ()  # the default second target is the target itself
    with pytest.raises(ValueError, match="grad_clip_rms"):
        prune_lib.PruneConfig(grad_clip_rms=0)
    with pytest.raises(ValueError, match="stop_window"):
        prune_lib.PruneConfig(stop_window=-1)
    with pytest.raises(ValueError, match="stop_open_tol"):
        prune_lib.PruneConfig(stop_open_tol=1.5)


@pytest.mark.parametrize("kw, fragment", [({"ablation": "median"}, "ablation"), ({"target": 0}, "target"), ({"steps": 0}, "steps"),
                                          ({"init": 2.0}, "init"), ({"batch_pairs": 0}, "batch_pairs")])
def test_bad_prune_configs(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        prune_lib.PruneConfig(**kw)


def test_gradient_clipping_scales_the_gates_gradient_to_the_rms_limit():
    """The replication's clip: the joint RMS of every gate's gradient is brought down to the
    limit (direction kept); a gradient already under it is left alone."""
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(5, requires_grad=True)
    a.grad, b.grad = torch.full((3,), 4.0), torch.full((5,), -4.0)
    prune_lib._clip_rms([a, b], 1.0)
    rms = torch.sqrt(torch.cat([a.grad, b.grad]).pow(2).mean())
    assert rms == pytest.approx(1.0, rel=1e-4) and (a.grad > 0).all() and (b.grad < 0).all()
    a.grad = torch.full((3,), 0.5)
    b.grad = torch.full((5,), 0.5)
    prune_lib._clip_rms([a, b], 1.0)
    assert torch.equal(a.grad, torch.full((3,), 0.5))


def test_converged_needs_a_flat_window_of_open_gates_and_smoothed_loss():
    """The stopping rule on convergence records [step, loss, open gates, smoothed loss]."""
    flat = [[s, 0.05, 100, 0.05] for s in range(20, 401, 20)]
    assert prune_lib.converged(flat[:5], 60) and prune_lib.converged(flat[:5], 60, floor=100)
    assert not prune_lib.converged(flat[:3], 60)  # the window is not covered yet
    assert not prune_lib.converged(flat[:4], 60, floor=100)  # before the floor
    assert not prune_lib.converged(flat, 0)  # 0: never stop
    moving = [[s, 0.05, 400 - s // 2, 0.05] for s in range(20, 401, 20)]
    assert not any(prune_lib.converged(moving[:i], 60) for i in range(1, 21))
    jitter = [[s, 0.05, 100 + (s // 20) % 2 * 2, 0.05] for s in range(20, 401, 20)]  # ±2 on 100: within 2%
    assert prune_lib.converged(jitter[:6], 60) and not prune_lib.converged(jitter[:6], 60, open_tol=0.0)
    drifting = [[s, 0.05, 100, 0.2 - s / 2000] for s in range(20, 401, 20)]  # smoothed loss still falling 0.03 per 60 steps
    assert not any(prune_lib.converged(drifting[:i], 60) for i in range(1, 21))
    assert prune_lib.converged(drifting[:6], 60, loss_tol=0.05)
    uneven = [[s, 0.05, 100, 0.05] for s in (25, 50, 75, 100, 125)]  # a window between record points
    assert prune_lib.converged(uneven, 60) and not prune_lib.converged(uneven[:3], 60)


class _Bounds:
    """A stand-in for the selection scorer: a given bound per k, and which k were asked."""

    def __init__(self, fn):
        self.fn, self.asked = fn, []

    def bound(self, k: int) -> float:
        self.asked.append(k)
        return self.fn(k)


@pytest.mark.parametrize("fn, want, never", [
    # the trained mask's size (50) is the first probe to meet it: bisect 32..50, never probe 64 or 100
    (lambda k: 1.0 if k < 37 else 0.1, ("ok", 37), {64, 100}),
    # not monotone: a dip at 5-6 between probes is not seen; above 40 it meets
    (lambda k: 0.1 if k in (5, 6) or k >= 41 else 1.0, ("ok", 41), {64, 100}),
    # a doubling probe meets first (k = 8): the probes past it are never scored
    (lambda k: 0.1 if k >= 7 else 1.0, ("ok", 7), {16, 32, 50, 64, 100}),
    # nothing meets: every probe scored, the best one returned with its verdict
    (lambda k: 0.5 - k / 1000, ("target_not_reached", 100), set()),
])
def test_choose_k_is_the_smallest_meeting_k_and_scores_no_probe_past_it(fn, want, never):
    from sparsity.scoring import choose_k

    sel = _Bounds(fn)
    assert choose_k(sel, 0.15, n_nodes=100, n_open=50) == want
    assert not never & set(sel.asked)
    if want[0] == "target_not_reached":
        assert {0, 1, 2, 4, 8, 16, 32, 50, 64, 100} <= set(sel.asked)
    else:  # the answer is pinned from both sides: k meets, k − 1 was scored and fails
        assert {want[1], want[1] - 1} <= set(sel.asked) and fn(want[1] - 1) > 0.15
