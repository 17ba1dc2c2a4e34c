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
    mu = prune_lib.ablation_values(model, "mean", _pretrain(rows), 8, 0)
    return prune_lib.Gates(model, mu, 0.25), mu


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
    probe = prune_lib.prune(model, task, stdlib_tokenizer, prune_lib.PruneConfig(steps=1, n_train=16, n_select=16, n_test=16, target=100.0), pre)
    assert probe.metrics["status"] == "trivial" and probe.nodes == []  # any loss ≤ 100: nothing is needed
    target = probe.metrics["full_loss"] * 1.001  # just above what the whole model does
    cfg = prune_lib.PruneConfig(steps=20, n_train=16, n_select=16, n_test=16, target=target)
    c = prune_lib.prune(model, task, stdlib_tokenizer, cfg, pre)
    m = c.metrics
    assert m["status"] in ("ok", "trivial", "target_not_reached") and m["k"] == len(c.nodes)
    for key in ("full_loss", "sufficiency_loss", "necessity_loss"):
        assert m[key] > 0
    back = Circuit.from_rows(*c.to_rows())
    assert back.nodes == c.nodes and back.edges == c.edges and back.metrics == c.metrics
    assert back.provenance["prune_config"]["target"] == target


def test_unreachable_target_is_a_plain_verdict_not_an_empty_circuit(stdlib_rows, stdlib_tokenizer):
    model = _model(block_size=32)
    cfg = prune_lib.PruneConfig(steps=5, n_train=8, n_select=8, n_test=8, target=1e-6)
    c = prune_lib.prune(model, _quote_task(), stdlib_tokenizer, cfg, _pretrain(stdlib_rows[0]))
    m = c.metrics
    assert m["status"] == "target_not_reached" and m["k"] == len(c.nodes) and m["sufficiency_loss"] > 1e-6


@pytest.mark.parametrize("ablation", ["zero", "resample"])
def test_other_ablations_run(stdlib_rows, stdlib_tokenizer, ablation):
    model = _model(block_size=32)
    cfg = prune_lib.PruneConfig(steps=5, n_train=8, n_select=8, n_test=8, target=100.0, ablation=ablation)
    c = prune_lib.prune(model, _quote_task(), stdlib_tokenizer, cfg, _pretrain(stdlib_rows[0]))
    assert c.metrics["status"] == "trivial" and c.metrics["necessity_loss"] > 0


def test_heaviside_surrogate_gradient():
    tau = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    h = prune_lib.heaviside(tau, 0.25)
    assert h.tolist() == [0.0, 0.0, 1.0]
    h.sum().backward()
    s = torch.sigmoid(tau.detach() / 0.25)
    torch.testing.assert_close(tau.grad, s * (1 - s) / 0.25)


@pytest.mark.parametrize("kw, fragment", [({"ablation": "median"}, "ablation"), ({"target": 0}, "target"), ({"steps": 0}, "steps")])
def test_bad_prune_configs(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        prune_lib.PruneConfig(**kw)
