"""AbsTopK: keep the k largest-|x| entries of the last dimension, zero the rest.

Exactly k entries of every row survive (all of them when k ≥ the width). Ties: among entries
whose |x| equals the row's k-th largest |x|, the lowest indices survive — the first k of a
stable sort of -|x|. Zeros are no exception: a row with fewer than k nonzeros keeps its
lowest-index zeros, and a kept entry passes its gradient. The gradient is 1 at kept entries,
0 elsewhere. ±inf is kept or dropped like any value; NaN is unsupported.

Two implementations give the same result:

- ``compiled`` (CPU; float32, bfloat16, float16): the C kernel ``sparsity/_abstopk.c``,
  built at install. Each row's k-th |x| is predicted from the row's mean |x| and found
  exactly among the few keys in a bracket around the prediction (see the C file); about 10x
  faster than ``torch.topk`` on CPU (benchmarks/train_step.py). Autograd saves only the
  kept set, as bits.
- ``torch``: one ``topk`` gives each row's k-th largest |x|; the mask is |x| ≥ it, with the
  index rule applied where ties make that keep more than k. Used on CUDA (there with no host
  sync), for float64, and on CPU when the kernel was not built (no C compiler at install).

The model calls :func:`abs_topk_parts_`, which on the kernel overwrites its input (a fresh
activation nothing else reads) instead of writing a second tensor.

``CSP_ABSTOPK=torch`` forces the torch path; ``python -m sparsity.abstopk`` prints which
path CPU tensors take.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    from sparsity import _abstopk as _kernel
except ImportError:  # built without a C compiler: the torch path does everything
    _kernel = None

_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's dtype codes
_SMALL = 1 << 15  # below this many elements one thread (starting threads costs more)


def backend() -> str:
    """The implementation CPU tensors get: ``compiled`` or ``torch``."""
    if _kernel is None or os.environ.get("CSP_ABSTOPK", "").lower() == "torch":
        return "torch"
    return "compiled"


_BACKEND = backend()


def set_backend(name: str) -> str:
    """Choose ``compiled`` or ``torch`` for CPU tensors (tests, benchmarks); returns the
    previous one. ``compiled`` needs the built kernel."""
    global _BACKEND
    if name not in ("compiled", "torch"):
        raise ValueError(f"unknown AbsTopK backend {name!r}: choose 'compiled' or 'torch'")
    if name == "compiled" and _kernel is None:
        raise RuntimeError("the AbsTopK kernel was not built (no C compiler at install); reinstall with one")
    old, _BACKEND = _BACKEND, name
    return old


def _threads(numel: int) -> int:
    return 1 if numel < _SMALL else torch.get_num_threads()


def _mask_for(rows: int, parts: int, width: int) -> torch.Tensor:
    """Room for the kept set as bits: part i of row r in bytes [r, i, :] (C file: ``select``)."""
    return torch.empty((rows, parts, (width + 7) // 8), dtype=torch.uint8)


def _select(x: torch.Tensor, k: int, mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's AbsTopK of x's rows into a new tensor, and (if ``mask``) the kept set as
    bits. x: a CPU tensor of a kernel dtype."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # a view where the strides allow (q/k/v: rows 3·width apart), else a copy
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < n):
        rows = rows.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype)
    bits = _mask_for(rows.shape[0], 1, n) if mask else None
    if rows.shape[0]:
        stride = rows.stride(0) if rows.shape[0] > 1 else n
        m = (bits.data_ptr(), bits.shape[-1]) if mask else ()
        _kernel.select(rows.data_ptr(), stride, y.data_ptr(), n, rows.shape[0], n, k, _KERNEL_DTYPES[x.dtype], _threads(x.numel()), *m)
    return y, bits


def _backward(bits: torch.Tensor, g: torch.Tensor, ks: tuple[int | None, ...]) -> torch.Tensor:
    """Gradient of AbsTopK over the equal parts of the last dimension (``ks[i]`` in part i,
    None: identity) from the kept set's bits (:func:`_mask_for`) the forward wrote."""
    g = g.contiguous()
    out = g.clone() if None in ks else torch.empty_like(g)
    n = g.shape[-1]
    width, rows = n // len(ks), g.numel() // n
    if rows:
        step, threads, mstride = width * g.element_size(), _threads(rows * width), bits.shape[1] * bits.shape[2]
        for i, k in enumerate(ks):
            if k is not None:
                _kernel.backward(bits.data_ptr() + i * bits.shape[2], mstride, g.data_ptr() + i * step, n, out.data_ptr() + i * step, n, rows, width,
                                 g.element_size(), threads)
    return out


