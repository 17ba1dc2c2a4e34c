"""Learning curves of the demo's model shapes: what buys capability per CPU-second; prints JSON.

    python benchmarks/learning_curve.py --smoke          # every code path on a tiny model (seconds)
    python benchmarks/learning_curve.py --export DIR [--data ./csp-runs/data]
        # token stream, tokenizer and outside probe as plain files in DIR (prepares the
        # stdlib's shards first when --data has none); DIR can travel to a GPU machine
    python benchmarks/learning_curve.py --cache DIR --grid demo --device cuda --jobs 12 --deadline 480
        # trains every point of the grid (a full schedule each) → DIR/curves.jsonl, one line per
        # evaluation; with --deadline no point starts after that many seconds
    python benchmarks/learning_curve.py --cache DIR --grid demo --rates
        # tokens/s of each distinct shape here, one thread (as a demo trial trains): the CPU-second axis
    python benchmarks/learning_curve.py --cache DIR --report [--plot docs/learning-curves.png]

A point is one training run of the paper's recipe (csp's defaults: AbsTopK at afrac 0.25 at
all 8 locations, weight sparsity annealed over the first half, Adam at csp's lr rule) on the
demo's base shape (2 layers, d_head 16, d_mlp 4·d_model), written ``d128:0.25:5.7M`` plus
optional knobs ``:lr=1.4`` (× the rule's lr), ``:b=32`` (batch), ``:ctx=64``,
``:warm=0.05``, ``:anneal=0.25`` (end of the anneal), ``:seed=1``, ``:L=4`` (layers). Every run's schedule
ends at its own token budget, so a point's last evaluation is what a run of that length
reaches; evaluations part-way (``--milestones``) show the curve's shape.

Each evaluation records: val loss over up to 1,024 held-out rows with its standard error
(the spread of per-row losses), every task's held-out loss and accuracy (64 pairs each,
sparsity.tasks.evaluate), and the outside probe (sparsity.probe: quote closing on code
from installed third-party packages, never in the corpus).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # spawned workers re-import this file
import _bootstrap  # noqa: E402  (first of ours: fixes sys.path; cpu_name)
import numpy as np  # noqa: E402

BASE = {"n_layer": 2, "n_head": 4, "d_head": 16, "d_model": 64, "d_mlp": 256, "afrac": 0.25}
VAL_ROWS = 4096  # evenly spread over the val split: standard error ≈ 0.005 on a trained model
TASK_PAIRS = 64
PROBE_PAIRS = 512

# The grids, most informative first: with --deadline the tail is what gets cut.
GRIDS = {
    "demo": [
        # the longest runs first (their milestones are the curve up to 23M tokens)
        "d128:1:23M", "d128:0.25:23M", "d64:1:23M",
        # the demo's candidate budgets, every shape
        *[f"d{d}:{p}:{t}" for t in ("5.7M", "2.9M") for d in (128, 64) for p in (1, 0.25, 0.125)],
        # knobs at the 1/4-density d128 model (the pivot of both frontier directions)
        *[f"d128:0.25:2.9M:{k}" for k in ("lr=0.5", "lr=0.7", "lr=1.4", "b=32", "b=8", "warm=0.05",
                                         "anneal=0.25", "anneal=0.75", "ctx=64", "ctx=256", "seed=1", "b=32:lr=1.4", "b=64:lr=2")],
        "d128:1:2.9M:seed=1", "d64:1:2.9M:seed=1", "d64:1:5.7M:seed=1", "d128:0.25:5.7M:seed=1", "d128:1:5.7M:seed=1",
        "d128:1:11.5M", "d128:0.25:11.5M", "d64:1:11.5M", "d128:0.125:11.5M",
        *[f"d128:1:2.9M:{k}" for k in ("lr=0.7", "lr=1.4", "b=32:lr=1.4", "anneal=0.25")],
    ],
    "smoke": ["d32:1:40K:ctx=64:b=4", "d32:0.25:40K:ctx=32:b=4:lr=2:mix=0.05:L=1"],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_tokens(s: str) -> int:
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(s[-1].upper(), 1)
    return int(float(s[:-1] if s[-1].upper() in "KMG" else s) * mult)


def parse_point(spec: str) -> dict:
    """``d128:0.25:5.7M[:knob=value…]`` → the point's settings (with defaults)."""
    parts = spec.split(":")
    if len(parts) < 3 or not parts[0].startswith("d"):
        raise SystemExit(f"point {spec!r}: expected d<width>:<density>:<tokens>[:knob=value…]")
    p = {"spec": spec, "d_model": int(parts[0][1:]), "density": float(parts[1]), "tokens": parse_tokens(parts[2]),
         "lr": 1.0, "b": 16, "ctx": 128, "warm": 0.01, "anneal": 0.5, "seed": 0, "mix": 0.0, "L": 2}
    for kv in parts[3:]:
        k, _, v = kv.partition("=")
        if k not in p or k in ("spec", "d_model", "density", "tokens"):
            raise SystemExit(f"point {spec!r}: unknown knob {k!r} (lr, b, ctx, warm, anneal, seed, mix, L)")
        p[k] = type(p[k])(float(v)) if k != "lr" else float(v)
    return p


