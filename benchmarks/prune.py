"""Pruning cost for the demo-size model on this machine; prints one JSON object.

    python benchmarks/prune.py [--task single_double_quote] [--device cpu]

Model: d_model 128, 2 layers, ctx 128 (DESIGN.md's demo size), default PruneConfig.
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

from sparsity import corpus, tokenizer  # noqa: E402
from sparsity import prune as prune_lib  # noqa: E402
from sparsity.config import ModelConfig  # noqa: E402
from sparsity.model import GPT  # noqa: E402
from sparsity.tasks import REGISTRY, TRAIN_SEED, encode, pair_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="single_double_quote", choices=list(REGISTRY))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)

    files = corpus.list_files(None)
    tok = tokenizer.train(corpus.iter_texts(files))
    stream = []
    for text in corpus.iter_texts(files[:200]):
        stream += tok.encode(text) + [tok.eot_id]
    rows = np.array(stream[: 128 * 129]).reshape(128, 129)
    pretrain = [torch.from_numpy(rows[i : i + 16, :128].astype("int64")) for i in range(0, 128, 16)]

    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=128, n_head=8, d_head=16, d_mlp=512, n_layer=2, block_size=128)).to(dev).eval()
    cfg = prune_lib.PruneConfig()
    task = REGISTRY[args.task]

    # mask-training throughput, measured on its own
    for p in model.parameters():
        p.requires_grad_(False)
    mu = prune_lib.node_means(model, pretrain, dev)
    gates = prune_lib.Gates(model, mu, cfg.surrogate_temp, cfg.init)
    b = encode(task, tok, cfg.batch_pairs, TRAIN_SEED, 128)
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
        "device": str(dev), "threads": torch.get_num_threads(), "model": "d_model 128 × 2 layers, ctx 128",
        "task": task.name, "prompt_tokens": int(tokens.shape[1]), "batch_pairs": cfg.batch_pairs, "mask_steps": cfg.steps,
        "seconds_per_pair": round(pair_s, 2), "mask_training_fwd_bwd_per_s": round(passes_per_s, 2),
        "nodes_total": circuit.metrics["nodes_total"],
    }, indent=2))


if __name__ == "__main__":
    main()
