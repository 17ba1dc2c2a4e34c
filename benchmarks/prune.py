"""Pruning cost for the demo-size model on this machine; prints one JSON object.

    python benchmarks/prune.py [--task single_double_quote] [--device cpu] [--no-abstopk]

Model: the demo's d_model-128 model (``demo.full_plan()`` at ef 2: 2 layers, ctx 128,
AbsTopK at afrac 0.25 as the paper; ``--no-abstopk``: ``full_plan(paper=False)``), default
PruneConfig.
Figures: seconds for one whole (task, checkpoint) pair (mask training, k search,
verification); forward+backward passes per second during mask training (one pass = the
clean and the corrupt batch of the train pairs).
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jobs import demo  # noqa: E402
from sparsity import corpus, tokenizer  # noqa: E402
from sparsity import prune as prune_lib  # noqa: E402
from sparsity.config import RunConfig  # noqa: E402
from sparsity.model import GPT  # noqa: E402
from sparsity.tasks import REGISTRY, TRAIN_SEED, encode, pair_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="single_double_quote", choices=list(REGISTRY))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-abstopk", action="store_true", help="AbsTopK off (demo.full_plan(paper=False))")
    args = ap.parse_args()
    dev = torch.device(args.device)

    plan = demo.full_plan(paper=not args.no_abstopk)
    mcfg = RunConfig.at_width(plan.base, plan.train, pfrac=1.0, ef=2.0).model
    files = corpus.list_files(None)
    tok = tokenizer.train(corpus.iter_texts(files))
    stream = []
    for text in corpus.iter_texts(files[:200]):
        stream += tok.encode(text) + [tok.eot_id]
    n = plan.n_ctx
    rows = np.array(stream[: 128 * (n + 1)]).reshape(128, n + 1)
    pretrain = [torch.from_numpy(rows[i : i + 16, :n].astype("int64")) for i in range(0, 128, 16)]

    torch.manual_seed(0)
    model = GPT(mcfg).to(dev).eval()
    cfg = prune_lib.PruneConfig()
    task = REGISTRY[args.task]

    # mask-training throughput, measured on its own
    for p in model.parameters():
        p.requires_grad_(False)
    mu = prune_lib.node_means(model, pretrain, dev)
    gates = prune_lib.Gates(model, mu, cfg.surrogate_temp, cfg.init)
    b = encode(task, tok, cfg.batch_pairs, TRAIN_SEED, n)
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr)
    tokens, last = prune_lib._joint(b)
    tokens, last, t, a = tokens.to(dev), last.to(dev), b.target.to(dev), b.alt.to(dev)
    n_passes = 30
    t0 = time.perf_counter()
    for _ in range(n_passes):
        with gates.active():
            lc, lx = prune_lib._split(model(tokens, at=last))
            loss = pair_loss(lc, lx, t, a).mean() + cfg.k_coef * gates.l0()
        opt.zero_grad()
        loss.backward()
        opt.step()
    passes_per_s = n_passes / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    import dataclasses  # here, not at the top: it imports inspect → tokenize, which this folder shadows

    circuit = prune_lib.prune(model, task, tok, dataclasses.replace(cfg, prune_anyway=True), pretrain, device=dev)
    pair_s = time.perf_counter() - t0
    print(json.dumps({
        "device": str(dev), "threads": torch.get_num_threads(), "model": f"d_model {mcfg.d_model} × {mcfg.n_layer} layers, ctx {mcfg.block_size}, afrac {mcfg.afrac}",
        "task": task.name, "prompt_tokens": int(tokens.shape[1]), "batch_pairs": cfg.batch_pairs, "mask_steps": cfg.steps,
        "seconds_per_pair": round(pair_s, 2), "mask_training_fwd_bwd_per_s": round(passes_per_s, 2),
        "nodes_total": circuit.metrics["nodes_total"],
    }, indent=2))


if __name__ == "__main__":
    main()