class _Compiled(torch.autograd.Function):
    """AbsTopK on the kernel. Autograd saves only the kept set, as bits: 1/32 of a float32
    activation, where saving the output would keep the whole activation alive until the
    backward (after attn_out and mlp_out nothing else holds it: 8 MB a layer at d_model 256,
    batch 16, ctx 256)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        y, bits = _select(x, k, mask=True)
        ctx.save_for_backward(bits)
        ctx.ks = (k,)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (bits,) = ctx.saved_tensors
        return _backward(bits, g, ctx.ks), None


class _CompiledInPlace(_Compiled):
    """AbsTopK in place over the equal parts of x's last dimension (contiguous x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ks: tuple[int | None, ...]) -> torch.Tensor:
        n = x.shape[-1]
        bits = _mask_for(x.numel() // n, len(ks), n // len(ks))
        _parts_in_place(x, ks, bits)
        ctx.mark_dirty(x)
        ctx.save_for_backward(bits)
        ctx.ks = ks
        return x


def _parts_in_place(x: torch.Tensor, ks: tuple[int | None, ...], bits: torch.Tensor | None = None) -> None:
    """The kernel in place on each part of a contiguous x (its rows: every n-th element);
    the kept set's bits into ``bits`` (:func:`_mask_for`) if given."""
    n = x.shape[-1]
    width, rows = n // len(ks), x.numel() // n
    if rows:
        base, step, code, threads = x.data_ptr(), width * x.element_size(), _KERNEL_DTYPES[x.dtype], _threads(rows * width)
        for i, k in enumerate(ks):
            if k is not None:
                m = () if bits is None else (bits.data_ptr() + i * bits.shape[2], bits.shape[1] * bits.shape[2])
                _kernel.select(base + i * step, n, base + i * step, n, rows, width, k, code, threads, *m)


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest-|x| entries of the last dimension, zero the rest (module docstring)."""
    n = x.shape[-1]
    if k >= n:
        return x
    if x.dim() == 1:
        return abs_topk(x[None], k)[0]
    if k <= 0:
        return torch.where(torch.zeros_like(x, dtype=torch.bool), x, 0)
    if _on_kernel(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Compiled.apply(x, k)
        return _select(x, k)[0]
    return _abs_topk_torch(x, k)


def abs_topk_parts_(x: torch.Tensor, ks: tuple[int | None, ...]) -> tuple[torch.Tensor, ...]:
    """The last dimension cut into ``len(ks)`` equal parts, AbsTopK with ``ks[i]`` in part i
    (None: left as is); returns the parts. In place where it can be — x, a fresh activation
    nothing else reads, is then overwritten, which spares writing and allocating a second
    tensor: on the kernel, for a contiguous x that is not a leaf needing a gradient nor kept
    by its own autograd node (a relu's output). Else :func:`abs_topk` per part. The model's
    fused q/k/v projection is three parts."""
    n = x.shape[-1]
    width = n // len(ks)
    if width * len(ks) != n:
        raise ValueError(f"a last dimension of {n} does not split into {len(ks)} equal parts")
    ks = _normal_ks(ks, width)
    if ks is None:  # nothing to do
        return (x,) if width == n else x.split(width, dim=-1)
    # the fast path first, with as few Python steps as can be: the model calls this 6 times
    # per layer, each right after a matmul has left the caches cold
    if _BACKEND == "compiled" and x.dtype in _KERNEL_DTYPES and x.is_cpu and x.is_contiguous() and x.dim() >= 2:
        if not (x.requires_grad and torch.is_grad_enabled()):
            _parts_in_place(x, ks)
            return (x,) if width == n else x.split(width, dim=-1)
        base = x._base  # nn.Linear's 3-D output is a view of its 2-D matmul result: work on that
        if base is not None and base.shape[-1] == n and base.numel() == x.numel() and base.data_ptr() == x.data_ptr() and base.is_contiguous():
            y, shape = base, x.shape
        else:
            y, shape = x, None
        # in place on a view would make autograd copy its base's gradient; and x must not be
        # what its own node keeps for the backward (relu's, tanh's output)
        if not y.is_leaf and y._base is None and not _saved_by_its_node(y):
            y = _CompiledInPlace.apply(y, ks)
            y = y if shape is None else y.view(shape)
            return (y,) if width == n else y.split(width, dim=-1)
    parts = (x,) if width == n else x.split(width, dim=-1)
    return tuple(p if k is None else abs_topk(p, k) for p, k in zip(parts, ks, strict=True))


def _saved_by_its_node(x: torch.Tensor) -> bool:
    """Whether the autograd node that made x keeps x itself for its backward, as relu, tanh
    and exp do (matmul, gelu and layer norm keep their inputs): overwriting x would then
    change that backward. A node of a Python-defined Function cannot be asked; there the
    version counter makes the backward fail loudly rather than wrongly."""
    fn = x.grad_fn
    if fn is None:
        return False
    key = (type(fn), x.output_nr)
    saved = _SAVES_OUTPUT.get(key)
    if saved is None:  # asked once per kind of node (a failed hasattr costs ~20 µs after a matmul)
        saved = _SAVES_OUTPUT[key] = hasattr(fn, "_saved_result") or hasattr(fn, f"_saved_result{x.output_nr}")
    return saved


_SAVES_OUTPUT: dict[tuple[type, int], bool] = {}


@functools.lru_cache(maxsize=256)
def _normal_ks(ks: tuple[int | None, ...], width: int) -> tuple[int | None, ...] | None:
    """ks with every k that keeps the whole part as None (and k <= 0 as 0: nothing kept), or
    None when no part needs AbsTopK."""
    out = tuple(None if k is None or k >= width else max(int(k), 0) for k in ks)
    return None if all(k is None for k in out) else out


def per_part(f):
    """An ``abs_topk_parts_`` that applies ``f(part, k)`` (an out-of-place AbsTopK: a reference
    formulation, or the identity) to each part: what tests and benchmarks swap in."""

    def parts(x: torch.Tensor, ks: tuple[int | None, ...]) -> tuple[torch.Tensor, ...]:
        width = x.shape[-1] // len(ks)
        parts = (x,) if len(ks) == 1 else x.split(width, dim=-1)
        return tuple(p if k is None else f(p, k) for p, k in zip(parts, ks, strict=True))

    return parts


def _on_kernel(x: torch.Tensor) -> bool:
    return _BACKEND == "compiled" and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES


def _abs_topk_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """The torch-ops path (0 < k < width, at least 2-D)."""
    a = x.detach().abs()
    kth = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (..., 1)

    def lowest_ties(a: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:  # bool: a > kth, then a == kth by index up to k
        gt, eq = a > kth, a == kth
        need = k - gt.sum(-1, keepdim=True, dtype=torch.int32)
        return gt | (eq & (eq.to(torch.int32).cumsum(-1, dtype=torch.int32) <= need))

    if x.device.type != "cpu":
        return torch.where(lowest_ties(a, kth), x, 0)
    keep = torch.ge(a, kth, out=a)  # in place, as 1.0/0.0: one vectorised pass (a bool compare is ~8x slower)
    tied = keep.sum(-1, dtype=torch.float32) != k  # rows holding more than k (ties at kth): a few per step
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        keep[rows] = lowest_ties(x.detach()[rows].abs(), kth[rows]).to(keep.dtype)
    if bool(kth.isinf().any()):
        return torch.where(keep.bool(), x, 0)  # x * keep is NaN where an inf is dropped
    return x * keep


if __name__ == "__main__":
    print(f"AbsTopK on CPU: {backend()}" + ("" if _kernel else " (the C kernel was not built: no C compiler at install)"))
