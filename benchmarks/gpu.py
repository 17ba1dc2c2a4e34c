"""The GPU path proven in one prepared command; prints one JSON object.

    python benchmarks/gpu.py [--device cuda] [--train-seconds 150] [--task single_double_quote]
    python benchmarks/gpu.py --device cpu --smoke     # the same code path at tiny sizes (~15 s, 2 cores)

Needs no network and nothing outside ``sparsity/`` and its packages (torch, numpy, tiktoken,
safetensors, rustbpe — the last trains the BPE; carry its wheel to a machine without it):
the data is the running interpreter's standard library, and everything written goes to a
temporary directory. Progress goes to stderr, the JSON to stdout. The full run is sized
(from CPU figures; not yet timed on a GPU) for about 5 minutes on one H100, 150 s of it
training. Three sections, each timed (``seconds``):

1. ``invariants``, on the device: after the weight top-k every matrix has exactly its
   scheduled nonzeros and every unit its floor (also where the floor binds); AbsTopK keeps
   exactly k at all 8 locations under the step's autocast, and on bf16 input full of ties;
   the top-k masks computed on the device equal CPU's on the same weights (up to ties:
   the kept magnitudes are the same multiset), on fp32 weights and on bf16-rounded ones
   (ties everywhere, the exact fallback); a short training run keeps all of it after every
   step, in fp32 master weights, with a finite loss.
2. ``step_timing``: dense vs sparse steps of the real loop (``sparsity.train.train``) at
   d_model 512 × 4 layers, ctx 512: tokens/s, model FLOPs utilisation (6·N + attention
   FLOPs per token over the device's peak dense bf16 FLOP/s) and the sparse/dense ratio,
   both measured in this run; the weight projection timed on its own too.
3. ``train_prune``: a small sparse model trained for ``--train-seconds`` on the stdlib
   (BPE trained here, rows packed here), saved as a checkpoint, loaded back and pruned for
   one task: losses, the full model's verdict, the circuit's status and size.

Exit status 1 when an invariant fails or a section raises (the JSON says which).
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402  (not dataclasses: it imports inspect → tokenize)

import _bootstrap  # noqa: F401  (first: fixes sys.path before anything imports `tokenize`)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from sparsity import checkpoint_format as ckpt_lib  # noqa: E402
from sparsity import corpus, tokenizer  # noqa: E402
from sparsity import prune as prune_lib  # noqa: E402
from sparsity.batches import FixedBatches, TokenRows  # noqa: E402
from sparsity.config import HOOK_OF, ModelConfig, RunConfig, SparsityConfig, TrainConfig  # noqa: E402
from sparsity.hooks import run_with_cache  # noqa: E402
from sparsity.model import GPT, abs_topk  # noqa: E402
from sparsity.tasks import REGISTRY  # noqa: E402
from sparsity.topk import Target, WeightSparsifier, project_, sparse_targets  # noqa: E402
from sparsity.train import autocast, autocast_dtype, resolve_device, train  # noqa: E402

# Dense bf16 tensor-core peak (no 2:4 sparsity) from the vendor's data sheets, by a substring
# of torch.cuda.get_device_name(); the first match wins. Anything else: pass --peak-tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


class Plan(NamedTuple):
    """The sizes of one run: the full one for a GPU, the smoke one for 2 CPU cores."""

    bench: ModelConfig  # the timed shape (and the one the invariants are checked on)
    batch: int  # sequences per timed step
    warmup: int  # untimed steps before the timed ones (allocator, cuBLAS/cuDNN heuristics)
    timed: int
    pfrac: float  # the sparse model's density in the timing (train_step.py's 1/16)
    check_steps: int  # steps of the invariant-checked training run
    small: ModelConfig  # trained on the stdlib and pruned
    small_batch: int
    small_pfrac: float
    train_seconds: float
    probe_steps: int  # steps timed first, to size the run to train_seconds
    min_steps: int
    max_steps: int
    corpus_every: int  # encode every n-th train file (1: all ~10M tokens)
    mean_rows: int  # pretraining rows the pruning's mean ablation averages over
    prune: prune_lib.PruneConfig


FULL = Plan(
    bench=ModelConfig(d_model=512, n_head=32, d_head=16, d_mlp=2048, n_layer=4, block_size=512),
    batch=32, warmup=5, timed=30, pfrac=1 / 16, check_steps=20,
    # the demo's size (d_model 128 × 2 layers, ctx 128) at density 1/8, which learns
    # the quote task on 2 CPU cores in minutes: on a GPU the same minutes are ~20× the tokens.
    small=ModelConfig(d_model=128, n_head=8, d_head=16, d_mlp=512, n_layer=2, block_size=128),
    small_batch=64, small_pfrac=1 / 8, train_seconds=150.0, probe_steps=40, min_steps=200, max_steps=20000,
    corpus_every=1, mean_rows=256,
    # The library's defaults; pruned even if the model misses the target, so the whole
    # pruning path runs on the device whatever the model learnt (the verdict says which).
    prune=prune_lib.PruneConfig(prune_anyway=True),
)
SMOKE = Plan(
    bench=ModelConfig(d_model=32, n_head=2, d_head=16, d_mlp=128, n_layer=2, block_size=32),
    batch=4, warmup=2, timed=4, pfrac=1 / 16, check_steps=6,
    small=ModelConfig(d_model=32, n_head=2, d_head=16, d_mlp=128, n_layer=1, block_size=64),
    small_batch=8, small_pfrac=1 / 4, train_seconds=4.0, probe_steps=12, min_steps=10, max_steps=40,
    corpus_every=25, mean_rows=32,
    # `csp demo --quick`'s pruning sizes: every stage runs, in seconds.
    prune=prune_lib.PruneConfig(target=3.0, steps=10, batch_pairs=8, n_train=16, n_select=8, n_test=16, prune_anyway=True),
)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_info(dev: torch.device) -> dict:
    info = {"device": str(dev), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info |= {"device_name": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda,
                 "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1)}
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def peak_tflops(dev: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


# ---------------------------------------------------------------------------- 1. invariants


def _k_and_floor(model: nn.Module, ks: dict[str, int], floor: int) -> dict:
    """Per matrix: nonzeros vs scheduled k, and units under the floor (read from the weights)."""
    wrong_k, under_floor, fp32 = {}, {}, True
    for t in sparse_targets(model):
        nz = t.param.detach() != 0
        n = int(nz.sum())
        if n != ks[t.name]:
            wrong_k[t.name] = [n, ks[t.name]]
        if t.units_dim is not None and floor:
            low = int((nz.sum(dim=1 - t.units_dim) < min(floor, t.param.shape[1 - t.units_dim])).sum())
            if low:
                under_floor[t.name] = low
        fp32 &= t.param.dtype == torch.float32
    return {"wrong_k": wrong_k, "under_floor": under_floor, "fp32_master_weights": fp32}


def check_weight_topk(model: GPT, plan: Plan) -> dict:
    """A fresh projection leaves exactly k nonzeros per matrix and the floor, at the target
    density and at one so low that the floor raises k."""
    out = {}
    for label, pfrac in (("target_density", plan.pfrac), ("floor_binds", 1 / 256)):
        m = GPT(model.config).to(next(model.parameters()).device)
        m.load_state_dict(model.state_dict())
        sp_cfg = SparsityConfig(pfrac=pfrac)
        ws = WeightSparsifier(m, sp_cfg, 100)
        ks = ws.ks(99)
        ws.apply(99)
        r = _k_and_floor(m, ks, sp_cfg.min_per_unit)
        r["floor_raised_k"] = sum(k > round(sp_cfg.l0frac * t.param.numel()) for t, k in zip(ws.targets, ks.values(), strict=True) if t.kind == "block")
        r["passed"] = not r["wrong_k"] and not r["under_floor"] and r["fp32_master_weights"]
        out[label] = r
    out["passed"] = all(r["passed"] for r in out.values())
    return out


def check_abs_topk(model: GPT, dev: torch.device, precision: str) -> dict:
    """Exactly int(afrac·width) nonzeros per position at every AbsTopK location, under the
    autocast of a training step; and exactly k of bf16 input whose magnitudes tie."""
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad(), autocast(dev, precision):
        _, cache = run_with_cache(model.eval(), x)
    model.train()
    wrong = {}
    for layer in range(cfg.n_layer):
        for loc, hook in HOOK_OF.items():
            k = int(cfg.afrac * cfg.loc_dims()[loc])
            counts = (cache[f"{layer}.{hook}"] != 0).sum(-1)
            if not bool((counts == k).all()):
                wrong[f"{layer}.{loc}"] = [int(counts.min()), int(counts.max()), k]
    # Ties: magnitudes in {1, 2, 3} with random signs, in bf16 on the device.
    g = torch.Generator().manual_seed(2)
    ties = (torch.randint(1, 4, (64, 256), generator=g) * (torch.randint(0, 2, (64, 256), generator=g) * 2 - 1)).to(torch.bfloat16).to(dev)
    kept = (abs_topk(ties, 64) != 0).sum(-1)
    tie_ok = bool((kept == 64).all())
    return {"activation_dtype": str(cache["0.attn.q"].dtype).replace("torch.", ""), "wrong_k": wrong, "ties_exact_k": tie_ok,
            "passed": not wrong and tie_ok}


def check_cpu_agreement(model: GPT, dev: torch.device, plan: Plan) -> dict:
    """The projection's masks on the device and on CPU, for the same weights and k: both keep
    exactly k, and the same multiset of magnitudes (two correct top-k masks can differ only
    among equal values); ``mask_mismatches`` counts entries where they differ at all."""
    sp_cfg = SparsityConfig(pfrac=plan.pfrac)
    ks = WeightSparsifier(model, sp_cfg, 100).ks(99)
    out = {}
    for label, cast in (("fp32_weights", lambda w: w), ("bf16_rounded_weights", lambda w: w.to(torch.bfloat16).float())):
        bad, mismatches = [], 0
        for t in sparse_targets(model):
            w = cast(t.param.detach().float())
            masks = []
            for where in (dev, torch.device("cpu")):
                p = nn.Parameter(w.detach().to(where).clone(), requires_grad=False)
                project_(Target(t.name, p, t.kind, t.units_dim), ks[t.name], sp_cfg.min_per_unit, torch.Generator().manual_seed(0))
                masks.append((p != 0).cpu())
            m_dev, m_cpu = masks
            a = w.abs().cpu()
            same = int(m_dev.sum()) == int(m_cpu.sum()) == ks[t.name] and torch.equal(a[m_dev].sort().values, a[m_cpu].sort().values)
            if not same:
                bad.append(t.name)
            mismatches += int((m_dev ^ m_cpu).sum())
        out[label] = {"matrices": len(ks), "disagree": bad, "mask_mismatches": mismatches, "passed": not bad}
    out["passed"] = all(r["passed"] for r in out.values())
    return out


def check_training(plan: Plan, dev: torch.device, precision: str) -> dict:
    """A short annealing run on random tokens: after every step each matrix has exactly its
    scheduled k (fp32 master weights) and the floor; the loss stays finite."""
    steps = plan.check_steps
    cfg = RunConfig(model=plan.small, sparsity=SparsityConfig(pfrac=plan.small_pfrac, anneal_start=0.0, anneal_end=0.5),
                    train=TrainConfig(steps=steps, batch_size=plan.small_batch, eval_every=0, ckpt_every=0, log_every=1))
    rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (plan.small_batch * 4, cfg.model.block_size + 1), dtype=np.int64)
    failures, reports = [], []

    def check(step: int, model: GPT) -> None:
        ks = WeightSparsifier(model, cfg.sparsity, steps).ks(step)
        r = _k_and_floor(model, ks, cfg.sparsity.min_per_unit)
        if r["wrong_k"] or r["under_floor"] or not r["fp32_master_weights"]:
            failures.append({"step": step, **r})

    train(cfg, TokenRows(rows, plan.small_batch), dev, reports.append, on_step=check, precision=precision)
    losses = [r["loss"] for r in reports if "loss" in r]
    finite = len(losses) == steps and all(math.isfinite(v) for v in losses)
    return {"steps": steps, "failures": failures[:3], "loss_first": losses[0], "loss_last": losses[-1],
            "loss_finite": finite, "passed": not failures and finite}


def invariants(plan: Plan, dev: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    model = GPT(plan.bench).to(dev)
    out = {"weight_topk": check_weight_topk(model, plan), "abs_topk": check_abs_topk(model, dev, precision),
           "cpu_vs_device_masks": check_cpu_agreement(model, dev, plan), "training": check_training(plan, dev, precision)}
    out["passed"] = all(r["passed"] for r in out.values())
    return out


# ---------------------------------------------------------------------------- 2. step timing


def flops_per_token(m: ModelConfig) -> float:
    """6·N (forward + backward of every matmul weight: the blocks' and the unembedding; the
    embeddings are lookups) plus attention's 12·n_layer·d_attn·T (QKᵀ and AV, forward and
    backward, counted over the full context as nanoGPT's and PaLM's MFU do)."""
    n_block = m.n_layer * (m.d_model * 3 * m.d_attn + m.d_attn * m.d_model + 2 * m.d_model * m.d_mlp)
    return 6.0 * (n_block + m.d_model * m.vocab_size) + 12.0 * m.n_layer * m.d_attn * m.block_size


def time_run(plan: Plan, dev: torch.device, pfrac: float, precision: str, optimizer: str, peak: float | None) -> dict:
    """Steps of the real loop on random tokens, past the anneal (the sparse model at its
    target density from step 1); wall time between consecutive steps' ends, synchronised."""
    m = plan.bench
    steps = plan.warmup + plan.timed
    cfg = RunConfig(model=m, sparsity=SparsityConfig(pfrac=pfrac, anneal_start=0.0, anneal_end=0.0),
                    train=TrainConfig(steps=steps, batch_size=plan.batch, optimizer=optimizer, eval_every=0, ckpt_every=0, log_every=steps))
    rows = np.random.default_rng(0).integers(0, m.vocab_size, (plan.batch * 4, m.block_size + 1), dtype=np.int64)
    stamps: list[float] = []

    def stamp(step: int, model: GPT) -> None:
        sync(dev)
        stamps.append(time.perf_counter())

    res = train(cfg, TokenRows(rows, plan.batch), dev, on_step=stamp, precision=precision)
    s = statistics.median(b - a for a, b in zip(stamps[plan.warmup - 1 : -1], stamps[plan.warmup :], strict=True))
    # The projection alone, on the trained weights (the same work as inside the step).
    ws = WeightSparsifier(res.model, cfg.sparsity, steps)
    proj = []
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        ws.apply(steps - 1)
        sync(dev)
        proj.append(time.perf_counter() - t0)
    tokens = plan.batch * m.block_size
    tps = tokens / s
    achieved = tps * flops_per_token(m) / 1e12
    return {"ms_per_step": round(s * 1e3, 2), "tokens_per_s": round(tps), "achieved_tflops": round(achieved, 2),
            "mfu": round(achieved / peak, 4) if peak else None, "projection_ms": round(statistics.median(proj) * 1e3, 2),
            "projection_share": round(statistics.median(proj) / s, 4), "nonzero_weights": sum(ws.nonzeros().values()),
            "loss_last": round(res.metrics["loss"], 4)}