def run_config(p: dict):
    """The RunConfig of a point: the demo's base widened to d_model, its density as pfrac/ef²."""
    import dataclasses

    from sparsity.config import ModelConfig, RunConfig, TrainConfig, density_lr

    small = {"d_model": 32, "n_head": 2, "d_mlp": 128} if p["d_model"] < 64 else {}
    base = ModelConfig(block_size=p["ctx"], **{**BASE, **small, "n_layer": p["L"]})
    ef = p["d_model"] / base.d_model
    steps = max(1, p["tokens"] // (p["b"] * p["ctx"]))
    train = TrainConfig(steps=steps, batch_size=p["b"], warmup_frac=p["warm"], eval_every=0, ckpt_every=0, log_every=50, seed=p["seed"])
    cfg = RunConfig.at_width(base, train, pfrac=p["density"] * ef * ef, ef=ef, anneal_end=p["anneal"])
    lr = density_lr(cfg.sparsity.l0frac, "adam", None, cfg.model.d_model) * p["lr"]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))


# ---------------------------------------------------------------------------- data


def export(cache: Path, data_uri: str | None) -> dict:
    """The stdlib's token stream, its tokenizer and the outside probe's pairs as plain files."""
    from cluster import data, sources
    from sparsity import probe

    data_uri = data_uri or str(cache / "data")
    if not Path(data_uri, "manifest.json").exists():
        data.prepare(None, data_uri, n_ctx=128)
    cache.mkdir(parents=True, exist_ok=True)
    tok = sources.load_tokenizer(str(Path(data_uri, "tokenizer")))
    tok.save(cache / "tokenizer")
    for split in ("train", "val"):
        np.save(cache / f"{split}.npy", data.load_rows(data_uri, split).reshape(-1))
    pairs = probe.quote_pairs(tok, n=PROBE_PAIRS, max_tokens=64)
    (cache / "probe.json").write_text(json.dumps([p.__dict__ for p in pairs]))
    return {"cache": str(cache), "train_tokens": int(np.load(cache / "train.npy", mmap_mode="r").size), "probe_pairs": len(pairs)}


MIX_SEED = 7_000_001  # task programs mixed into a point's stream (mix=): a seed no held-out stream uses


