"""AbsTopK (sparsity.model.abs_topk) against a plain reference: a stable sort of -|x|
along the last dimension, whose first k entries are kept (ties: lowest index first). Every
test runs on each CPU implementation: the compiled kernel (on x86-64 with AVX2 also its
portable vector code, what other CPUs run) and the torch ops."""

import shutil

import pytest
import torch

import sparsity.abstopk as abstopk_mod
import sparsity.model as model_mod
from sparsity.config import LOCTYPES, ModelConfig
from sparsity.model import GPT, abs_topk

CFG = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, d_head=8, d_model=16, d_mlp=64, afrac=0.25)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(params=["compiled", "compiled-generic", "torch"], autouse=True)
def backend(request):
    """Each test once per CPU implementation."""
    name, _, isa = request.param.partition("-")
    if name == "compiled" and abstopk_mod._kernel is None:
        pytest.skip("the AbsTopK kernel is not built here")
    if isa and abstopk_mod._kernel.isa() != "avx2":
        pytest.skip("this CPU runs the kernel's portable code only: covered by 'compiled'")
    old = abstopk_mod.set_backend(name)
    old_isa = abstopk_mod._kernel.isa(isa) if isa else None
    yield name
    abstopk_mod.set_backend(old)
    if old_isa:
        abstopk_mod._kernel.isa(old_isa)


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the first k entries of a stable sort of -|x| (the documented tie rule)."""
    order = torch.sort(-x.detach().abs().float(), dim=-1, stable=True).indices[..., :k]
    return torch.zeros(x.shape, dtype=torch.bool).scatter_(-1, order, True)


def old_abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The formulation before the fast one: topk indices, gather, scatter."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def tricky(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values from a few integers (ties everywhere), signs, many zeros, rows with fewer
    nonzeros than any k here, an all-zero row, ±inf in a few rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float()
    x = x * (torch.rand(shape, generator=g) < 0.7)
    rows = x.view(-1, shape[-1])
    rows[0] = 0.0
    rows[1, 1:] = 0.0  # one nonzero
    rows[2] = 2.0  # all tie
    rows[3, :2] = float("inf")
    rows[4, -1] = -float("inf")
    rows[5, ::2] = -float("inf")  # more infs than k: ties at inf
    return x


def check(x: torch.Tensor, k: int) -> None:
    """Output, kept set and gradient all equal the reference's."""
    x = x.clone().requires_grad_()
    keep = reference_mask(x, k)
    y = abs_topk(x, k)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.detach(), torch.where(keep, x.detach(), 0))
    assert (keep.sum(-1) == min(k, x.shape[-1])).all()
    g = torch.randn(x.shape).to(x.dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g, 0))  # kept zeros pass their gradient too
    with torch.no_grad():
        assert torch.equal(abs_topk(x, k), y.detach())  # the inference path agrees


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loc", LOCTYPES)
def test_keeps_the_reference_set_at_every_location(loc, dtype):
    """At each location's width and k, tied, zero-heavy and ±inf inputs keep exactly the
    first k of a stable sort of -|x|, and the gradient passes exactly there."""
    dim, k = CFG.loc_dims()[loc], int(CFG.afrac * CFG.loc_dims()[loc])
    for seed in range(3):
        check(tricky((3, 5, dim), seed).to(dtype), k)
        check(torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(seed)).to(dtype), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_ks_and_strided_input(dtype):
    """k = 1, width - 1 and width, k = 0 (all dropped, zero gradient), widths that are not a
    multiple of 8, a strided view (q/k/v are splits of c_attn's output) and a 1-D input all
    match the reference."""
    x = tricky((4, 6, 16), 7).to(dtype)
    for k in (1, 15, 16, 0):
        check(x, k)
    for width in (13, 37):
        for k in (1, 4, width - 1, 0):
            check(tricky((4, 6, width), width).to(dtype), k)
    base = tricky((4, 6, 48), 8).to(dtype).requires_grad_()
    g = torch.randn(4, 6, 16).to(dtype)
    for i, view in enumerate(base.split(16, dim=-1)):
        assert not view.is_contiguous()
        keep = reference_mask(view, 4)
        y = abs_topk(view, 4)
        assert torch.equal(y.detach(), torch.where(keep, view.detach(), 0))
        y.backward(g)
        assert torch.equal(base.grad[..., 16 * i: 16 * (i + 1)], torch.where(keep, g, 0))
    assert abs_topk(x, 16) is x
    check(x[0, 0], 4)  # one row, no batch dimensions