def step_timing(plan: Plan, dev: torch.device, precision: str, optimizer: str, peak: float | None) -> dict:
    m = plan.bench
    out = {"shape": f"d_model {m.d_model} × {m.n_layer} layers, ctx {m.block_size}, batch {plan.batch}, afrac {m.afrac}",
           "optimizer": optimizer, "sparse_pfrac": plan.pfrac, "timed_steps": plan.timed,
           "model_flops_per_token": flops_per_token(m), "peak_bf16_tflops": peak}
    for name, pfrac in (("dense", 1.0), ("sparse", plan.pfrac)):
        log(f"timing {name} steps")
        out[name] = time_run(plan, dev, pfrac, precision, optimizer, peak)
    out["sparse_over_dense_tokens_per_s"] = round(out["sparse"]["tokens_per_s"] / out["dense"]["tokens_per_s"], 3)
    return out


# ---------------------------------------------------------------------------- 3. train + prune


def pack(ids: list[list[int]], eot: int, ctx: int) -> np.ndarray:
    """Documents joined by <|endoftext|>, cut into (n, ctx+1) rows (as cluster/shards.py's shards)."""
    parts = []
    for x in ids:
        parts += [np.asarray(x, dtype=np.uint16), np.asarray([eot], dtype=np.uint16)]
    flat = np.concatenate(parts)
    n = len(flat) // (ctx + 1)
    return flat[: n * (ctx + 1)].reshape(n, ctx + 1)


