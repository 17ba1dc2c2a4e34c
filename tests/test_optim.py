"""Muon: the orthogonalisation, the update's scale, and its place in the training loop."""

import pytest
import torch
from conftest import tiny_config

from sparsity import checkpoint_format as ckpt_lib
from sparsity.batches import FixedBatches, TokenRows
from sparsity.model import GPT
from sparsity.optim import Muon, Optimizers, orthogonalise
from sparsity.topk import WeightSparsifier, sparse_targets
from sparsity.train import evaluate, make_optimizer, train


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 48, 64), (128, 128)])
def test_orthogonalise_flattens_the_spectrum(shape):
    """Singular values of a badly conditioned matrix (σ from 0.1 to 10) all land near 1."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(*shape[:-1], shape[-2], generator=g)).Q
    v = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], shape[-1], generator=g)).Q
    k = min(shape[-2:])
    s = torch.logspace(-1, 1, k)
    m = u[..., :, :k] @ torch.diag_embed(s.expand(*shape[:-2], k)) @ v[..., :k, :]
    out = orthogonalise(m)
    assert out.shape == m.shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out)
    assert float(sv.min()) > 0.5 and float(sv.max()) < 1.3, (float(sv.min()), float(sv.max()))
    assert torch.linalg.cond(m).min() > 50  # the input really was ill-conditioned


def test_muon_step_has_adam_like_rms_and_decays_weights():
    """One step moves a 64×256 matrix by RMS ≈ 0.2·lr (the 'match Adam' scaling), whatever
    the gradient's scale, and weight decay shrinks it by (1 − lr·wd) first."""
    torch.manual_seed(0)
    for scale in (1e-6, 1.0, 1e3):
        w = torch.nn.Parameter(torch.zeros(64, 256))
        w.grad = scale * torch.randn(64, 256)
        Muon([w], lr=0.01).step()
        rms = float(w.detach().pow(2).mean().sqrt())
        assert 0.2 * 0.01 * 0.6 < rms < 0.2 * 0.01 * 1.3, (scale, rms)
    w = torch.nn.Parameter(torch.ones(8, 8))
    w.grad = torch.zeros(8, 8)
    Muon([w], lr=0.1, weight_decay=0.5).step()
    assert torch.allclose(w.detach(), torch.full((8, 8), 0.95))
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_muon_takes_exactly_the_block_matrices():
    cfg = tiny_config(t__optimizer="muon", m__enable_bigram_table=True, m__learnable_bigram_table=True)
    model = GPT(cfg.model)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, Optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    fused = opt.optimizers["muon"].param_groups[0]
    assert fused["parts"] == 3 and all(names[id(p)].endswith("c_attn.weight") for p in fused["params"])
    on_adam = {names[id(p)] for g in opt.optimizers["adam"].param_groups for p in g["params"]}
    assert on_adam | on_muon == set(names.values()) and not on_adam & on_muon
    assert {"transformer.wte.weight", "lm_head.weight", "bigram_table"} <= on_adam
    with pytest.raises(ValueError, match="another --optimizer"):
        opt.load_state_dict({"adam": opt.optimizers["adam"].state_dict()})


def test_muon_run_keeps_the_schedule_learns_and_resumes_bitwise(stdlib_rows):
    """A sparse Muon run: every step within its scheduled nonzeros, val loss falls, and a run
    stopped at step 13 and resumed from its checkpoint files ends with identical weights."""
    cfg = tiny_config(t__optimizer="muon", t__steps=40, t__lr=1e-2, t__micro_batches=2, s__pfrac=0.25)
    rows, val = stdlib_rows

    def batches():
        return TokenRows(rows, cfg.train.batch_size, seed=cfg.train.seed)

    def check(step, model):
        sched = WeightSparsifier(model, cfg.sparsity, cfg.train.steps).ks(step)
        for t in sparse_targets(model):
            assert int((t.param.detach() != 0).sum()) <= sched[t.name], (step, t.name)

    torch.manual_seed(cfg.train.seed)
    initial = evaluate(GPT(cfg.model), FixedBatches(val, 8, 4), torch.device("cpu"))
    full = train(cfg, batches(), "cpu", on_step=check, val_batches=FixedBatches(val, 8, 4))
    assert full.metrics["val_loss"] < initial - 1.0

    saved = {}
    train(cfg, batches(), "cpu", save=lambda files, step: saved.update({step: files}), stop_after=13)
    state = ckpt_lib.from_files(saved[13])
    assert set(state.train_state["optimizer"]) == {"adam", "muon"}
    resumed = train(cfg, batches(), "cpu", state=state).model
    for (name, a), b in zip(full.model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
