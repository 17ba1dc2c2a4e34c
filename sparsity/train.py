"""The training loop: read it top to bottom (nanoGPT's order).

    for each step: set lr → eval / checkpoint → micro-steps → normalise grads → Adam step
                   → weight top-k → log

``train`` knows nothing of Ray or storage: data comes from ``batches(i)`` (a pure function
of the batch index, so the data position is one integer), metrics go to ``report(dict)``
(Ray passes a wrapper of ``ray.train.report``, tests pass ``list.append``), checkpoints go
to ``save(files, step)``. Resuming from a checkpoint's train state ends bitwise equal to
the uninterrupted run on CPU.

Precision: on CUDA forward passes run under bf16 autocast with TF32 for the matmuls left
in fp32; on CPU everything is fp32 unless ``precision="bf16"`` (tests use it to run the
GPU's numerics here). Master weights, gradients, Adam and the weight top-k are fp32 always.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from sparsity import checkpoint_format as ckpt_lib
from sparsity.config import RunConfig
from sparsity.model import GPT
from sparsity.optim import Muon, Optimizers
from sparsity.schedule import l0_at, lr_at
from sparsity.topk import WeightSparsifier

Report = Callable[[dict], None]
Save = Callable[[dict[str, bytes], int], None]


@dataclass
class TrainResult:
    model: GPT
    step: int
    metrics: dict


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from sparsity.errors import ConfigError

    try:
        d = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} out of range: use auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} out of range: CUDA is not available here; use --device cpu")
    return d


# "auto": bf16 autocast on CUDA, plain fp32 on CPU (where bf16 matmuls are slow);
# "bf16" forces bf16 autocast on any device (how a CPU test runs the GPU's numerics);
# "fp32" turns autocast off.
PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype forward passes autocast to on ``device``, or None for plain fp32."""
    if precision not in PRECISIONS:
        from sparsity.errors import ConfigError

        raise ConfigError(f"precision={precision!r} out of range: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto"):
    """The context every forward pass (and the loss) runs in: bf16 autocast where
    :func:`autocast_dtype` says so, else nothing. Only the matmuls' inputs are cast: the
    parameters stay fp32 master weights, so gradients, the optimizer state and the weight
    top-k (which runs outside this context) are fp32 whatever the precision."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_matmul_precision(device: torch.device) -> None:
    """On CUDA, let the matmuls autocast leaves in fp32 (and every matmul of an fp32 run, or
    of pruning after training in the same process) use TF32 tensor cores: products with a
    10-bit mantissa (bf16 has 7), accumulated in fp32. Process-wide; set once by
    :func:`train`. A no-op elsewhere (CPU matmuls stay plain fp32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def make_optimizer(model: GPT, cfg: RunConfig) -> torch.optim.Optimizer | Optimizers:
    """``adam``: AdamW on everything, decoupled weight decay on 2-D weights only (not biases,
    norms, sink, or the dense bigram table). ``muon``: Muon on the matrices inside the
    blocks (the fused q/k/v in three parts), AdamW as above on the rest."""
    tc = cfg.train
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if tc.optimizer == "muon" and p.dim() == 2 and name.startswith("transformer.h."):
            muon.append((name, p))
        else:
            (decay if p.dim() >= 2 and name != "bigram_table" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adam = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=True)
    if not muon:
        return adam
    fused = [p for n, p in muon if n.endswith("attn.c_attn.weight")]
    other = [p for n, p in muon if not n.endswith("attn.c_attn.weight")]
    matrices = Muon([{"params": fused, "parts": 3}, {"params": other}], lr=tc.lr, weight_decay=tc.weight_decay)
    return Optimizers(adam=adam, muon=matrices)


@torch.no_grad()
def normalise_grads_(params: list[torch.nn.Parameter], eps: float) -> float:
    """g ← g / (rms(g) + eps), the RMS taken over every gradient entry of the model."""
    grads = [p.grad for p in params if p.grad is not None]
    n = sum(g.numel() for g in grads)
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    rms = torch.sqrt(sq / n)
    torch._foreach_div_(grads, rms + eps)
    return float(rms)


@torch.no_grad()
def evaluate(model: GPT, batches: Iterable[torch.Tensor], device: torch.device, precision: str = "auto") -> float:
    """Mean next-token loss over the given (fixed) batches."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x in batches:
        with autocast(device, precision):
            total += float(model.loss(x.to(device)))
        n += 1
    model.train(was)
    return total / max(1, n)


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def train(
    cfg: RunConfig,
    batches: Callable[[int], torch.Tensor],
    device: str | torch.device = "cpu",
    report: Report = lambda m: None,
    *,
    val_batches: Iterable[torch.Tensor] | None = None,
    state: ckpt_lib.Checkpoint | None = None,
    save: Save | None = None,
    stop_after: int | None = None,
    wrap: Callable[[GPT], torch.nn.Module] | None = None,
    on_step: Callable[[int, GPT], None] | None = None,
    precision: str = "auto",
) -> TrainResult:
    """Train a sparse GPT for ``cfg.train.steps`` steps (or resume ``state`` to the end).

    ``stop_after`` ends the run early after that many steps (tests use it to interrupt
    a run); ``wrap`` lets a caller wrap the model for the forward/backward (DDP);
    ``on_step(step, model)`` runs after each step's weight projection; ``precision`` is
    one of :data:`PRECISIONS` (default: bf16 autocast on CUDA, fp32 on CPU).
    """
    tc, dev = cfg.train, resolve_device(device)
    autocast_dtype(dev, precision)  # a bad precision fails before any work
    set_matmul_precision(dev)
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(dev)
    optimizer = make_optimizer(model, cfg)
    sparsifier = WeightSparsifier(model, cfg.sparsity, tc.steps, seed=tc.seed)
    start = 0
    if state is not None:
        ckpt_lib.load_state(model, {k: v.to(dev) for k, v in state.model_state.items()}, where=state.meta.get("where", "checkpoint"))
        ts = state.train_state
        if ts is None:
            raise ckpt_lib.CheckpointError("checkpoint has no training state (train_state.pt); it can be evaluated, not resumed")
        optimizer.load_state_dict(ts["optimizer"])
        torch.set_rng_state(ts["rng"]["torch"])
        if "cuda" in ts["rng"] and dev.type == "cuda":
            torch.cuda.set_rng_state(ts["rng"]["cuda"], dev)
        sparsifier.gen.set_state(ts["sparsifier_gen"])
        start = int(ts["step"])
    net = wrap(model) if wrap is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    val = list(val_batches) if val_batches is not None else None
    micro = tc.micro_batches
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    metrics: dict = {}

    def checkpoint(step: int) -> None:
        if save is None:
            return
        train_state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "data_position": step * micro,
            "rng": _rng_state(dev),
            "sparsifier_gen": sparsifier.gen.get_state(),
        }
        save(ckpt_lib.to_files(model, cfg, step, {"metrics": dict(metrics)}, train_state), step)

    t_last, tokens_since = time.perf_counter(), 0
    model.train()
    for step in range(start, end):
        # 1. learning rate for this step
        lr = lr_at(step, tc, cfg.sparsity)
        for g in optimizer.param_groups:
            g["lr"] = lr
        # 2. evaluate and checkpoint (the state after `step` steps)
        if val is not None and tc.eval_every and step % tc.eval_every == 0 and step > start:
            metrics["val_loss"] = evaluate(model, val, dev, precision)
            report({"step": step, "val_loss": metrics["val_loss"]})
        if step > start and ((tc.ckpt_every and step % tc.ckpt_every == 0) or step in tc.milestones):
            checkpoint(step)
        # 3. micro-steps: forward + backward, gradients accumulate
        loss_sum = 0.0
        for m in range(micro):
            x = batches(step * micro + m).to(dev, non_blocking=True)
            with autocast(dev, precision):
                logits = net(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            (loss / micro).backward()
            loss_sum += float(loss.detach())
            tokens_since += x[:, 1:].numel()
        # 4. normalise gradients by their global RMS, 5. Adam step
        grad_rms = normalise_grads_(params, tc.grad_rms_eps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # 6. weight top-k: every matrix back to its scheduled nonzeros
        sparsifier.apply(step)
        if on_step is not None:
            on_step(step, model)
        # 7. log
        metrics["loss"] = loss_sum / micro
        if (step + 1) % tc.log_every == 0 or step + 1 == end:
            now = time.perf_counter()
            l0, _ = l0_at(step, tc.steps, cfg.sparsity)
            report({
                "step": step + 1, "loss": metrics["loss"], "lr": lr, "l0": l0, "grad_rms": grad_rms,
                "nonzeros": sum(sparsifier.nonzeros().values()),
                "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
            })
            t_last, tokens_since = now, 0
        if not math.isfinite(metrics["loss"]):
            from sparsity.errors import CspError

            raise CspError(f"training diverged at step {step + 1} (loss {metrics['loss']}); lower --lr")

    if end == tc.steps:
        if val is not None:
            metrics["val_loss"] = evaluate(model, val, dev, precision)
            report({"step": end, "val_loss": metrics["val_loss"]})
        metrics["nonzeros"] = sum(sparsifier.nonzeros().values())
    checkpoint(end)
    return TrainResult(model, end, dict(metrics))