def _reference_parts(x: torch.Tensor, ks) -> list[torch.Tensor]:
    w = x.shape[-1] // len(ks)
    return [x[..., i * w:(i + 1) * w] if k is None else torch.where(reference_mask(x[..., i * w:(i + 1) * w], k), x[..., i * w:(i + 1) * w], 0)
            for i, k in enumerate(ks)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_in_place_parts_keep_the_reference_set_and_pass_the_reference_gradient(dtype, backend):
    """``abs_topk_parts_``, what the model calls: three q/k/v-like parts, one left alone and
    one with k = 0, on tied, zero-heavy and ±inf rows; as a fresh activation, as nn.Linear's
    3-D output (a view of its 2-D matmul result), and without grad. On the kernel it works in
    place (the parts share x's storage); the values and the gradient are the reference's."""
    ks = (4, None, 0)
    g = torch.Generator().manual_seed(5)
    for w, through_linear in ((16, False), (16, True), (13, False)):
        if through_linear:
            inp = torch.randn(3, 5, 8, generator=g).to(dtype)
            weight = torch.randn(3 * w, 8, generator=g).to(dtype).requires_grad_()
            bias = torch.randn(3 * w, generator=g).to(dtype)
            x = torch.nn.functional.linear(inp, weight, bias)
            assert x._is_view()  # with a bias: addmm, then a view to 3-D
        else:
            leaf = tricky((3, 5, 3 * w), 11).to(dtype).requires_grad_()
            x = leaf * 1
        want = _reference_parts(x.detach().clone(), ks)
        ptr = x.data_ptr()
        parts = abstopk_mod.abs_topk_parts_(x, ks)
        for got, ref in zip(parts, want, strict=True):
            assert torch.equal(got.detach(), ref)
        assert (parts[0].data_ptr() == ptr) == (backend == "compiled")  # in place on the kernel
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in parts]
        torch.autograd.backward(parts, grads)
        if through_linear:  # d/dweight of linear(inp, weight) = g_outᵀ · inp, with g_out masked
            x_ref = torch.nn.functional.linear(inp, weight.detach(), bias)
            masks = [torch.ones_like(r, dtype=torch.bool) if k is None else reference_mask(r, k)
                     for r, k in zip(x_ref.split(w, -1), ks, strict=True)]
            g_out = torch.cat([torch.where(m, gg, 0) for m, gg in zip(masks, grads, strict=True)], -1)
            assert torch.allclose(weight.grad.float(), (g_out.float().reshape(-1, 3 * w).t() @ inp.float().reshape(-1, 8)), rtol=1e-2, atol=1e-2)
        else:
            x0 = leaf.detach()
            for i, (k, gg) in enumerate(zip(ks, grads, strict=True)):
                part = leaf.grad[..., i * w:(i + 1) * w]
                assert torch.equal(part, gg if k is None else torch.where(reference_mask(x0[..., i * w:(i + 1) * w], k), gg, 0))
    with torch.no_grad():
        x = tricky((3, 5, 3 * w), 12).to(dtype)
        want = _reference_parts(x.clone(), ks)
        for got, ref in zip(abstopk_mod.abs_topk_parts_(x, ks), want, strict=True):
            assert torch.equal(got, ref)
    leaf = tricky((3, 5, 3 * w), 13).to(dtype).requires_grad_()
    before = leaf.detach().clone()
    abstopk_mod.abs_topk_parts_(leaf, ks)
    assert torch.equal(leaf.detach(), before)  # a leaf that needs a gradient is never overwritten


