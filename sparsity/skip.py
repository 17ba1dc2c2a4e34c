"""Linear layers that skip what pruning's gates make constant or zero.

Under a gate with a fixed ablation value (mean or zero ablation), a closed node's activation
is the same value μ at every position, and its gradient beyond the gate is zero. Once mask
training has closed most gates (on the demo's models 94% of them by step 60 of 400; a scored
circuit keeps ~3% of the nodes), most of a gated layer's inputs are constants and most of
its output gradient columns are zeros. A linear layer that reads a gated activation z
(gates mark it: :func:`mark`) then needs only

    forward   z Wᵀ + b = z[:, open] W[:, open]ᵀ + (W · μ·(1 − H) + b)
    backward  ∂L/∂z = (∂L/∂y)[:, nz] W[nz, :]   (nz: output columns whose gradient is not all zero)

and nothing else changes: the dropped terms are exact zeros or the same constants, so only
the order of a float sum differs (to float tolerance). ∂L/∂z stays dense over z's columns,
closed ones included: the gates' own gradients (their τ may open again) read it.

:func:`linear` is what the model calls while hooks are active; with no gates (training) the
model calls ``F.linear`` directly and none of this runs. CPU only: finding the open columns
waits for the device, which on a GPU would cost more than these small matmuls (not measured
here: the GPU path is left as it was).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A gated input is read through its open columns when at most this share of them is open
# (the gather and the split matmul cost more than they save above about half), and a
# gradient through its nonzero columns likewise.
MAX_SHARE = 0.5
# False: plain F.linear everywhere, gates mark nothing (benchmarks/prune.py measures against it)
enabled = True
# How often each saving ran in this process (tests check that it did; benchmarks report it)
counts = {"forward": 0, "backward": 0}


def mark(z: torch.Tensor, open_cols: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Mark a gate's output z (…, width): only ``open_cols`` vary, every other column c holds
    ``fill[c]`` at every position (``fill`` is 0 at the open columns: μ·(1 − H)). The mark
    holds while z is not modified in place."""
    z._csp_open = (z._version, open_cols, fill)
    return z


def fixed_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(open columns, fill) of a tensor :func:`mark` marked and nothing modified since; else None."""
    m = getattr(x, "_csp_open", None)
    if m is None or m[0] != x._version:
        return None
    return m[1], m[2]


def like(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Give x (rows taken from ``source``, the same columns) ``source``'s mark."""
    m = fixed_columns(source)
    return x if m is None else mark(x, *m)


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W, b: the forward over x's open columns only (when given),
    the backward over the output columns whose gradient is not all zero."""

    @staticmethod
    def forward(ctx, x, weight, bias, open_cols, fill):
        ctx.save_for_backward(weight)
        ctx.in_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])
        y = x.new_empty(*x.shape[:-1], weight.shape[0])  # the output is no view (AbsTopK works on it in place)
        if open_cols is not None:  # every closed column's share, and the bias: (out,)
            bias, x2, weight = F.linear(fill, weight, bias), x2.index_select(1, open_cols), weight.index_select(1, open_cols)
            counts["forward"] += 1
        if bias is None:
            torch.mm(x2, weight.t(), out=y.view(-1, y.shape[-1]))
        else:
            torch.addmm(bias, x2, weight.t(), out=y.view(-1, y.shape[-1]))
        return y

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        nz = g2.any(0).nonzero().squeeze(1)
        if nz.numel() <= MAX_SHARE * g2.shape[1]:
            grad = g2.index_select(1, nz) @ weight.index_select(0, nz)
            counts["backward"] += 1
        else:
            grad = g2 @ weight
        return grad.view(ctx.in_shape), None, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, skipping x's fixed columns and the zero columns of the
    output's gradient where it can (see the module docstring). Weights that need their own
    gradient, and inputs with neither a mark nor a gradient, take ``F.linear``."""
    if not enabled or not x.is_cpu or weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    m = fixed_columns(x)
    if m is not None and m[0].numel() > MAX_SHARE * x.shape[-1]:
        m = None
    if not (torch.is_grad_enabled() and x.requires_grad):
        if m is None:
            return F.linear(x, weight, bias)
        counts["forward"] += 1
        return F.linear(x.index_select(-1, m[0]), weight.index_select(1, m[0]), F.linear(m[1], weight, bias))
    return _Linear.apply(x, weight, bias, *(m if m is not None else (None, None)))
