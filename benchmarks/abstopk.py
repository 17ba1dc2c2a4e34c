"""AbsTopK implementations timed at the real shapes; prints one JSON object.

    python benchmarks/abstopk.py [--reps 7] [--steps 6] [--device cpu]

``new`` is ``sparsity.abstopk.abs_topk`` as installed: the C kernel on CPU where it was built
(``backend`` in the output says which), ``torch_ops`` the torch path it falls back to.

Shapes: d_model 256 × 4 layers, ctx 256, batch 8 (2048 rows per call), afrac 0.25, at each
of the 8 locations: the residual reads and writes and the attention q/k/v are 256 wide (q,
k, v are strided views of the fused c_attn output, as in the model), the MLP neurons 1024
(GELU outputs). Every candidate is exact (the k largest |x|, ties to the lowest index)
except ``old``, the scatter/gather implementation this replaced, whose ties fall wherever
``topk`` puts them. Each is timed without grad (pruning, evaluation), forward with grad,
and forward + backward of a random upstream gradient; candidates alternate within every
repetition so drift in machine speed hits all alike, and the medians are reported.

Then whole training steps (forward, backward, optimizer; no weight projection) of the
model with AbsTopK at all 8 locations as the model runs it (``new``: in place on the
kernel, ``sparsity.abstopk.abs_topk_parts_``), through ``old``, and with AbsTopK off, alternating the three. ``torch.compile`` is not a
candidate here: on CPU a compiled 31-step bisection ran slower than ``topk`` and compiled
for 10-25 s per shape.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsity.abstopk as abstopk_lib  # noqa: E402
import sparsity.model as model_mod  # noqa: E402
from benchmarks._steps import sync as _sync  # noqa: E402
from benchmarks._steps import timed_step  # noqa: E402
from sparsity.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from sparsity.model import GPT  # noqa: E402
from sparsity.train import make_optimizer, resolve_device  # noqa: E402

NEW = model_mod.abs_topk_parts_
SHAPE = dict(d_model=256, n_head=16, d_head=16, d_mlp=1024, n_layer=4, block_size=256, afrac=0.25)  # train_step.py's model


def old(x: torch.Tensor, k: int) -> torch.Tensor:
    """The implementation before: topk indices, then gather/scatter (ties: topk's order)."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def _ties_low_index(a: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    gt, eq = a > kth, a == kth
    need = k - gt.sum(-1, keepdim=True, dtype=torch.int32)
    return gt | (eq & (eq.to(torch.int32).cumsum(-1, dtype=torch.int32) <= need))


def _mask_from_kth(a: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    keep = a >= kth
    if bool((keep.sum(-1, dtype=torch.int32) != k).any()):
        keep = _ties_low_index(a, kth, k)
    return keep


def topk_where(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest |x| from topk values, compare, ``torch.where`` (autograd keeps the mask)."""
    a = x.detach().abs()
    kth = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.where(_mask_from_kth(a, kth, k), x, 0)


def topk_mul(x: torch.Tensor, k: int) -> torch.Tensor:
    """As ``topk_where`` but ``x * mask`` (NaN where an inf is dropped; not guarded here)."""
    a = x.detach().abs()
    kth = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return x * _mask_from_kth(a, kth, k)


class _MaskMul(torch.autograd.Function):
    """A custom autograd Function saving only the bool mask; backward is grad * mask."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep, None


def topk_function(x: torch.Tensor, k: int) -> torch.Tensor:
    a = x.detach().abs()
    kth = a.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return _MaskMul.apply(x, _mask_from_kth(a, kth, k))


def topk_scatter(x: torch.Tensor, k: int) -> torch.Tensor:
    """``old`` made exact: one compare checks for ties at the k-th |x|; only rows' ties
    force the mask path, else the scatter/gather output of ``old``."""
    a = x.detach().abs()
    vals, idx = a.topk(k, dim=-1, sorted=False)
    kth = vals.amin(-1, keepdim=True)
    if bool(((a >= kth).sum(-1, dtype=torch.int32) != k).any()):
        return torch.where(_ties_low_index(a, kth, k), x, 0)
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def kthvalue_mul(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| from ``kthvalue`` (one value per row), then as ``topk_mul``."""
    a = x.detach().abs()
    kth = a.kthvalue(a.shape[-1] - k + 1, dim=-1, keepdim=True).values
    return x * _mask_from_kth(a, kth, k)


def stable_sort(x: torch.Tensor, k: int) -> torch.Tensor:
    """Stable sort of -|x|; the first k (the tie rule by construction)."""
    a = x.detach().abs()
    idx = torch.sort(-a, dim=-1, stable=True).indices[..., :k]
    return torch.where(torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True), x, 0)


def radix(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact radix select on the float bits of |x|: a 128-bucket histogram (scatter_add)
    over the 8 octaves below each row's max, then 128 sub-buckets of the bucket holding
    the k-th, and so on, each pass only on rows still undecided; topk for rows whose k-th
    lies below the window, the index rule for exact ties."""
    n = x.shape[-1]
    xf = x.detach().reshape(-1, n).float().contiguous()
    R = xf.shape[0]
    bits = xf.view(torch.int32) & 0x7FFFFFFF  # |x| as int32, same order
    top = bits.amax(-1, keepdim=True)
    nb, shifts = 128, (19, 12, 5, 0)
    lo = ((top >> shifts[0]) - (nb - 1)).clamp_(min=0) << shifts[0]
    thr, rows, sub, ties, slow = torch.empty_like(top), torch.arange(R), bits, [], []
    ones = torch.ones(R, n, dtype=torch.int32)
    for p, s in enumerate(shifts):
        nb = 32 if p == 3 else 128
        idx = (sub - (lo - (1 << s))).__irshift__(s).clamp_(0, nb + 1).long()
        hist = torch.zeros(sub.shape[0], nb + 2, dtype=torch.int32).scatter_add_(-1, idx, ones[: sub.shape[0]])
        P = hist.cumsum(-1, dtype=torch.int32)
        j = (P[:, :-1] <= n - k).sum(-1, keepdim=True)
        edge = lo + ((j.to(torch.int32) - 1) << s)
        done = (hist.gather(-1, j) == k - n + P.gather(-1, j)).view(-1)
        below = (j == 0).view(-1)
        thr[rows[done]] = edge[done]
        slow.append(rows[below])
        keep = ~(done | below)
        if s == 0:
            ties.append((rows[keep], edge[keep]))
            break
        if not bool(keep.any()):
            break
        rows, lo, sub = rows[keep], edge[keep], bits.index_select(0, rows[keep])
    mask = bits >= thr
    for r, te in ties:
        mask[r] = _ties_low_index(bits.index_select(0, r), te.view(-1, 1), k)
    for r in slow:
        if len(r):
            b = bits.index_select(0, r)
            mask[r] = _ties_low_index(b, b.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True), k)
    return x * mask.view(x.shape)


def torch_ops(x: torch.Tensor, k: int) -> torch.Tensor:
    """The torch-ops path of ``sparsity.abstopk`` (what runs where the C kernel is not built)."""
    return abstopk_lib._abs_topk_torch(x, k)


CANDIDATES = {"old": old, "new": abstopk_lib.abs_topk, "torch_ops": torch_ops, "topk_where": topk_where, "topk_mul": topk_mul, "topk_function": topk_function,
              "topk_scatter": topk_scatter, "kthvalue_mul": kthvalue_mul, "stable_sort": stable_sort, "radix": radix}




def _inputs(cfg: ModelConfig, batch: int, dev: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per location: a leaf to take grads at and the tensor AbsTopK sees (q/k/v: strided views)."""
    g = torch.Generator().manual_seed(0)
    T, dims = cfg.block_size, cfg.loc_dims()
    qkv = torch.randn(batch, T, 3 * cfg.d_attn, generator=g).to(dev).requires_grad_()
    q, k, v = qkv.split(cfg.d_attn, dim=2)
    out = {"attn_q": (qkv, q), "attn_k": (qkv, k), "attn_v": (qkv, v)}
    for loc in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        leaf = torch.randn(batch, T, dims[loc], generator=g).to(dev).requires_grad_()
        out[loc] = (leaf, leaf)
    pre = torch.randn(batch, T, dims["mlp_neuron"], generator=g).to(dev).requires_grad_()
    out["mlp_neuron"] = (pre, pre)  # GELU applied inside the timed call's input below
    return out


def time_locations(cfg: ModelConfig, batch: int, reps: int, dev: torch.device) -> dict:
    dims, res = cfg.loc_dims(), {}
    for loc, (leaf, view) in _inputs(cfg, batch, dev).items():
        k = int(cfg.afrac * dims[loc])
        if loc == "mlp_neuron":
            with torch.no_grad():
                view = F.gelu(view)
            leaf = view = view.requires_grad_()
        grad = torch.randn_like(view)
        ts = {(name, m): [] for name in CANDIDATES for m in ("no_grad", "fwd", "fwd_bwd")}
        names = list(CANDIDATES)
        for r in range(reps + 1):  # the first repetition warms up
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                f = CANDIDATES[name]
                with torch.no_grad():
                    _sync(dev)
                    t0 = time.perf_counter()
                    f(view, k)
                    _sync(dev)
                t1 = time.perf_counter()
                y = f(view, k)
                _sync(dev)
                t2 = time.perf_counter()
                y = f(view, k)
                y.backward(grad)
                _sync(dev)
                t3 = time.perf_counter()
                leaf.grad = None
                if r:
                    ts[(name, "no_grad")].append(t1 - t0)
                    ts[(name, "fwd")].append(t2 - t1)
                    ts[(name, "fwd_bwd")].append(t3 - t2)
        res[loc] = {"width": dims[loc], "k": k, **{name: {m: round(statistics.median(ts[(name, m)]) * 1e3, 3)
                                                          for m in ("no_grad", "fwd", "fwd_bwd")} for name in CANDIDATES}}
    return res


def time_steps(cfg: ModelConfig, batch: int, steps: int, dev: torch.device) -> dict:
    """Training steps with AbsTopK new / old / off, alternating; each variant its own model."""
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    runs = {}
    for name, mcfg in (("new", cfg), ("old", cfg), ("off", ModelConfig(**{**SHAPE, "afrac": None}))):
        torch.manual_seed(0)
        model = GPT(mcfg).to(dev)
        runs[name] = (model, make_optimizer(model, RunConfig(model=mcfg, train=TrainConfig(steps=1000))), [])

    def one_step(name: str) -> None:
        model, opt, t = runs[name]
        model_mod.abs_topk_parts_ = abstopk_lib.per_part(old) if name == "old" else NEW
        try:
            t.append(timed_step(model, opt, x, dev))
        finally:
            model_mod.abs_topk_parts_ = NEW

    order = list(runs)
    for i in range(steps + 2):  # 2 warm-up rounds
        for name in order[i % 3:] + order[: i % 3]:
            one_step(name)
    ms = {name: statistics.median(t[2:]) * 1e3 for name, (_, _, t) in runs.items()}
    return {"ms_per_step": {n: round(v, 1) for n, v in ms.items()},
            "min_ms_per_step": {name: round(min(t[2:]) * 1e3, 1) for name, (_, _, t) in runs.items()},
            "step_ratio_on_over_off": {"new": round(ms["new"] / ms["off"], 3), "old": round(ms["old"] / ms["off"], 3)},
            "step_ratio_new_over_old": round(ms["new"] / ms["old"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per location and candidate")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per variant (after 2 warm-up rounds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    cfg = ModelConfig(**SHAPE)
    t0 = time.perf_counter()
    locs = time_locations(cfg, args.batch, args.reps, dev)
    # per model forward: every location once per layer
    total = {name: {m: round(sum(v[name][m] for v in locs.values()) * cfg.n_layer, 1) for m in ("no_grad", "fwd", "fwd_bwd")}
             for name in CANDIDATES}
    out = {"device": str(dev), "threads": torch.get_num_threads(), "backend": abstopk_lib.backend(), "shape": f"d_model 256 × 4 layers, ctx 256, batch {args.batch}, afrac 0.25",
           "per_location_ms": locs, "per_model_forward_ms": total,
           "over_old": {name: {m: round(total[name][m] / total["old"][m], 3) for m in total[name]} for name in CANDIDATES}}
    out["steps"] = time_steps(cfg, args.batch, args.steps, dev)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
