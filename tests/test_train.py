import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from sparsity import checkpoint_format as ckpt_lib
from sparsity.batches import FixedBatches, TokenRows
from sparsity.config import HOOK_OF
from sparsity.errors import ConfigError
from sparsity.hooks import run_with_cache
from sparsity.model import GPT
from sparsity.topk import WeightSparsifier, sparse_targets
from sparsity.train import autocast, evaluate, make_optimizer, normalise_grads_, train


def _batches(rows, cfg):
    return TokenRows(rows, cfg.train.batch_size, seed=cfg.train.seed)


def test_every_step_respects_scheduled_k_and_the_floor(stdlib_rows):
    """Over a whole annealing run, after every step each sparsified matrix has at most its
    scheduled k nonzeros and every neuron/channel keeps ≥ 4 (read from the weights)."""
    cfg = tiny_config(s__pfrac=0.02, t__steps=30)  # sparse enough that the floor binds
    rows, _ = stdlib_rows
    checked = []

    def check(step, model):
        sched = WeightSparsifier(model, cfg.sparsity, cfg.train.steps).ks(step)
        for t in sparse_targets(model):
            nz = t.param.detach() != 0
            assert int(nz.sum()) <= sched[t.name], (step, t.name)
            if t.units_dim is not None:
                assert int(nz.sum(dim=1 - t.units_dim).min()) >= 4, (step, t.name)
        checked.append(step)

    train(cfg, _batches(rows, cfg), "cpu", on_step=check)
    assert checked == list(range(30))
    final = WeightSparsifier(GPT(cfg.model), cfg.sparsity, 30).ks(29)
    assert final["transformer.h.0.mlp.c_fc.weight"] == 4 * 256  # the floor raised k above 0.02·numel


def test_dense_configuration_trains_like_a_plain_gpt(stdlib_rows):
    """With L0frac = 1 the loop equals a hand-written AdamW loop on RMS-normalised grads, bit for bit."""
    cfg = tiny_config(s__pfrac=1.0, t__steps=8, m__afrac=None)
    rows, _ = stdlib_rows
    ours = train(cfg, _batches(rows, cfg), "cpu").model

    torch.manual_seed(cfg.train.seed)
    ref = GPT(cfg.model)
    opt = make_optimizer(ref, cfg)
    batches = _batches(rows, cfg)
    from sparsity.schedule import lr_at

    for step in range(cfg.train.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.train, cfg.sparsity)
        ref.loss(batches(step)).backward()
        normalise_grads_(list(ref.parameters()), cfg.train.grad_rms_eps)
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(int((t.param != 0).sum()) == t.param.numel() for t in sparse_targets(ours))


def test_loss_falls_clearly_within_200_steps(stdlib_rows):
    """A tiny sparse model on stdlib shards: val loss falls from ~7.6 (uniform over 2048) by > 2 nats in 200 steps."""
    cfg = tiny_config(t__steps=200, t__batch_size=16, t__eval_every=50)
    rows, val = stdlib_rows
    torch.manual_seed(cfg.train.seed)
    initial = evaluate(GPT(cfg.model), FixedBatches(val, 16, 4), torch.device("cpu"))
    log = []
    result = train(cfg, _batches(rows, cfg), "cpu", log.append, val_batches=FixedBatches(val, 16, 4))
    vals = [m["val_loss"] for m in log if "val_loss" in m]
    assert initial > 7.0 and len(vals) == 4
    assert vals[-1] < initial - 2.0 and vals == sorted(vals, reverse=True)
    assert result.metrics["nonzeros"] < 0.2 * sum(t.param.numel() for t in sparse_targets(result.model))


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(stdlib_rows):
    """Stop at step 17, resume from that checkpoint (through its files), finish: identical weights."""
    cfg = tiny_config(t__steps=30, t__micro_batches=2, s__pfrac=0.25)
    rows, _ = stdlib_rows
    full = train(cfg, _batches(rows, cfg), "cpu").model

    saved = {}
    train(cfg, _batches(rows, cfg), "cpu", save=lambda files, step: saved.update({step: files}), stop_after=17)
    assert list(saved) == [17]
    state = ckpt_lib.from_files(saved[17])
    assert state.train_state["data_position"] == 17 * 2
    resumed = train(cfg, _batches(rows, cfg), "cpu", state=state).model
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("option", ["sink", "bigram"])
def test_sink_and_bigram_models_still_train(stdlib_rows, option):
    over = {"m__sink": True} if option == "sink" else {"m__enable_bigram_table": True, "m__learnable_bigram_table": True}
    cfg = tiny_config(t__steps=60, **over)
    rows, val = stdlib_rows
    torch.manual_seed(cfg.train.seed)
    initial = evaluate(GPT(cfg.model), FixedBatches(val, 16, 4), torch.device("cpu"))
    result = train(cfg, _batches(rows, cfg), "cpu", val_batches=FixedBatches(val, 16, 4))
    assert result.metrics["val_loss"] < initial - 1.0
    if option == "sink":
        assert any(float(b.attn.attn_imp.sink_logit.detach().abs().sum()) > 0 for b in result.model.transformer.h)
    else:
        assert float(result.model.bigram_table.detach().abs().sum()) > 0


