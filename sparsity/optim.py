"""Optimizers: Adam (the paper's recipe) and Muon on the block matrices.

Muon (Jordan et al. 2024) updates a weight matrix with its momentum orthogonalised by a
quintic Newton–Schulz iteration: every direction of the update moves at about the same
rate, instead of the few directions that dominate the raw gradient. Here it drives the
2-D matrices inside the transformer blocks; embeddings, the unembedding, biases, norms,
the sink and the bigram table stay on Adam, as is usual for Muon. Measured on one CPU core
(dense d_model 128 × 2 layers, ctx 128, the stdlib corpus, 800 steps of 16 sequences):
validation loss 3.89 with Adam at its best lr, 3.45 with Muon — Adam needs about twice
the tokens for the same loss.

The update is scaled by 0.2·sqrt(max(rows, cols)) so its RMS matches Adam's at the same
learning rate (Moonshot's "match RMS" rule): one lr and one schedule serve both halves.
``torch.optim.Muon`` runs Newton–Schulz in bfloat16, which is slow on most CPUs; this one
uses float32 off CUDA. The fused ``c_attn`` (q, k, v stacked) is orthogonalised per part.
"""

from __future__ import annotations

import math

import torch

# Quintic Newton–Schulz coefficients (Jordan et al.): steepest slope at 0 that still converges.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalise(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """≈ U·Vᵀ of g = U·S·Vᵀ (singular values pushed into roughly [0.5, 1.3]); batched over
    leading dims. bfloat16 on CUDA, float32 elsewhere."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) → orthogonalise → scaled step, with decoupled weight decay.

    A group may set ``parts`` (default 1): the matrix is split into that many equal row
    blocks, each orthogonalised on its own (the fused q/k/v projection has 3).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} out of range")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, parts=1))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd, parts = group["lr"], group["momentum"], group["weight_decay"], group["parts"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                g = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                rows, cols = p.shape[0] // parts, p.shape[1]
                update = orthogonalise(g.view(parts, rows, cols), group["ns_steps"]).view_as(p)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
        return loss


class Optimizers:
    """Several optimizers stepped as one: what the training loop holds.

    ``param_groups`` lists every group (the loop sets each group's lr); ``state_dict`` is a
    dict of plain tensors and numbers per optimizer, so checkpoints load with weights_only.
    """

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        # Read afresh: load_state_dict replaces each optimizer's group dicts.
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.optimizers) - set(state)
        if missing:
            raise ValueError(f"optimizer state lacks {sorted(missing)}: it was saved by a run with another --optimizer")
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])
