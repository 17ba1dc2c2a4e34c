"""Sparse vs dense training step on CPU (or CUDA); prints one JSON object.

    python benchmarks/train_step.py [--steps 8] [--device cpu] [--pfrac 0.0625] [--optimizer muon] [--share-pairs 30]

Shape: d_model 256, 4 layers, ctx 256, batch 16 (a CPU-sized model). Both models have
the same shape and AbsTopK; the sparse one also projects every matrix to its top-k after
each step (density past the anneal). Steps alternate sparse/dense so drift in machine speed
hits both alike; the projection is timed on its own too, as a share of the sparse step.
"""

from __future__ import annotations

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)
import torch  # noqa: E402

from benchmarks._steps import sync as _sync  # noqa: E402
from benchmarks._steps import timed_step  # noqa: E402
from sparsity.config import ModelConfig, RunConfig, SparsityConfig, TrainConfig  # noqa: E402
from sparsity.model import GPT  # noqa: E402
from sparsity.topk import WeightSparsifier  # noqa: E402
from sparsity.train import autocast, make_optimizer, resolve_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pfrac", type=float, default=1 / 16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "muon"], help="the optimizer both models step with")
    ap.add_argument("--afrac", type=float, default=0.25, help="AbsTopK fraction at all 8 locations (0 = off)")
    ap.add_argument("--share-pairs", type=int, default=60, help="forward pairs (AbsTopK on, then off, or the reverse) timed for its share")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    mcfg = ModelConfig(d_model=256, n_head=16, d_head=16, d_mlp=1024, n_layer=4, block_size=256, afrac=args.afrac or None)
    steps_total = 1000
    x = torch.randint(0, mcfg.vocab_size, (args.batch, mcfg.block_size + 1), generator=torch.Generator().manual_seed(0)).to(dev)

    runs = {}
    for name, pfrac in (("sparse", args.pfrac), ("dense", 1.0)):
        cfg = RunConfig(model=mcfg, sparsity=SparsityConfig(pfrac=pfrac), train=TrainConfig(steps=steps_total, optimizer=args.optimizer))
        torch.manual_seed(0)
        model = GPT(mcfg).to(dev)
        opt = make_optimizer(model, cfg)
        sp = WeightSparsifier(model, cfg.sparsity, steps_total)
        runs[name] = (model, opt, sp, {"step": [], "project": []})

    def one_step(name: str, step: int) -> None:
        model, opt, sp, t = runs[name]
        t0 = time.perf_counter()
        timed_step(model, opt, x, dev)
        t1 = time.perf_counter()
        sp.apply(step)  # a no-op for the dense model (k = numel)
        _sync(dev)
        t2 = time.perf_counter()
        t["step"].append(t2 - t0)
        t["project"].append(t2 - t1)

    step = 600  # past the anneal: the sparse model sits at its target density
    for i in range(args.steps + 2):
        for name in (("sparse", "dense") if i % 2 == 0 else ("dense", "sparse")):  # alternate who goes first
            one_step(name, step + i)
    tokens = args.batch * mcfg.block_size
    out = {"device": str(dev), "threads": torch.get_num_threads(), "shape": f"d_model 256 × 4 layers, ctx 256, batch {args.batch}",
           "pfrac": args.pfrac, "afrac": args.afrac, "optimizer": args.optimizer}
    for name, (_, _, sp, t) in runs.items():
        ms = statistics.median(t["step"][2:]) * 1e3
        proj = statistics.median(t["project"][2:]) * 1e3
        nz = sum(sp.nonzeros().values())
        compute = statistics.median([a - b for a, b in zip(t["step"][2:], t["project"][2:], strict=True)]) * 1e3
        out[name] = {"ms_per_step": round(ms, 1), "fwd_bwd_optimizer_ms": round(compute, 1), "tokens_per_s": round(tokens / ms * 1e3), "projection_ms": round(proj, 2),
                     "projection_share": round(proj / ms, 4), "nonzero_weights": nz}
    out["sparse_over_dense_step_ratio"] = round(out["sparse"]["ms_per_step"] / out["dense"]["ms_per_step"], 3)
    if args.afrac:
        out["abstopk"] = _abstopk_share(runs["sparse"][0], x, dev, args.share_pairs, args.steps)
    print(json.dumps(out, indent=2))


