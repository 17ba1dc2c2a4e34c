"""Pruning cost for the demo-size model on this machine, and where it goes; prints one JSON object.

    python benchmarks/prune.py [--task single_double_quote] [--checkpoint CKPT] [--device cpu]
                               [--no-abstopk] [--variants plain,positions,exact,exact+stop] [--profile-steps 10]
                               [--repeats 1] [--smoke]

Model: the demo's d_model-128 model (``demo.full_plan()`` at ef 2: 2 layers, ctx 128, AbsTopK
at afrac 0.25), random init, on the stdlib tokenizer; ``--checkpoint``: a trained checkpoint
instead (e.g. the demo's ``csp-runs/sweep/runs/d128-p1_4-lr0.03/checkpoints/step-…``),
with its own tokenizer and data. Default PruneConfig (both targets), pruned even where the
model is at chance (``prune_anyway``).

Variants, each one whole (task, checkpoint) pair, timed in this one run:
  plain        the earlier path: every block at every position, gates as x·g + μ·(1 − g)
               with H(τ) per hook call, one τ parameter per location, all 400 mask steps;
  positions    the last block at the read positions only (keys and values excepted), gates as
               one lerp with H(τ) once per step, all τ in one tensor;
  exact        also each corrupt prompt run only from where it departs from its clean twin,
               both sides packed to their valid positions (GPT.read_pairs), and linear layers
               that skip the columns closed gates hold fixed (sparsity/skip.py): with
               ``positions``, the same masks, losses and k as plain;
  exact+stop   also stop mask training once it has converged (PruneConfig.stop_window).
Per variant: seconds per pair, its phases (setup, mask training, choosing k, verification,
the sufficiency controls, edges), mask steps run and the circuit; ratios against plain.
``--repeats N``: the variants take turns N times and each reports the median of its runs
(a machine's speed drifts over minutes; one run's ratio can move by a fifth).

Every variant runs with freed memory kept for reuse (sparsity/allocator.py: it is
process-wide, so the plain path gets it too and the ratios understate what was saved against
the earlier code; ``CSP_MALLOC=system`` runs all of them with the C library's defaults).

Per mask step (plain, positions and exact), at the masks of a training 80 steps in (most gates
closed, as for most of a run; the share still open is reported): forward and backward milliseconds; the share of the step in
gates, AbsTopK, attention and the MLP (torch.profiler, backward ops attributed to the forward
op that made them); the step's matmul and attention FLOPs (torch.utils.flop_counter) against
what this CPU does on a plain matmul of the MLP's shape.

``--smoke``: the same code on a d_model-32 model for 60 mask steps, in seconds (a test runs it).
"""

from __future__ import annotations

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsity import prune as prune_lib  # noqa: E402
from sparsity import scoring, skip  # noqa: E402
from sparsity.allocator import keep_freed_memory  # noqa: E402
from sparsity.config import PruneConfig  # noqa: E402
from sparsity.tasks import REGISTRY, TRAIN_SEED, encode, pair_loss  # noqa: E402

VARIANTS = ("plain", "positions", "exact", "exact+stop")
LABELS = ("gates", "abstopk", "attention", "mlp")


@contextlib.contextmanager
def _variant(model, name: str):
    """The model and gates as the variant runs them."""
    model.read_positions_only = name != "plain"
    prune_lib.Gates.fused = name != "plain"
    model.share_prefixes = skip.enabled = name not in ("plain", "positions")
    try:
        yield
    finally:
        model.read_positions_only, prune_lib.Gates.fused, model.share_prefixes, skip.enabled = True, True, True, True


def _load(args):
    """(model, tokenizer, mean ablation values, description)."""
    if args.checkpoint:
        from jobs import prune_pairs as pp

        loaded = pp.Loaded(args.checkpoint, device=args.device)
        model, mu, _ = loaded.inputs("mean")  # the node means the fan-out caches
        return model, loaded.tok, mu, loaded.meta["model_id"]
    from jobs import demo
    from sparsity import corpus, tokenizer
    from sparsity.config import RunConfig
    from sparsity.model import GPT

    plan = demo.full_plan(paper=not args.no_abstopk)
    mcfg = RunConfig.at_width(plan.base, plan.train, pfrac=1.0, ef=2.0).model
    if args.smoke:
        import dataclasses  # here, not at the top: it imports inspect → tokenize, which this folder shadows

        mcfg = dataclasses.replace(mcfg, d_model=32, d_mlp=128, n_head=2, d_head=16, block_size=64)
    files = corpus.list_files(None)
    tok = tokenizer.train(corpus.iter_texts(files[:300] if args.smoke else files))
    stream = []
    for text in corpus.iter_texts(files[:200]):
        stream += tok.encode(text) + [tok.eot_id]
    n = mcfg.block_size
    rows = np.array(stream[: 128 * (n + 1)]).reshape(128, n + 1)
    batches = [torch.from_numpy(rows[i : i + 16, :n].astype("int64")) for i in range(0, 128, 16)]
    torch.manual_seed(0)
    model = GPT(mcfg).to(args.device).eval()
    return model, tok, prune_lib.node_means(model, batches, args.device), "random init"