def test_a_3d_view_of_a_leaf_keeps_its_shape(backend):
    """A 3-D view whose 2-D base cannot be overwritten (a leaf that needs a gradient, as a
    custom autograd Function's output can look): AbsTopK falls back to parts of the view
    itself, of its own shape, and leaves the base alone."""
    base = tricky((15, 16), 14).requires_grad_()
    x = base.view(3, 5, 16)
    before = base.detach().clone()
    (got,) = abstopk_mod.abs_topk_parts_(x, (4,))
    assert got.shape == (3, 5, 16) and torch.equal(got.detach(), _reference_parts(x.detach(), (4,))[0])
    assert torch.equal(base.detach(), before)


@pytest.mark.parametrize("activation", ("gelu", "relu"))
def test_a_tiny_gpt_gives_the_old_formulations_logits_and_gradients(activation):
    """With afrac set at all 8 locations, logits and every parameter's gradient equal those
    of the topk/gather/scatter formulation it replaced (random weights: no ties). With relu,
    whose node keeps its output for the backward, mlp_neuron must not be overwritten."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.__dict__, "activation_type": activation})
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))

    def run(parts):
        model.zero_grad(set_to_none=True)
        saved, model_mod.abs_topk_parts_ = model_mod.abs_topk_parts_, parts
        try:
            logits = model(idx[:, :-1])
            model.loss(idx).backward()
        finally:
            model_mod.abs_topk_parts_ = saved
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    new_logits, new_grads = run(model_mod.abs_topk_parts_)  # in place where it can be
    old_logits, old_grads = run(abstopk_mod.per_part(old_abs_topk))
    assert torch.equal(new_logits, old_logits)
    for name, g in old_grads.items():
        assert torch.allclose(new_grads[name], g, rtol=1e-5, atol=1e-7), name
    dense = GPT(ModelConfig(**{**cfg.__dict__, "afrac": None}))
    dense.load_state_dict(model.state_dict())
    assert not torch.allclose(dense(idx[:, :-1]), new_logits)  # AbsTopK really acted


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("width", (256, 1024))
def test_many_rows_of_changing_scale_and_ties_keep_the_reference_set(width, dtype):
    """Enough rows for several threads and for the kernel's bracket (learned row to row) to
    hit and miss: rows whose scale jumps by 1000x, rows of integers (ties at the k-th),
    all-zero rows, a strided view; float32, bfloat16 and float16."""
    g = torch.Generator().manual_seed(width)
    k = width // 4
    x = torch.randn(700, width, generator=g)
    x *= torch.where(torch.rand(700, 1, generator=g) < 0.2, 1000.0, 1.0)  # the bracket misses here
    x *= torch.where(torch.rand(700, 1, generator=g) < 0.1, 1e-6, 1.0)
    x[::7] = torch.randint(-3, 4, (100, width), generator=g).float()
    x[5::50] = 0.0
    x[6::50, : width // 2] = float("inf")
    check(x.to(dtype), k)
    wide = torch.randn(40, 20, 3 * width, generator=g).to(dtype)
    check(wide[..., width: 2 * width], k)  # q/k/v-like view: rows 3·width apart
    check(torch.randn(width, 300, generator=g).to(dtype).t(), k)  # last dimension strided
    check(torch.randn(1, 5, width, generator=g).to(dtype).expand(4, 5, width), k)  # rows repeated (stride 0)


def test_the_kernel_is_built_where_a_c_compiler_is():
    """`pip install` builds the kernel whenever a C compiler exists (it is optional)."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the torch path is the only one")
    assert abstopk_mod._kernel is not None
    assert abstopk_mod.backend() == "compiled"
    with pytest.raises(ValueError, match="0 <= k < n"):
        abstopk_mod._kernel.select(0, 8, 0, 8, 1, 8, 8, 0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_path_keeps_the_reference_set(dtype):
    """The sync-free CUDA path keeps the same set and passes the same gradient."""
    for dim, k in ((256, 64), (1024, 256)):
        x = tricky((8, 32, dim), 3).to(dtype)
        keep = reference_mask(x, k)
        xc = x.cuda().requires_grad_()
        y = abs_topk(xc, k)
        assert torch.equal(y.detach().cpu(), torch.where(keep, x, 0))
        g = torch.randn(x.shape).to(dtype)
        y.backward(g.cuda())
        assert torch.equal(xc.grad.cpu(), torch.where(keep, g, 0))
