import math

import pytest
import torch

from sparsity.config import SparsityConfig, TrainConfig
from sparsity.errors import ConfigError
from sparsity.schedule import density_at, l0_at, lr_at
from sparsity.topk import Target, _topk_mask, project_, scheduled_k


def test_density_schedule_at_its_boundaries():
    """Dense until 1% of training, linear to the target by 50%, the target after."""
    sp = SparsityConfig(pfrac=0.25, ef=2.0)  # L0frac = 0.25 / 4
    steps = 1000
    assert sp.l0frac == pytest.approx(0.0625) and sp.embed_l0frac == pytest.approx(0.125)
    assert l0_at(0, steps, sp) == (1.0, 1.0)
    assert l0_at(10, steps, sp) == (1.0, 1.0)  # exactly at anneal_start
    mid = l0_at(255, steps, sp)[0]
    assert mid == pytest.approx(1 - (1 - 0.0625) * (245 / 490))
    assert l0_at(500, steps, sp) == (pytest.approx(0.0625), pytest.approx(0.125))
    assert l0_at(999, steps, sp)[0] == pytest.approx(0.0625)
    assert density_at(5, 10, 0.5, 0.5, 0.5) == 1.0 and density_at(6, 10, 0.5, 0.5, 0.5) == 0.5  # empty window: a step


def test_lr_schedule_warmup_decay_and_anneal_factor():
    """1% warmup, linear decay, × sqrt(L0_final / L0_t) while annealing."""
    tc = TrainConfig(steps=1000, lr=1.0)
    sp = SparsityConfig(pfrac=0.25)
    assert lr_at(0, tc, sp) == pytest.approx(0.1 * math.sqrt(0.25))  # warmup step 1 of 10, dense
    assert lr_at(9, tc, sp) == pytest.approx(1.0 * math.sqrt(0.25))
    l0 = l0_at(300, 1000, sp)[0]
    assert lr_at(300, tc, sp) == pytest.approx((700 / 990) * math.sqrt(0.25 / l0))
    assert lr_at(600, tc, sp) == pytest.approx(400 / 990)  # annealing over: factor 1
    assert lr_at(999, tc, sp) == pytest.approx(1 / 990)
    dense = SparsityConfig(pfrac=1.0)
    assert lr_at(300, tc, dense) == pytest.approx(700 / 990)


@pytest.mark.parametrize("shape, k", [((256, 64), 2048), ((64, 256), 1), ((1000,), 999), ((32, 32), 1024), ((300, 70), 4321)])
def test_topk_mask_is_exactly_the_k_largest(shape, k):
    """The sampled-bracket selection equals torch.topk's set on random data."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g).abs()
    mask = _topk_mask(a, k, torch.Generator().manual_seed(1))
    ref = torch.zeros(a.numel(), dtype=torch.bool)
    ref[a.reshape(-1).topk(min(k, a.numel())).indices] = True
    assert torch.equal(mask.reshape(-1), ref)


def test_topk_mask_with_ties_and_zeros_keeps_at_most_k():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 3.0])
    m = _topk_mask(a, 4, torch.Generator().manual_seed(0))
    assert int(m.sum()) == 4 and m[5] and m[7]
    m = _topk_mask(a, 7, torch.Generator().manual_seed(0))
    assert int(m.sum()) == 5 and not m[0]  # zeros are never kept


def test_floor_gives_every_unit_its_top_weights_first():
    """With a budget below 4 per unit on average, every unit still keeps its top 4, and the
    matrix holds exactly max(k, 4·units) nonzeros."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 32))
    w.data[0] *= 100  # one row would take the whole global budget without the floor
    t = Target("mlp.c_fc.weight", w, "block", 0)
    k = scheduled_k(t, 0.05, 4)
    assert k == 4 * 48
    before = w.detach().abs().clone()
    project_(t, k, 4, torch.Generator().manual_seed(0))
    nz = w.detach() != 0
    assert int(nz.sum()) == k and (nz.sum(dim=1) >= 4).all()
    top4 = before.topk(4, dim=1).indices
    assert nz.gather(1, top4).all()
    # columns as units (c_proj layout)
    w2 = torch.nn.Parameter(torch.randn(32, 48))
    t2 = Target("mlp.c_proj.weight", w2, "block", 1)
    project_(t2, scheduled_k(t2, 0.05, 4), 4, torch.Generator().manual_seed(0))
    assert ((w2.detach() != 0).sum(dim=0) >= 4).all()


@pytest.mark.parametrize("kw, fragment", [({"pfrac": 0.0}, "pfrac"), ({"pfrac": 1.5}, "pfrac"), ({"ef": -1}, "ef"),
                                          ({"anneal_start": 0.6, "anneal_end": 0.5}, "anneal")])
def test_bad_sparsity_configs(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SparsityConfig(**kw)


@pytest.mark.parametrize("kw, fragment", [({"steps": 0}, "steps"), ({"batch_size": 10, "micro_batches": 3}, "micro_batches"),
                                          ({"lr": -1.0}, "lr"), ({"warmup_frac": 1.0}, "warmup_frac"),
                                          ({"optimizer": "sgd"}, "optimizer")])
def test_bad_train_configs(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**kw)