def _labelled(model):
    """Context: profiler ranges around the gates, AbsTopK, attention and MLP forwards."""
    from torch.profiler import record_function

    import sparsity.model as model_mod

    stack = contextlib.ExitStack()

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def labelled(*a, **kw):
            with record_function(f"csp::{label}"):
                return orig(*a, **kw)

        setattr(owner, attr, labelled)
        stack.callback(setattr, owner, attr, orig)

    wrap(model_mod, "abs_topk_parts_", "abstopk")
    wrap(model_mod.CausalSelfAttention, "forward", "attention")
    wrap(model_mod.CausalSelfAttention, "forward_at", "attention")
    wrap(model_mod.CausalSelfAttention, "forward_suffix", "attention")
    wrap(model_mod.MLP, "forward", "mlp")
    wrap(prune_lib.Gates, "masks", "gates")
    orig_fn = prune_lib.Gates._fn

    def fn(self, name):
        apply = orig_fn(self, name)

        def labelled(x):
            with record_function("csp::gates"):
                return apply(x)

        return labelled

    prune_lib.Gates._fn = fn
    stack.callback(setattr, prune_lib.Gates, "_fn", orig_fn)
    return stack


def _shares(prof) -> dict:
    """Milliseconds per label, forward and backward: each op's own time goes to its innermost
    csp:: range; a backward op goes where the forward op of the same sequence number went."""
    events = prof.events()
    fwd: dict[str, float] = {}
    bwd: dict[str, float] = {}
    seq_label: dict[int, str] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            continue
        label, p = "other", e
        while p is not None:
            if p.name.startswith("csp::"):
                label = p.name[5:]
                break
            if p.name.startswith("autograd::engine::evaluate_function"):
                label = None
                break
            p = p.cpu_parent
        if label is None:  # inside a backward function: counted there
            continue
        if e.sequence_nr >= 0 and e.sequence_nr not in seq_label:
            seq_label[e.sequence_nr] = label
        fwd[label] = fwd.get(label, 0.0) + e.self_cpu_time_total / 1000
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            label = seq_label.get(e.sequence_nr, "other")
            bwd[label] = bwd.get(label, 0.0) + e.cpu_time_total / 1000
    return {"forward": fwd, "backward": bwd}


WARM_STEPS = 80


def _warm_masks(model, mu, tokens, last, target, alt, cfg) -> dict[str, torch.Tensor]:
    """τ of every location after WARM_STEPS mask steps on the profiled batch."""
    gates = prune_lib.Gates(model, mu, cfg.surrogate_temp, cfg.init)
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    for _ in range(WARM_STEPS):
        masks = gates.masks()
        lc, lx = scoring.split_pairs(scoring.answer_logits(model, gates, tokens, last, masks=masks))
        loss = pair_loss(lc, lx, target, alt).mean() + cfg.k_coef * gates.l0(masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gates.clamp_and_sum()
    return {n: t.detach().clone() for n, t in gates.tau.items()}


def _step_profile(model, gates, tokens, last, target, alt, cfg, n: int) -> dict:
    """Per mask step: forward / backward ms, labelled shares, FLOPs."""
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr)

    def step(timing=None):
        t0 = time.perf_counter()
        masks = gates.masks()
        lc, lx = scoring.split_pairs(scoring.answer_logits(model, gates, tokens, last, masks=masks))
        loss = pair_loss(lc, lx, target, alt).mean() + cfg.k_coef * gates.l0(masks)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        if timing is not None:
            timing.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    for _ in range(3):
        step()
    timing: list = []
    for _ in range(n):
        step(timing)
    fwd, bwd, opt_s = (sum(t[i] for t in timing) / n * 1000 for i in range(3))
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    with _labelled(model), profile() as prof:
        for _ in range(3):
            step()
    sh = _shares(prof)
    total = sum(sh["forward"].values()) + sum(sh["backward"].values())
    share = {k: round((sh["forward"].get(k, 0) + sh["backward"].get(k, 0)) / total, 3) for k in (*LABELS, "other")}
    return {"open_gates_share": round(gates.n_open() / sum(t.numel() for t in gates.tau.values()), 3),
            "forward_ms": round(fwd, 1), "backward_ms": round(bwd, 1), "optimizer_ms": round(opt_s, 2),
            "step_ms": round(fwd + bwd + opt_s, 1), "share": share, "matmul_attention_gflop": round(flops / 1e9, 3),
            "achieved_gflops": round(flops / 1e9 / ((fwd + bwd + opt_s) / 1000), 2)}