def _abstopk_share(model, x, dev, pairs: int, reps: int) -> dict:
    """AbsTopK's share of a forward (with grad) of the sparse model, as the model runs it (in
    place on the kernel): pairs of forwards, one as is and one with every AbsTopK location
    replaced by the identity, back to back in alternating order; the share is the median over
    pairs of 1 - off/on, with its quartiles. Pairing cancels the slow drifts in machine speed
    that a ratio of two separate medians picks up (±30% between runs on a shared 2-core VM);
    the garbage collector is off inside each timed forward, as ``timeit`` does. Also the
    median share of each forward's time spent inside the AbsTopK calls (a direct reading, without the run-to-run noise of a
    difference; it leaves out any effect on the ops around them). And the AbsTopK op itself
    against one plain ``torch.topk`` of |x| at the model's own shapes."""
    from sparsity import abstopk as abstopk_lib
    from sparsity import model as model_lib

    real, parts = abstopk_lib.abs_topk, model_lib.abs_topk_parts_
    identity_parts = abstopk_lib.per_part(lambda t, k: t)
    idx = x[:, :-1]
    inside = [0.0]

    def timed_parts(t: torch.Tensor, ks):  # AbsTopK as the model runs it, its time summed
        t0 = time.perf_counter()
        out = parts(t, ks)
        _sync(dev)
        inside[0] += time.perf_counter() - t0
        return out

    def fwd(identity: bool) -> float:
        model_lib.abs_topk_parts_ = identity_parts if identity else timed_parts
        inside[0] = 0.0
        gc.collect()
        gc.disable()
        try:
            _sync(dev)
            t0 = time.perf_counter()
            with autocast(dev):
                model(idx)
            _sync(dev)
            return time.perf_counter() - t0
        finally:
            gc.enable()
            model_lib.abs_topk_parts_ = parts

    on, off, within = [], [], []
    for i in range(pairs + 2):  # 2 warm-up pairs
        for identity in ((False, True) if i % 2 == 0 else (True, False)):
            t = fwd(identity)
            (off if identity else on).append(t)
            if not identity:
                within.append(inside[0] / t)
    on, off, within = on[2:], off[2:], within[2:]
    shares = [1 - b / a for a, b in zip(on, off, strict=True)]
    q1, med, q3 = statistics.quantiles(shares, n=4)
    cfg = model.config
    shapes = [(int(cfg.afrac * d), d) for loc, d in cfg.loc_dims().items() if loc in cfg.loctypes]
    ratio = None
    if shapes:
        a = torch.randn(idx.shape[0] * idx.shape[1], max(d for _, d in shapes), device=dev)
        ours, plain = [], []
        for _ in range(reps):
            for k, d in shapes:
                t = a[:, :d].contiguous()
                _sync(dev)
                t0 = time.perf_counter()
                real(t, k)
                _sync(dev)
                t1 = time.perf_counter()
                t.abs().topk(k, dim=-1, sorted=False)
                _sync(dev)
                ours.append(t1 - t0)
                plain.append(time.perf_counter() - t1)
        ratio = round(sum(ours) / sum(plain), 3)
    return {"forward_ms": round(statistics.median(on) * 1e3, 1), "forward_without_abstopk_ms": round(statistics.median(off) * 1e3, 1),
            "pairs": len(shares), "share_of_forward": round(med, 3), "share_of_forward_quartiles": [round(q1, 3), round(q3, 3)],
            "share_of_forward_inside_abstopk": round(statistics.median(within), 3),
            "abstopk_over_torch_topk": ratio}


if __name__ == "__main__":
    main()