def mixed_stream(cache: Path, frac: float, seed: int = 0) -> np.ndarray:
    """The stdlib stream with ``frac`` of its tokens replaced by task programs: each task's
    completed programs (``clean + target`` and ``corrupt + alt`` run through its ``complete``)
    from a seed of their own, no prompt shared with the pairs pruning selects k on or tests on,
    inserted as documents at random document boundaries of the stream. An experiment: does the
    demo's budget, or its corpus, limit which tasks the models learn?"""
    from sparsity import tasks, tokenizer
    from sparsity.prune import SELECT_SEED
    from sparsity.tasks import TEST_SEED

    base = np.load(cache / "train.npy")
    tok = tokenizer.load(cache / "tokenizer")
    want = int(frac * len(base))
    held = {x for t in tasks.REGISTRY.values() for sd in (TEST_SEED, SELECT_SEED) for p in t.pairs(256, sd, at_least=1)
            for x in (p.clean, p.corrupt)}
    per_task = {name: [] for name, t in tasks.REGISTRY.items() if t.complete is not None}
    got, rnd = 0, 0
    while got < want and rnd < 64:  # round-robin over the tasks, a pair at a time, so each gets an equal share
        pools = {name: [p for p in tasks.REGISTRY[name].pairs(64, MIX_SEED + rnd, at_least=1) if p.clean not in held and p.corrupt not in held]
                 for name in per_task}
        for i in range(max(map(len, pools.values()))):
            for name, pool in pools.items():
                if i >= len(pool) or got >= want:
                    continue
                p, t = pool[i], tasks.REGISTRY[name]
                for prompt, ans in ((p.clean, p.target), (p.corrupt, p.alt)):
                    ids = tok.encode(t.complete(prompt + ans)) + [tok.eot_id]
                    per_task[name].append(np.asarray(ids, dtype=np.uint16))
                    got += len(ids)
        rnd += 1
    progs = [d for docs in per_task.values() for d in docs]
    rng = np.random.default_rng(seed)
    rng.shuffle(progs)
    ends = np.flatnonzero(base == tok.eot_id) + 1
    cuts = np.sort(rng.choice(ends, size=min(len(ends), len(progs)), replace=False))
    pieces, start = [], 0
    groups = np.array_split(np.arange(len(progs)), len(cuts))
    for c, g in zip(cuts, groups, strict=True):
        pieces.append(base[start:c])
        pieces += [progs[i] for i in g]
        start = c
    pieces.append(base[start:])
    out = np.concatenate(pieces)
    return out[: len(base)]


def rows(stream: np.ndarray, ctx: int) -> np.ndarray:
    """The token stream cut into (n, ctx+1) rows, as the shards are."""
    n = len(stream) // (ctx + 1)
    return stream[: n * (ctx + 1)].reshape(n, ctx + 1)


class Evaluator:
    def __init__(self, cache: Path, ctx: int, device, val_rows: int, task_pairs: int):
        from sparsity import probe, tokenizer
        from sparsity.tasks.base import Pair

        self.tok = tokenizer.load(cache / "tokenizer")
        val = rows(np.load(cache / "val.npy"), ctx)
        self.val = val[np.unique(np.linspace(0, len(val) - 1, min(val_rows, len(val))).astype(int))]  # spread over every val file
        self.device, self.ctx, self.task_pairs = device, ctx, task_pairs
        pairs = [Pair(**d) for d in json.loads((cache / "probe.json").read_text())]
        self.probe = probe.QuoteProbe(self.tok, pairs=pairs, max_tokens=64) if ctx >= 64 else None

    def __call__(self, model) -> dict:
        import torch

        from sparsity import tasks

        model.eval()
        per_row = []
        with torch.no_grad():
            for s in range(0, len(self.val), 64):
                x = torch.from_numpy(self.val[s : s + 64].astype(np.int64)).to(self.device)
                logits = model(x[:, :-1]).float()
                ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
                per_row.append(ce.mean(1).cpu())
        per_row = torch.cat(per_row)
        out = {"val_loss": float(per_row.mean()), "val_se": float(per_row.std() / math.sqrt(len(per_row))), "val_rows": len(per_row),
               "val_rows_loss": [round(float(v), 4) for v in per_row]}  # for paired differences between points
        task_rows = {}
        for name, task in tasks.REGISTRY.items():
            try:
                r = tasks.evaluate(model, task, self.tok, n=self.task_pairs)
                task_rows[name] = [round(r["loss"], 4), round(r["accuracy"], 4)]
            except tasks.TaskError:  # a prompt longer than this context
                task_rows[name] = None
        out["tasks"] = task_rows
        if self.probe is not None:
            pr = self.probe.score(model)
            out["probe_loss"], out["probe_acc"] = round(pr["loss"], 4), round(pr["accuracy"], 4)
        model.train()
        return out


# ---------------------------------------------------------------------------- training


