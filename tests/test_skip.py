"""sparsity/skip.py: linear layers that skip the columns pruning's gates hold fixed give the
plain layer's values and gradients, and the savings really run."""

import contextlib

import torch
import torch.nn.functional as F

from sparsity import prune as prune_lib
from sparsity import scoring, skip
from sparsity.config import ModelConfig
from sparsity.model import GPT


@contextlib.contextmanager
def _skipping(on: bool):
    before, skip.enabled = skip.enabled, on
    try:
        yield
    finally:
        skip.enabled = before


def _gated(x, h, mu, mark: bool):
    """A gate's output as sparsity/gates.py makes it: lerp(μ, x, H), marked when asked."""
    z = torch.lerp(mu, x, h)
    if mark:
        hd = h.detach()
        skip.mark(z, hd.nonzero().squeeze(1), mu * (1 - hd))
    return z


def _inputs(seed=0, width=48, out=40, open_in=5, open_out=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, width, generator=g)
    h_in = torch.zeros(width)
    h_in[torch.randperm(width, generator=g)[:open_in]] = 1.0
    h_out = torch.zeros(out)
    h_out[torch.randperm(out, generator=g)[:open_out]] = 1.0
    w, b, mu = torch.randn(out, width, generator=g), torch.randn(out, generator=g), torch.randn(width, generator=g)
    r = torch.randn(3, 11, out, generator=g)
    return x, h_in, h_out, w, b, mu, r


def _run(skipped: bool, x, h_in, h_out, w, b, mu, r):
    """Gate → linear → a downstream gate (zero gradient at its closed columns) → loss; the
    output and the gradients of x and of both gates' H."""
    x, h_in, h_out = (t.clone().requires_grad_(True) for t in (x, h_in, h_out))
    with _skipping(skipped):
        y = skip.linear(_gated(x, h_in, mu, skipped), w, b)
    loss = (torch.lerp(torch.zeros_like(h_out), y, h_out) * r).sum()
    loss.backward()
    return y.detach(), x.grad, h_in.grad, h_out.grad


def test_a_linear_reading_a_gated_input_gives_the_plain_values_and_gradients_and_skips_both_ways():
    args = _inputs()
    before = dict(skip.counts)
    fast = _run(True, *args)
    assert skip.counts["forward"] == before["forward"] + 1 and skip.counts["backward"] == before["backward"] + 1
    plain = _run(False, *args)
    assert skip.counts == {"forward": before["forward"] + 1, "backward": before["backward"] + 1}  # off: nothing skipped
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x_grad = fast[1]
    assert (x_grad[..., args[1] == 0] == 0).all() and (x_grad[..., args[1] == 1] != 0).any()  # through open gates only
    assert (fast[2][args[1] == 0] != 0).all()  # a closed gate still gets its gradient (its τ may open again)


def test_without_gradients_the_forward_skips_too():
    x, h_in, _, w, b, mu, _ = _inputs(seed=1)
    before = skip.counts["forward"]
    with torch.no_grad():
        fast = skip.linear(_gated(x, h_in, mu, True), w, b)
        plain = F.linear(_gated(x, h_in, mu, False), w, b)
    assert skip.counts["forward"] == before + 1
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_a_gated_input_changed_in_place_loses_its_mark_and_is_read_whole():
    x, h_in, _, w, b, mu, _ = _inputs(seed=2)
    with torch.no_grad():
        z = _gated(x, h_in, mu, True)
        closed = int((h_in == 0).nonzero()[0])
        z[..., closed] += 5.0  # the column is no longer μ: the mark must not be trusted
        assert skip.fixed_columns(z) is None
        torch.testing.assert_close(skip.linear(z, w, b), F.linear(z, w, b))


def test_mostly_open_inputs_and_trainable_weights_take_the_plain_layer():
    x, _, _, w, b, mu, _ = _inputs(seed=3)
    half_open = (torch.arange(x.shape[-1]) % 3 != 0).float()  # two thirds open: not worth a gather
    before = dict(skip.counts)
    with torch.no_grad():
        skip.linear(_gated(x, half_open, mu, True), w, b)
    w = w.clone().requires_grad_(True)
    y = skip.linear(_gated(x, (torch.arange(x.shape[-1]) < 2).float(), mu, True), w, b)
    y.sum().backward()
    assert skip.counts == before and w.grad is not None  # the weight's own gradient: F.linear


def test_pruning_a_model_gives_the_same_logits_and_mask_gradients_with_and_without_skipping():
    """Through the whole model (two layers, AbsTopK, packed pairs sharing prefixes): the
    answer logits under a fixed mask of few nodes, and one mask step's τ gradient with most
    gates closed, are those of the plain layers."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=96, block_size=32, n_layer=2, d_model=32, n_head=4, d_head=8, d_mlp=64, afrac=0.5)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (8, 20), generator=g)
    tokens[4:, :12] = tokens[:4, :12]  # corrupt twins share a prefix with their clean rows
    last = torch.randint(14, 20, (8,), generator=g)
    gates = prune_lib.Gates(model, {n: torch.randn(w, generator=g) for n, w in _widths(model).items()}, 1.0)
    with torch.no_grad():
        for t in gates.tau.values():
            t.copy_(torch.where(torch.rand(t.shape, generator=g) < 0.1, 0.5, -0.5))  # a tenth open
    fixed = {n: (t > 0).float() for n, t in gates.tau.items()}
    out = {}
    for on in (False, True):
        with _skipping(on):
            before = dict(skip.counts)
            logits = scoring.answer_logits(model, gates, tokens, last, fixed=fixed)
            gates.flat.grad = None
            masks = gates.masks()
            scoring.answer_logits(model, gates, tokens, last, masks=masks).logsumexp(-1).sum().backward()
            out[on] = (logits, gates.flat.grad.clone(), {k: skip.counts[k] - before[k] for k in before})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-3, atol=1e-4)
    assert out[False][2] == {"forward": 0, "backward": 0}
    assert out[True][2]["forward"] > 0 and out[True][2]["backward"] > 0


def _widths(model) -> dict[str, int]:
    from sparsity.circuit import node_sizes
    from sparsity.gates import node_names

    sizes = node_sizes(model.config)
    return {n: sizes[n.split(".", 1)[1]] for n in node_names(model.config)}
