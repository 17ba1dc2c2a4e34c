"""Timing helpers shared by the benchmarks: a device sync and one timed optimizer step."""

from __future__ import annotations

import time

import torch

from sparsity.train import autocast, normalise_grads_


def sync(dev: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously; a CPU needs nothing)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_step(model, opt, x: torch.Tensor, dev: torch.device) -> float:
    """Seconds for one training step of ``model`` on ``x``: forward and loss under the
    run's autocast, backward, RMS-normalised gradients, the optimizer step."""
    sync(dev)
    t0 = time.perf_counter()
    with autocast(dev):
        loss = model.loss(x)
    loss.backward()
    normalise_grads_(list(model.parameters()), 1e-5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(dev)
    return time.perf_counter() - t0