def train_point(p: dict, cache: str, device: str, out: str, milestones: int, threads: int, val_rows: int, task_pairs: int) -> None:
    """One point: train it, evaluating at ``milestones`` log-spaced steps and at the end;
    each evaluation is appended to ``out`` as one JSON line (written whole, so parallel
    runs never interleave)."""
    import torch

    from sparsity.batches import TokenRows
    from sparsity.train import resolve_device, train

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    cfg = run_config(p)
    ev = Evaluator(Path(cache), p["ctx"], dev, val_rows, task_pairs)
    stream = mixed_stream(Path(cache), p["mix"]) if p["mix"] else np.load(Path(cache) / "train.npy", mmap_mode="r")
    batches = TokenRows(rows(stream, p["ctx"]), p["b"], seed=p["seed"])
    steps = cfg.train.steps
    at = sorted({max(1, round(steps * 0.5 ** k)) for k in range(1, milestones + 1)} - {steps})  # ½, ¼, ⅛ … of the run
    losses: list[float] = []
    t0 = time.perf_counter()
    t_eval = 0.0

    def emit(step: int, model) -> None:
        nonlocal t_eval
        t1 = time.perf_counter()
        res = ev(model)
        t_eval += time.perf_counter() - t1
        line = {**{k: p[k] for k in ("spec", "d_model", "density", "tokens", "lr", "b", "ctx", "warm", "anneal", "seed", "mix")},
                "lr_abs": cfg.train.lr, "steps": steps, "step": step, "tokens_seen": step * p["b"] * p["ctx"],
                "final": step == steps, "train_loss": float(np.mean(losses[-20:])) if losses else None,
                "train_seconds": round(time.perf_counter() - t0 - t_eval, 2), "device": str(dev), **res}
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    def on_step(step: int, model) -> None:
        if step + 1 in at:
            emit(step + 1, model)

    res = train(cfg, batches, dev, lambda m: losses.append(m["loss"]) if "loss" in m else None, on_step=on_step, precision="fp32")
    emit(steps, res.model)


def _worker(args) -> str:
    spec, kw = args
    try:
        train_point(parse_point(spec), **kw)
        return f"done {spec}"
    except Exception as e:  # one point's failure is reported, the grid goes on
        return f"FAILED {spec}: {type(e).__name__}: {e}"


def run_grid(specs: list[str], cache: Path, device: str, out: Path, jobs: int, deadline: float | None, milestones: int,
             val_rows: int, task_pairs: int) -> dict:
    done = set()
    if out.exists():  # a re-run resumes: points whose final evaluation is stored are skipped
        done = {r["spec"] for r in read_lines(out) if r["final"]}
    todo = [s for s in specs if s not in done]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if device != "cpu" else 1
    kw = {"cache": str(cache), "device": device, "out": str(out), "milestones": milestones, "threads": threads,
          "val_rows": val_rows, "task_pairs": task_pairs}
    t0 = time.monotonic()
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs, maxtasksperchild=1) as pool:
        pending = []
        for spec in todo:
            pending.append((spec, pool.apply_async(_worker, ((spec, kw),))))
        for spec, r in pending:
            left = None if deadline is None else max(0.0, deadline - (time.monotonic() - t0))
            try:
                msg = r.get(timeout=left)
            except mp.TimeoutError:
                msg = f"cut {spec}: past the deadline"
            results.append(msg)
            log(f"[{time.monotonic() - t0:.0f}s] {msg}")
            if deadline is not None and time.monotonic() - t0 >= deadline:
                pool.terminate()
                results += [f"cut {s}: past the deadline" for s, _ in pending[len(results):]]
                break
    return {"points": len(specs), "skipped_done": len(done & set(specs)), "outcomes": results, "seconds": round(time.monotonic() - t0, 1)}


def rates(specs: list[str], cache: Path, steps: int) -> dict:
    """Tokens/s of one training step of each distinct shape on this CPU, one thread (how a demo
    trial trains), median of ``steps`` steps after two warm-up steps."""
    import torch

    from sparsity.batches import TokenRows
    from sparsity.train import train

    torch.set_num_threads(1)
    shapes: dict[str, dict] = {}
    for spec in specs:
        p = parse_point(spec)
        key = f"d{p['d_model']}:{p['density']:g}:b={p['b']}:ctx={p['ctx']}" + (f":L={p['L']}" if p["L"] != 2 else "")
        if key in shapes:
            continue
        cfg = run_config({**p, "tokens": (steps + 2) * p["b"] * p["ctx"] * 10})  # past the anneal's start: sparse steps
        stamps: list[float] = []
        batches = TokenRows(rows(np.load(cache / "train.npy", mmap_mode="r"), p["ctx"]), p["b"])
        train(cfg, batches, "cpu", stop_after=steps + 3, on_step=lambda s, m, stamps=stamps: stamps.append(time.perf_counter()))
        dts = np.diff(stamps)[2:]
        shapes[key] = {"tokens_per_s": round(p["b"] * p["ctx"] / float(np.median(dts)), 1), "step_ms": round(1e3 * float(np.median(dts)), 1)}
        log(f"{key}: {shapes[key]}")
    return {"threads": 1, "cpu": _bootstrap.cpu_name(), "shapes": shapes}


