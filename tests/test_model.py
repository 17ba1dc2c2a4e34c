import pytest
import torch

from sparsity.config import LOCTYPES, ModelConfig
from sparsity.errors import ConfigError
from sparsity.hooks import hook_names, run_with_cache
from sparsity.model import GPT, abs_topk


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, block_size=16, n_layer=2, d_model=32, n_head=4, d_head=8, d_mlp=64)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg)).eval()


def _idx(n=3, t=16, v=128):
    return torch.randint(0, v, (n, t), generator=torch.Generator().manual_seed(1))


def test_abs_topk_keeps_exactly_k_largest_magnitudes():
    x = torch.randn(5, 7, 40)
    y = abs_topk(x, 10)
    assert ((y != 0).sum(-1) == 10).all()
    kept = y.abs().min(-1).values.where(y.abs().min(-1).values > 0, torch.inf)
    smallest_kept = torch.where(y != 0, y.abs(), torch.inf).min(-1).values
    largest_dropped = torch.where(y == 0, x.abs(), -torch.inf).max(-1).values
    assert (smallest_kept >= largest_dropped).all() and kept.shape == (5, 7)
    assert torch.equal(y[y != 0], x[y != 0])


def test_abs_topk_keeps_exactly_k_of_bf16_input_whose_magnitudes_tie():
    """bf16 activations (CUDA's autocast) tie often: still exactly k kept, none larger dropped."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(1, 4, (6, 64), generator=g) * (torch.randint(0, 2, (6, 64), generator=g) * 2 - 1)).bfloat16()
    y = abs_topk(x, 20)
    assert y.dtype == torch.bfloat16 and ((y != 0).sum(-1) == 20).all()
    smallest_kept = torch.where(y != 0, y.abs(), torch.inf).min(-1).values
    largest_dropped = torch.where(y == 0, x.abs(), -torch.inf).max(-1).values
    assert (smallest_kept >= largest_dropped).all() and torch.equal(y[y != 0], x[y != 0])


def test_abstopk_keeps_int_afrac_d_entries_at_every_location():
    """At all 8 locations the model keeps exactly int(afrac·width) activations per position."""
    model = _model(afrac=0.25, n_layer=1)
    cfg = model.config
    assert set(cfg.loctypes) == set(LOCTYPES)
    _, cache = run_with_cache(model, _idx())
    where = {"attn_in": "0.attn.act_in", "attn_q": "0.attn.q", "attn_k": "0.attn.k", "attn_v": "0.attn.v",
             "attn_out": "0.attn.resid_delta", "mlp_in": "0.mlp.act_in", "mlp_neuron": "0.mlp.post_act", "mlp_out": "0.mlp.resid_delta"}
    for loc, name in where.items():
        k = int(0.25 * cfg.loc_dims()[loc])
        assert ((cache[name] != 0).sum(-1) == k).all(), loc
    dense = _model(afrac=None, n_layer=1)
    _, cache = run_with_cache(dense, _idx())
    assert ((cache["0.mlp.post_act"] != 0).sum(-1) > 16).all()


def test_hooks_record_and_replace_every_documented_name():
    """Every hook name records a tensor, and replacing it changes the logits (except where a
    replacement by the identity must not)."""
    model = _model(sink=True)
    idx = _idx()
    names = hook_names(2)
    assert model.hooks.names == names
    base, cache = run_with_cache(model, idx)
    assert set(cache) == set(names)
    assert cache["0.attn.q"].shape == (3, 16, 32) and cache["0.mlp.post_act"].shape == (3, 16, 64)
    for name in names:
        with model.hooks.replace({name: lambda x: x}):
            assert torch.equal(model(idx), base), name
        with model.hooks.replace({name: lambda x: x * 0 + 0.5}):
            assert not torch.allclose(model(idx), base), name
    assert not model.hooks.active and torch.equal(model(idx), base)


def test_hooks_clean_up_when_the_forward_raises():
    model = _model()
    with pytest.raises(RuntimeError):
        with model.hooks.record() as cache:
            with model.hooks.replace({"0.attn.q": lambda x: x[..., :3]}):
                model(_idx())
    assert not model.hooks.active and cache  # recorded up to the failure, then detached
    with pytest.raises(KeyError, match="unknown hook"):
        with model.hooks.replace({"0.attn.nope": lambda x: x}):
            pass


def test_sink_and_bigram_change_the_outputs():
    idx = _idx()
    base = _model()(idx)
    sink = _model(sink=True)
    with torch.no_grad():
        for b in sink.transformer.h:
            b.attn.attn_imp.sink_logit.fill_(2.0)
    assert not torch.allclose(sink(idx), base)
    bigram = _model(enable_bigram_table=True, learnable_bigram_table=True)
    with torch.no_grad():
        bigram.bigram_table.normal_()
    assert not torch.allclose(bigram(idx), base)


def test_sink_with_zero_logit_matches_an_explicit_computation():
    """The sink slot adds exp(sink_logit) to each softmax denominator and contributes zero value."""
    model = _model(sink=True, afrac=None, n_layer=1)
    attn = model.transformer.h[0].attn
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    out = attn.attn_imp(q, k, v, scale=8**-0.5)
    scores = (q @ k.transpose(-2, -1)) * 8**-0.5
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    w = scores.exp() / (scores.exp().sum(-1, keepdim=True) + 1.0)
    torch.testing.assert_close(out, w @ v)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"afrac": 0.0}, "afrac=0.0 out of range"),
        ({"afrac": 1.5}, "afrac=1.5 out of range"),
        ({"afrac": 0.01}, "keeps no activation"),
        ({"afrac_loctypes": "attn_in,bogus"}, "unknown location"),
        ({"d_model": 0}, "d_model=0 out of range"),
        ({"n_head": 2.5}, "n_head=2.5 out of range"),
        ({"vocab_size": 70000}, "vocab_size=70000"),
        ({"learnable_bigram_table": True}, "needs enable_bigram_table"),
        ({"activation_type": "swish"}, "activation_type"),
    ],
)
def test_bad_model_configs_name_the_field(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**kw)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        ModelConfig(**kw)


def test_scaled_widens_d_model_heads_and_mlp():
    cfg = ModelConfig(d_model=64, n_head=4, d_head=16, d_mlp=256).scaled(2)
    assert (cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_mlp) == (128, 8, 16, 512)
    assert ModelConfig().scaled(2, ef_mlp=1).d_mlp == ModelConfig().d_mlp


def test_last_only_logits_equal_the_last_position_of_the_full_forward():
    model = _model(enable_bigram_table=True, learnable_bigram_table=True)
    with torch.no_grad():
        model.bigram_table.normal_()
    idx = _idx()
    torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])


@pytest.mark.parametrize("kw", [dict(), dict(afrac=0.25), dict(sink=True, afrac=0.25), dict(enable_bigram_table=True, n_layer=1)])
def test_reading_positions_runs_the_last_block_there_alone_with_the_same_logits_and_gradients(kw):
    """model(idx, at=…) computes the last block at the read positions only (keys and values
    everywhere): the logits and the gradients reaching every hook point's replacement are
    those of the plain path, which runs every position, for rows read at any position."""
    model = _model(**kw).double()
    if model.bigram_table is not None:
        with torch.no_grad():
            model.bigram_table.normal_()
    idx, at = _idx(n=5), torch.tensor([15, 0, 7, 3, 15])
    names = [n for n in model.hooks.names if n.split(".", 1)[-1] in ("attn.q", "attn.k", "attn.v", "attn.resid_delta", "mlp.post_act", "mlp.resid_delta")]

    def run(read_only: bool):
        model.read_positions_only = read_only
        gains = {n: torch.ones((), dtype=torch.double, requires_grad=True) for n in names}
        seen = []

        def fn(n):
            def apply(x):
                seen.append((n, x.shape[1], model.hooks.positions is not None))
                return x * gains[n]
            return apply

        with model.hooks.replace({n: fn(n) for n in names}):
            out = model(idx, at=at)
        out.pow(2).sum().backward()
        return out, {n: g.grad for n, g in gains.items()}, seen

    plain, plain_grads, plain_seen = run(False)
    fast, fast_grads, fast_seen = run(True)
    model.read_positions_only = True
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, model(idx)[torch.arange(5), at], rtol=1e-12, atol=1e-12)
    for n in names:
        torch.testing.assert_close(fast_grads[n], plain_grads[n], rtol=1e-10, atol=1e-12)
    last = f"{model.config.n_layer - 1}."
    narrowed = {n for n, t, marked in fast_seen if t == 1 and marked}
    assert narrowed == {n for n in names if n.startswith(last) and not n.endswith((".attn.k", ".attn.v"))}
    assert all(t == 16 and not marked for _, t, marked in plain_seen)
    with model.hooks.record(["final_resid"]) as cache:  # a recorder sees every position: the plain path
        torch.testing.assert_close(model(idx, at=at), plain.detach(), rtol=1e-12, atol=1e-12)
    assert cache["final_resid"].shape[1] == 16


@pytest.mark.parametrize("kw", [dict(), dict(afrac=0.25), dict(sink=True, afrac=0.25), dict(enable_bigram_table=True, n_layer=1),
                                dict(n_layer=3, afrac=0.5)])
def test_a_pair_sharing_a_prefix_gives_the_logits_and_gradients_of_two_separate_reads(kw):
    """GPT.read_pairs runs row b only from where it departs from row a, reading a's keys and
    values before that: the logits of both rows and the gradients reaching every hook point
    are those of model(a, at=…) and model(b, at=…), for departures anywhere from the first
    token to b's read position (also past a's), and b rows shorter or longer than a's. Both
    sides run packed: a hook point before the read positions sees each row's positions up
    to its read position (a's also up to b's departure) and no padding."""
    model = _model(**kw).double()
    if model.bigram_table is not None:
        with torch.no_grad():
            model.bigram_table.normal_()
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 128, (6, 12), generator=g)
    b = torch.cat([a, torch.randint(0, 128, (6, 4), generator=g)], 1)  # b may run past a's end
    start = torch.tensor([3, 0, 10, 11, 5, 12])
    for r, j in enumerate(start.tolist()):
        b[r, j:] = torch.randint(0, 128, (16 - j,), generator=g)
        b[r, j] = (a[r, j] + 1) % 128 if j < 12 else b[r, j]
    at_a, at_b = torch.tensor([11, 4, 10, 11, 3, 11]), torch.tensor([15, 3, 10, 14, 5, 12])  # row 4: b departs past a's read position
    names = model.hooks.names
    gains = {n: torch.ones((), dtype=torch.double, requires_grad=True) for n in names}

    def run(fn):
        for gain in gains.values():
            gain.grad = None
        def scaled(n):
            return lambda x: x * gains[n]

        with model.hooks.replace({n: scaled(n) for n in names}):
            la, lb = fn()
        (la.pow(2).sum() + lb.sin().sum()).backward()
        return la, lb, {n: gain.grad.clone() for n, gain in gains.items()}

    apart = run(lambda: (model(a, at=at_a), model(b, at=at_b)))
    seen = []
    with model.hooks.replace({"0.mlp.post_act": lambda x: seen.append(x.shape) or x}):
        shared = run(lambda: model.read_pairs(a, at_a, b, at_b, start))
    packed_a, packed_b = int(torch.maximum(at_a + 1, start).sum()), int((at_b - start + 1).sum())
    if model.config.n_layer > 1:  # (the last block runs its MLP at the read positions alone)
        assert [s[:-1] for s in seen] == [(packed_a,), (packed_b,)]
    for x, y in zip(shared[:2], apart[:2], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for n in names:
        torch.testing.assert_close(shared[2][n], apart[2][n], rtol=1e-9, atol=1e-11)
    # only some logits of each pair (a task reads its answer and the alternative)
    cols = torch.randint(0, 128, (6, 2), generator=g)
    rows = torch.arange(6)[:, None]
    for x, y in zip(model.read_pairs(a, at_a, b, at_b, start, cols), apart[:2], strict=True):
        torch.testing.assert_close(x, y.detach()[rows, cols], rtol=1e-12, atol=1e-12)
    from sparsity.scoring import shared_prefix

    assert shared_prefix(a, b[:, :12], at_a, at_b).tolist() == torch.minimum(start, at_a + 1).tolist()  # never past a's read position
    assert shared_prefix(a, a, at_a, at_a - 2).tolist() == (at_a - 2).tolist()  # never past b's read position
    assert shared_prefix(a, a, at_a - 3, at_a).tolist() == (at_a - 2).tolist()  # nor a's end


def test_afrac_as_users_give_it_one_means_off_and_out_of_range_is_refused():
    """`ModelConfig.afrac_or_off` is the one reading of --afrac and a sweep's afrac axis: a
    fraction keeps that share, 1 turns AbsTopK off (no k at any location), 0 or above 1 is
    refused naming the range."""
    assert ModelConfig.afrac_or_off(0.25) == 0.25 and ModelConfig.afrac_or_off(None) is None
    off = ModelConfig(d_model=32, n_head=2, d_head=16, d_mlp=64, block_size=16, afrac=ModelConfig.afrac_or_off(1))
    assert off.afrac is None and not off.loctypes and GPT(off).transformer.h[0].attn.sparsify.k == {}
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=r"afrac=.* out of range: must be in \(0, 1\]; 1 turns AbsTopK off"):
            ModelConfig.afrac_or_off(bad)
