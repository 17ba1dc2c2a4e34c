"""AbsTopK: keep the k largest-|x| entries of the last dimension, zero the rest.

Exactly k entries of every row survive (all of them when k ≥ the width). Ties: among entries
whose |x| equals the row's k-th largest |x|, the lowest indices survive — the first k of a
stable sort of -|x|. Zeros are no exception: a row with fewer than k nonzeros keeps its
lowest-index zeros, and a kept entry passes its gradient. The gradient is 1 at kept entries,
0 elsewhere; autograd saves only the mask. ±inf is kept or dropped like any value; NaN is
unsupported.

Two implementations give the same result:

- ``compiled`` (CPU; float32, bfloat16, float16): the C kernel ``sparsity/_abstopk.c``,
  built at install. A histogram over a bracket learned from the previous row finds each
  row's k-th |x| in about two passes (see the C file); ~5x faster than ``torch.topk`` on
  CPU (benchmarks/abstopk.py).
- ``torch``: one ``topk`` gives each row's k-th largest |x|; the mask is |x| ≥ it, with the
  index rule applied where ties make that keep more than k. Used on CUDA (there with no host
  sync), for float64, and on CPU when the kernel was not built (no C compiler at install).

``CSP_ABSTOPK=torch`` forces the torch path; ``python -m sparsity.abstopk`` prints which
path CPU tensors take.
"""

from __future__ import annotations

import os

import torch

try:
    from sparsity import _abstopk as _kernel
except ImportError:  # built without a C compiler: the torch path does everything
    _kernel = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


def _select(x: torch.Tensor, k: int, want_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, keep) from the kernel (keep None unless wanted); x: a CPU tensor of a kernel dtype."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # a view where the strides allow (q/k/v: rows 3·width apart), else a copy
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < n):
        rows = rows.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype)
    keep = torch.empty(x.shape, dtype=torch.bool) if want_mask else None
    if rows.shape[0]:
        stride = rows.stride(0) if rows.shape[0] > 1 else n
        _kernel.select(rows.data_ptr(), stride, y.data_ptr(), keep.data_ptr() if want_mask else 0, rows.shape[0], n, k,
                       x.element_size(), _threads(x.numel()))
    return y, keep


class _Compiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        y, keep = _select(x, k)
        ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (keep,) = ctx.saved_tensors
        g = g.contiguous()
        out = torch.empty_like(g)
        _kernel.masked(g.data_ptr(), out.data_ptr(), keep.data_ptr(), g.numel(), g.element_size(), _threads(g.numel()))
        return out, None


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest-|x| entries of the last dimension, zero the rest (module docstring)."""
    n = x.shape[-1]
    if k >= n:
        return x
    if x.dim() == 1:
        return abs_topk(x[None], k)[0]
    if k <= 0:
        return torch.where(torch.zeros_like(x, dtype=torch.bool), x, 0)
    if _BACKEND == "compiled" and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Compiled.apply(x, k)
        return _select(x, k, want_mask=False)[0]
    return _abs_topk_torch(x, k)


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