def read_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed run
            continue
    return out


# ---------------------------------------------------------------------------- report


def solved(r: dict, target: float = 0.15) -> list[str]:
    return sorted(t for t, v in (r.get("tasks") or {}).items() if v is not None and v[0] <= target and v[1] > 0.5)


def report(curves: Path, rates_file: Path | None, plot: Path | None, table: Path | None = None) -> dict:
    """The final evaluation of every point, with CPU core-seconds where the rates are known
    (tokens ÷ this CPU's one-thread tokens/s for the shape), and val-loss differences against
    the point's base (the same shape and budget, no knobs) with their paired standard error:
    both evaluated on the same rows, so row-to-row spread cancels."""
    lines = read_lines(curves)
    rate = json.loads(rates_file.read_text()) if rates_file and rates_file.exists() else {}
    shapes = rate.get("shapes", {})
    finals = {r["spec"]: r for r in lines if r["final"]}
    table_rows = []
    for spec, r in sorted(finals.items(), key=lambda kv: (kv[1]["d_model"], kv[1]["density"], kv[1]["tokens"], kv[0])):
        key = f"d{r['d_model']}:{r['density']:g}:b={r['b']}:ctx={r['ctx']}"
        cpu_s = r["tokens_seen"] / shapes[key]["tokens_per_s"] if key in shapes else None
        base = finals.get(":".join(spec.split(":")[:3]))
        diff = se = None
        if base is not None and base is not r and r.get("val_rows_loss") and base.get("val_rows_loss"):
            a, b = np.asarray(r["val_rows_loss"]), np.asarray(base["val_rows_loss"])
            if len(a) == len(b):
                diff, se = float((a - b).mean()), float((a - b).std() / math.sqrt(len(a)))
        table_rows.append({"spec": spec, "val_loss": round(r["val_loss"], 4), "val_se": round(r["val_se"], 4),
                           "vs_base": None if diff is None else round(diff, 4), "vs_base_se": None if se is None else round(se, 4),
                           "probe_acc": r.get("probe_acc"), "solved_015": len(solved(r)), "solved_030": len(solved(r, 0.30)),
                           "quote_loss": (r["tasks"].get("single_double_quote") or [None])[0],
                           "cpu_core_seconds": round(cpu_s) if cpu_s else None, "tasks_015": solved(r)})
    if plot is not None:
        _plot(lines, plot)
    if table is not None:
        table.write_text(_markdown(table_rows, rate))
    return {"points": table_rows}