def _matmul_rate(rows: int, d_in: int, d_out: int, device) -> float:
    """GFLOP/s of a plain (rows × d_in) @ (d_in × d_out) matmul on this device."""
    a, b = torch.randn(rows, d_in, device=device), torch.randn(d_in, d_out, device=device)
    for _ in range(3):
        a @ b
    n, t0 = 50, time.perf_counter()
    for _ in range(n):
        a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    return 2 * rows * d_in * d_out * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="single_double_quote", choices=list(REGISTRY))
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: the demo's d_model-128 config, random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-abstopk", action="store_true", help="AbsTopK off (demo.full_plan(paper=False))")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--profile-steps", type=int, default=10, help="mask steps timed per variant for the step profile (0: no step profile)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every variant this many times, taking turns (plain, exact+stop, plain, …): medians and their ratio")
    ap.add_argument("--smoke", action="store_true", help="a d_model-32 model, 60 mask steps: the code path in seconds")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: give 1 or more")
    if args.profile_steps < 0:
        ap.error(f"--profile-steps {args.profile_steps}: give a count of mask steps, 0 or more")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    dev = torch.device(args.device)
    malloc_tuned = keep_freed_memory()
    model, tok, mu, what = _load(args)
    for p in model.parameters():
        p.requires_grad_(False)
    task = REGISTRY[args.task]
    small = dict(steps=60, n_train=64, n_select=32, n_test=32, batch_pairs=16) if args.smoke else {}
    base = PruneConfig(prune_anyway=True, stop_window=0, **small)  # every step: plain and exact
    stop_cfg = PruneConfig(prune_anyway=True, **small, **({"stop_window": 15} if args.smoke else {}))  # the default rule

    # one mask step, profiled
    b = encode(task, tok, base.batch_pairs, TRAIN_SEED, model.config.block_size)
    tokens, last = scoring.joint(b)
    step_args = (tokens.to(dev), last.to(dev), b.target.to(dev), b.alt.to(dev), base, args.profile_steps)
    steps = {}
    # The step is profiled at the masks of a training WARM_STEPS in, where most steps run:
    # by then most gates have closed (what sparsity/skip.py saves on), where at the start
    # every gate is open.
    warm = _warm_masks(model, mu, *step_args[:4], base) if args.profile_steps else {}
    for v in ("plain", "positions", "exact") if args.profile_steps else ():
        with _variant(model, v):
            gates = prune_lib.Gates(model, mu, base.surrogate_temp, base.init)
            with torch.no_grad():
                for n, t in gates.tau.items():
                    t.copy_(warm[n])
            steps[v] = _step_profile(model, gates, *step_args)
    cfg = model.config
    rows = int(tokens.shape[0] * (last.float().mean() + 1))
    rate = _matmul_rate(rows, cfg.d_model, cfg.d_mlp, dev)

    # The machine's speed drifts by 10-25% over minutes: with --repeats the variants take
    # turns, and each reports the median of its runs (the circuit is the same every time).
    pairs: dict[str, dict] = {}
    for _ in range(args.repeats):
        for v in variants:
            with _variant(model, v):
                t0 = time.perf_counter()
                c = prune_lib.prune_targets(model, task, tok, stop_cfg if v == "exact+stop" else base, device=dev, ablate=mu)[0]
                m = c.metrics
                runs = pairs.get(v, {}).get("runs", []) + [round(time.perf_counter() - t0, 2)]
                pairs[v] = {"seconds_per_pair": round(float(np.median(runs)), 2), "runs": runs,
                            "phase_seconds": json.loads(m["phase_seconds"]),
                            "mask_steps": m["mask_steps"], "stop_reason": m["stop_reason"], "status": m["status"],
                            "n_nodes": len(c.nodes), "n_edges": c.n_edges}
    ref = pairs.get("plain")
    out = {
        "device": str(dev), "threads": torch.get_num_threads(), "malloc_keeps_freed_memory": malloc_tuned, "model": what,
        "shape": f"d_model {cfg.d_model} × {cfg.n_layer} layers, d_mlp {cfg.d_mlp}, ctx {cfg.block_size}, afrac {cfg.afrac}",
        "task": task.name, "prompt_tokens": int(tokens.shape[1]), "batch_pairs": base.batch_pairs, "mask_steps": base.steps,
        "stop_window": stop_cfg.stop_window, "pairs": pairs,
        "ratio_to_plain": {v: round(p["seconds_per_pair"] / ref["seconds_per_pair"], 3) for v, p in pairs.items()} if ref else None,
        "mask_step": steps, "mask_step_ratio": round(steps["exact"]["step_ms"] / steps["plain"]["step_ms"], 3) if steps else None,
        "plain_matmul_gflops": round(rate, 2),
        "mlp_matmul_shape": [rows, cfg.d_model, cfg.d_mlp],
        "step_share_of_matmul_rate": {v: round(s["achieved_gflops"] / rate, 3) for v, s in steps.items()} or None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