def test_batches_are_disjoint_across_ranks_and_deterministic(stdlib_rows):
    rows, _ = stdlib_rows
    a, b = TokenRows(rows, 8, seed=3, rank=0, world=2), TokenRows(rows, 8, seed=3, rank=1, world=2)
    seen_a = {int(i) for j in range(50) for i in a.indices(j)}
    seen_b = {int(i) for j in range(50) for i in b.indices(j)}
    assert not seen_a & seen_b
    assert torch.equal(TokenRows(rows, 8, seed=3)(7), TokenRows(rows, 8, seed=3)(7))


def test_configs_round_trip_through_dicts():
    cfg = tiny_config(m__sink=True, s__ef=2.0)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config field"):
        type(cfg).from_dict({"model": {"bogus": 1}})
    assert dataclasses.replace(cfg.model, d_model=128).d_model == 128




class _RecordsQDtype(torch.nn.Module):
    """The model's forward, noting the dtype of its first q activation each call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.dtypes = model, []

    def forward(self, idx):
        with self.model.hooks.record(["0.attn.q"]) as cache:
            out = self.model(idx)
        self.dtypes.append(cache["0.attn.q"].dtype)
        return out


def test_bf16_autocast_keeps_exactly_k_weights_per_matrix_and_k_activations():
    """Under bf16 autocast (CUDA's numerics, forced on CPU) every step leaves each matrix
    exactly its scheduled nonzeros, in fp32 master weights, with the floor; AbsTopK keeps
    exactly k of its bf16 activations; the loss stays finite. (CPU's default stays plain
    fp32: test_dense_configuration_trains_like_a_plain_gpt holds it bit for bit.)"""
    # Dense embeddings: at density 0.02 a token's residual row has ~2 nonzeros, fewer than
    # attn_in's k, and AbsTopK cannot keep k entries that are already zero.
    cfg = tiny_config(t__steps=12, t__log_every=1, s__pfrac=0.02, s__embed_pfrac=1.0, m__block_size=32, m__sink=True)
    rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (64, 33))
    sched = WeightSparsifier(GPT(cfg.model), cfg.sparsity, cfg.train.steps)
    checked = []

    def check(step, model):
        ks = sched.ks(step)
        for t in sparse_targets(model):
            assert t.param.dtype == torch.float32, t.name
            nz = t.param.detach() != 0
            assert int(nz.sum()) == ks[t.name], (step, t.name)
            if t.units_dim is not None:
                assert int(nz.sum(dim=1 - t.units_dim).min()) >= 4, (step, t.name)
        checked.append(step)

    log, nets = [], []

    def wrap(model):
        nets.append(_RecordsQDtype(model))
        return nets[-1]

    bf16 = train(cfg, TokenRows(rows, 8), "cpu", log.append, on_step=check, wrap=wrap, precision="bf16").model
    assert nets[0].dtypes == [torch.bfloat16] * 12  # every training forward ran under bf16 autocast
    assert checked == list(range(12))
    losses = [m["loss"] for m in log if "loss" in m]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())

    x = torch.from_numpy(rows[:4, :32])
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        _, cache = run_with_cache(bf16.eval(), x)
    for layer in range(cfg.model.n_layer):
        for loc, hook in HOOK_OF.items():
            k = int(cfg.model.afrac * cfg.model.loc_dims()[loc])
            assert ((cache[f"{layer}.{hook}"] != 0).sum(-1) == k).all(), (layer, loc)
    assert cache["0.attn.q"].dtype == cache["0.mlp.post_act"].dtype == torch.bfloat16


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision='fp16' out of range"):
        train(tiny_config(), lambda i: None, "cpu", precision="fp16")