def _markdown(rows: list[dict], rate: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    out = ["| point | val loss | ± row SE | Δ vs base (paired SE) | probe acc | tasks ≤ 0.15 | tasks ≤ 0.30 | quote loss | CPU core-s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "" if r["vs_base"] is None else f"{r['vs_base']:+.3f} ({r['vs_base_se']:.3f})"
        out.append(f"| `{r['spec']}` | {r['val_loss']:.3f} | {r['val_se']:.3f} | {delta} | {f(r['probe_acc'], '.3f')} | "
                   f"{r['solved_015']} | {r['solved_030']} | {f(r['quote_loss'], '.3f')} | {f(r['cpu_core_seconds'], 'd')} |")
    if rate:
        out.append(f"\nCPU core-seconds: training tokens ÷ one-thread tokens/s on {rate.get('cpu', '?')} (evaluation excluded).")
    return "\n".join(out) + "\n"


def _plot(lines: list[dict], path: Path) -> None:
    """Val loss, tasks solved and the outside probe against training tokens, one colour per
    plain shape (no knobs): a run's evaluations part-way as dots joined by a thin line, and
    the end of each budget (its own full schedule) as crosses joined by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    runs: dict[str, list[dict]] = {}
    for r in lines:
        if r["spec"].count(":") == 2:
            runs.setdefault(r["spec"], []).append(r)
    shapes = sorted({s.rsplit(":", 1)[0] for s in runs})
    colours = dict(zip(shapes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    ys = (("val_loss", "val loss (held-out stdlib rows)"), ("solved", "tasks at held-out loss ≤ 0.15 (of 20)"),
          ("probe_acc", "outside probe accuracy (quote closing)"))
    for ax, (key, name) in zip(axes, ys, strict=True):
        def val(r, key=key):
            return len(solved(r)) if key == "solved" else r.get(key)

        for spec, rs in sorted(runs.items()):
            rs.sort(key=lambda r: r["step"])
            c = colours[spec.rsplit(":", 1)[0]]
            ax.plot([r["tokens_seen"] / 1e6 for r in rs], [val(r) for r in rs], "-", color=c, alpha=0.35, marker=".")
        for shape in shapes:
            ends = sorted((r for s, rs in runs.items() if s.rsplit(":", 1)[0] == shape for r in rs if r["final"]), key=lambda r: r["tokens"])
            ax.plot([r["tokens_seen"] / 1e6 for r in ends], [val(r) for r in ends], "x--", color=colours[shape], label=shape)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="d_model:density")
    fig.suptitle("Learning curves of the demo's shapes (crosses: the end of a run of that length; dots: part-way)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, every code path, seconds")
    ap.add_argument("--export", type=Path, help="write the plain-file cache to this directory and exit")
    ap.add_argument("--data", help="prepared shards (csp data prepare, n_ctx 128) to export from")
    ap.add_argument("--cache", type=Path, help="the directory --export wrote")
    ap.add_argument("--grid", default="demo", help=f"one of {', '.join(GRIDS)}, or comma-separated points")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="points trained at once (processes)")
    ap.add_argument("--deadline", type=float, help="seconds: points still running then are cut")
    ap.add_argument("--milestones", type=int, default=4, help="evaluations part-way through each run")
    ap.add_argument("--val-rows", type=int, default=VAL_ROWS, help="held-out rows per val-loss evaluation")
    ap.add_argument("--rates", action="store_true", help="tokens/s of each shape here instead of training")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--table", type=Path, help="with --report: also write the table as Markdown here")
    ap.add_argument("--out", type=Path, help="curves file (default CACHE/curves.jsonl)")
    args = ap.parse_args()
    specs = GRIDS.get(args.grid) or args.grid.split(",")
    if args.smoke:
        import tempfile

        from sparsity import probe

        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            _smoke_cache(cache, probe)
            for s in GRIDS["smoke"]:
                train_point(parse_point(s), str(cache), "cpu", str(cache / "curves.jsonl"), 1, 1, 64, 4)
            res = report(cache / "curves.jsonl", None, cache / "plot.png", cache / "table.md")
            res["evaluations"] = len(read_lines(cache / "curves.jsonl"))
            print(json.dumps(res))
        return 0
    if args.export:
        print(json.dumps(export(args.export, args.data)))
        return 0
    if args.cache is None:
        ap.error("--cache is required (make one with --export DIR)")
    out = args.out or args.cache / "curves.jsonl"
    if args.rates:
        res = rates(specs, args.cache, steps=8)
        (args.cache / "rates.json").write_text(json.dumps(res, indent=1))
    elif args.report:
        res = report(out, args.cache / "rates.json", args.plot, args.table)
    else:
        res = run_grid(specs, args.cache, args.device, out, args.jobs, args.deadline, args.milestones, args.val_rows, TASK_PAIRS)
    print(json.dumps(res, indent=1))
    return 0


def _smoke_cache(cache: Path, probe) -> None:
    """A tokenizer trained on a slice of the stdlib and a short token stream: the export's
    files at a tiny size."""
    from sparsity import corpus, tokenizer

    files = corpus.split_files(corpus.list_files(None))
    texts = list(corpus.iter_texts(files["train"][:40]))
    tok = tokenizer.train(texts)
    tok.save(cache / "tokenizer")
    ids = [i for t in texts for i in tok.encode(t) + [tok.eot_id]]
    stream = np.asarray(ids, dtype=np.uint16)
    np.save(cache / "train.npy", stream)
    np.save(cache / "val.npy", np.asarray([i for t in corpus.iter_texts(files["val"][:4]) for i in tok.encode(t) + [tok.eot_id]], dtype=np.uint16))
    pairs = probe.quote_pairs(tok, n=16, max_tokens=64)
    (cache / "probe.json").write_text(json.dumps([p.__dict__ for p in pairs]))


if __name__ == "__main__":
    raise SystemExit(main())