def prepare_data(plan: Plan, tmp: Path) -> tuple[tokenizer.BPETokenizer, np.ndarray, np.ndarray, dict]:
    """The BPE trained on the stdlib's train split (as `csp tokenizer build`), then the
    train files (every ``corpus_every``-th) and the val files packed into rows."""
    t0 = time.perf_counter()
    files = corpus.list_files(None)
    split = corpus.split_files(files)
    tok = tokenizer.train(corpus.iter_texts(split["train"]))
    tok.save(tmp / "tokenizer")
    t_tok = time.perf_counter() - t0
    threads = os.cpu_count() or 1
    ctx = plan.small.block_size
    rows = pack(tok.encode_batch(list(corpus.iter_texts(split["train"][:: plan.corpus_every])), num_threads=threads), tok.eot_id, ctx)
    val = pack(tok.encode_batch(list(corpus.iter_texts(split["val"])), num_threads=threads), tok.eot_id, ctx)
    info = {"corpus_files": len(files), "train_rows": len(rows), "val_rows": len(val), "train_tokens": int(rows.size),
            "tokenizer_seconds": round(t_tok, 2), "seconds": round(time.perf_counter() - t0, 2)}
    return tok, rows, val, info


def train_and_prune(plan: Plan, dev: torch.device, precision: str, task_name: str, tmp: Path, seconds: dict) -> dict:
    t0 = time.perf_counter()
    tok, rows, val, data_info = prepare_data(plan, tmp)
    seconds["data"] = round(time.perf_counter() - t0, 2)
    log(f"data ready: {data_info['train_tokens']:,} train tokens; probing step time")

    t0 = time.perf_counter()
    m, sp = plan.small, SparsityConfig(pfrac=plan.small_pfrac)
    # csp demo's recipe: Muon, lr 1e-2 for a dense model, divided by sqrt(density).
    lr = float(f"{1e-2 / math.sqrt(sp.l0frac):.3g}")

    def run_cfg(steps: int) -> RunConfig:
        return RunConfig(model=m, sparsity=sp, train=TrainConfig(steps=steps, batch_size=plan.small_batch, optimizer="muon", lr=lr,
                                                                 eval_every=0, ckpt_every=0, log_every=max(1, steps // 10)))

    batches = TokenRows(rows, plan.small_batch)
    # Probe: the step time of this shape here, so the run fits its time budget.
    stamps: list[float] = []
    train(run_cfg(plan.probe_steps), batches, dev, on_step=lambda s, _: (sync(dev), stamps.append(time.perf_counter())), precision=precision)
    step_s = statistics.median(b - a for a, b in zip(stamps[3:-1], stamps[4:], strict=True))
    steps = max(plan.min_steps, min(plan.max_steps, int(plan.train_seconds / step_s)))
    log(f"training {steps} steps ({step_s * 1e3:.1f} ms/step probed)")

    cfg = run_cfg(steps)
    ckpt_dir = tmp / "checkpoint"
    reports: list[dict] = []

    def save(files: dict[str, bytes], step: int) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (ckpt_dir / name).write_bytes(data)

    t_train = time.perf_counter()
    res = train(cfg, batches, dev, reports.append, val_batches=FixedBatches(val, plan.small_batch, 8), save=save, precision=precision)
    sync(dev)
    train_s = time.perf_counter() - t_train
    losses = [r["loss"] for r in reports if "loss" in r]
    ks = WeightSparsifier(res.model, cfg.sparsity, steps).ks(steps - 1)
    final = _k_and_floor(res.model, ks, sp.min_per_unit)
    seconds["train"] = round(time.perf_counter() - t0, 2)

    # The checkpoint as the pipeline stores it, loaded back onto the device, then pruned.
    t0 = time.perf_counter()
    ckpt = ckpt_lib.from_files({p.name: p.read_bytes() for p in ckpt_dir.iterdir()}, where=str(ckpt_dir))
    model = ckpt.build_model(dev)
    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(model.state_dict().values(), res.model.state_dict().values(), strict=True))
    log(f"pruning {task_name}")
    ctx = m.block_size
    pre = [torch.from_numpy(rows[i : i + 32, :ctx].astype(np.int64)) for i in range(0, min(plan.mean_rows, len(rows)), 32)]
    circuit = prune_lib.prune(model, REGISTRY[task_name], tok, plan.prune, pre, device=dev)
    cm = {k: round(v, 4) if isinstance(v, float) else v for k, v in circuit.metrics.items()}
    seconds["prune"] = round(time.perf_counter() - t0, 2)
    return {
        "data": data_info,
        "model": f"d_model {m.d_model} × {m.n_layer} layers, ctx {ctx}, density {sp.l0frac:g}, afrac {m.afrac}",
        "steps": steps, "batch": plan.small_batch, "lr": lr, "optimizer": "muon",
        "train_seconds": round(train_s, 2), "tokens_per_s": round(steps * plan.small_batch * ctx / train_s),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "val_loss": round(res.metrics["val_loss"], 4),
        "nonzero_weights": res.metrics["nonzeros"], "final_exact_k": not final["wrong_k"] and not final["under_floor"],
        "checkpoint_round_trip_equal": same,
        "task": task_name, "prune_target": plan.prune.target,
        "full_loss": cm["full_loss"], "full_accuracy": cm["full_accuracy"],
        "model_verdict": prune_lib.verdict(circuit.metrics["full_loss"], circuit.metrics["full_accuracy"], plan.prune.target) or "does_task",
        "status": cm["status"], "circuit_nodes": len(circuit.nodes), "nodes_total": cm["nodes_total"],
        "circuit_edges": circuit.n_edges, "sufficiency_loss": cm.get("sufficiency_loss"),
        "necessity_loss": cm.get("necessity_loss"), "prune_seconds": cm["prune_seconds"],
    }


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the same code path in seconds, on CPU too")
    ap.add_argument("--precision", default="bf16", choices=["auto", "bf16", "fp32"],
                    help="autocast of forward passes (default bf16: what training uses on CUDA, forced on CPU too)")
    ap.add_argument("--train-seconds", type=float, default=None, help="training budget of section 3 (default 150; smoke 4)")
    ap.add_argument("--task", default="single_double_quote", choices=list(REGISTRY), help="the task pruned in section 3")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "muon"], help="optimizer of the timed steps")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: invariants, step_timing, train_prune")
    args = ap.parse_args()

    t_start = time.perf_counter()
    plan = SMOKE if args.smoke else FULL
    if args.train_seconds is not None:
        plan = plan._replace(train_seconds=args.train_seconds)
    dev = resolve_device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    peak = peak_tflops(dev, args.peak_tflops)
    out: dict = {**device_info(dev), "smoke": args.smoke, "precision": args.precision,
                 "autocast_dtype": str(autocast_dtype(dev, args.precision)).replace("torch.", "")}
    seconds: dict = {}
    skip = {s for s in args.skip.split(",") if s}
    failed = []
    with tempfile.TemporaryDirectory(prefix="csp-gpu-bench-") as tmp:
        sections = {
            "invariants": lambda: invariants(plan, dev, args.precision),
            "step_timing": lambda: step_timing(plan, dev, args.precision, args.optimizer, peak),
            "train_prune": lambda: train_and_prune(plan, dev, args.precision, args.task, Path(tmp), seconds),
        }
        for name, run in sections.items():
            if name in skip:
                continue
            log(f"section {name}")
            t0 = time.perf_counter()
            try:
                out[name] = run()
            except Exception as e:  # report and go on: one GPU run should bring back every section it can
                import traceback  # here: it imports tokenize, which this folder shadows until _bootstrap ran

                out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
                failed.append(name)
            seconds[name] = round(time.perf_counter() - t0, 2)
    if dev.type == "cuda":
        out["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    out["seconds"] = seconds
    inv_ok = out.get("invariants", {}).get("passed", "invariants" in skip)
    out["passed"] = bool(inv_ok) and not failed
    out["failed_sections"] = failed
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
