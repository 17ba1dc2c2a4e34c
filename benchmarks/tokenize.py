"""Tokenizer and shard-writing throughput on the stdlib corpus; prints one JSON object.

    python benchmarks/tokenize.py [--shard-mb 1.0]

Figures: BPE training seconds; tiktoken encode MB/s on 1 and 2 threads; shard-writing
tokens/s with 1 and 2 Ray workers in flight, and their ratio — all measured in this run on
this machine, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _bootstrap  # noqa: F401  (first: fixes sys.path before anything imports `tokenize`)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-mb", type=float, default=1.0, help="source MB per shard (smaller → more tasks)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from cluster import data, runtime
    from sparsity import corpus, tokenizer

    files = corpus.list_files(None)
    stats = corpus.CorpusStats()
    texts = list(corpus.iter_texts(files, stats))
    mb = stats.bytes / 1e6

    t0 = time.perf_counter()
    tok = tokenizer.train(iter(texts), corpus_fingerprint="bench")
    train_s = time.perf_counter() - t0

    encode = {}
    for threads in (1, 2):
        t0 = time.perf_counter()
        n_tokens = sum(map(len, tok.encode_batch(texts, num_threads=threads)))
        encode[threads] = mb / (time.perf_counter() - t0)

    runtime.init(num_cpus=2)
    shard = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "tok"))
        # Warm Ray's worker pool so neither measurement pays for process start-up.
        data.prepare(None, os.path.join(tmp, "warm"), tokenizer=os.path.join(tmp, "tok"), shard_bytes=int(8e6), workers=2)
        for workers in (1, 2):
            out = os.path.join(tmp, f"w{workers}")
            t0 = time.perf_counter()
            r = data.prepare(None, out, tokenizer=os.path.join(tmp, "tok"), shard_bytes=int(args.shard_mb * 1e6), workers=workers)
            dt = time.perf_counter() - t0
            toks = sum(s["tokens"] for s in r.manifest["splits"].values())
            shard[workers] = {"seconds": round(dt, 2), "tokens_per_s": round(toks / dt), "shards": r.shards_written}

    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "corpus": {"files": stats.files, "mb": round(mb, 1), "tokens": n_tokens},
        "tokenizer_train_seconds": round(train_s, 2),
        "tiktoken_encode_mb_per_s": {"1_thread": round(encode[1], 1), "2_threads": round(encode[2], 1)},
        "shard_write": {"1_worker": shard[1], "2_workers": shard[2],
                        "speedup_2_vs_1": round(shard[2]["tokens_per_s"] / shard[1]["tokens_per_s"], 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
