"""The results store as it grows: writes, queries and compaction at N pairs; prints one JSON object.

    python benchmarks/store_scale.py [--pairs 2000] [--where local,s3] [--writers 8]

Per storage (a local directory, and a SeaweedFS S3 server this script starts on loopback):

1. N synthetic results (20 tasks; real schema; nodes and edges drawn around the demo's
   verified circuits: median 60 nodes and 300 edges, a 2 KB convergence record) written
   through the real write path (jobs.store.write_result), ``--writers`` threads at once
   as a fan-out's workers would. ``write_s_per_pair``: one writer's seconds per result,
   timed on ``--sample`` results alone each way, stored as a fan-out task stores it (claim,
   existence check, files, release), beside ``…_before_change``, the same with the check
   as it was before compaction existed, alternating — at N results, and again once the store is
   compacted (after ``first_check_s_per_partition_compacted``: a process's first check
   of a partition reads its new generation's keys once);
2. queries before and after compaction (jobs/compact.py): the whole circuits table, one
   task's circuits, and one (model, task)'s circuit_edges, with the files per table;
3. the compaction's own seconds.
"""

from __future__ import annotations

import _bootstrap  # first: fixes sys.path

# isort: split
import argparse
import json
import os
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def synthetic(i: int, n_tasks: list[str], rng):
    """Result ``i``: (model meta, task, circuit). 20 tasks per model, sizes drawn lognormal."""
    from sparsity.circuit import Circuit

    task = n_tasks[i % len(n_tasks)]
    model = f"d128-p{i // len(n_tasks) % 7}-{i // len(n_tasks):08x}"
    n_nodes = int(min(400, max(3, rng.lognormvariate(4.1, 0.6))))  # median 60
    n_edges = int(min(4000, max(2, rng.lognormvariate(5.7, 0.8))))  # median 300
    locs = ["attn.act_in", "attn.q", "attn.k", "attn.v", "mlp.act_in", "mlp.post_act"]
    nodes = [(rng.randrange(2), locs[j % len(locs)], j) for j in range(n_nodes)]
    edges = [{"src": nodes[rng.randrange(n_nodes)], "dst": nodes[rng.randrange(n_nodes)], "kind": "mlp.c_fc", "weight": rng.gauss(0, 1)}
             for _ in range(n_edges)]
    conv = json.dumps([[s, round(rng.random(), 4), n_nodes + 400 - s, round(rng.random(), 4)] for s in range(0, 400, 5)])
    metrics = {"status": "ok", "k": n_nodes, "full_loss": 0.05, "sufficiency_loss": 0.1, "necessity_loss": 1.2, "target": 0.15,
               "convergence": conv}
    meta = {"model_id": model, "trial": model[:7], "checkpoint_uri": f"/runs/{model}", "checkpoint_fingerprint": f"{i // len(n_tasks):064x}",
            "step": 2800, "pfrac": 0.25, "ef": 1.0, "afrac": 0.25, "seed": 0, "val_loss": 3.7}
    return meta, task, Circuit(task, nodes, edges, metrics)


def write_one(uri: str, item, cfg, check: str = "now") -> None:
    """One result stored as a fan-out task stores it (jobs.prune_pairs.prune_pair): its claim
    taken, the check that it is not stored yet, its files written, the claim released.
    ``check="before"``: the check as it was before compaction existed (the result's own file
    only)."""
    from cluster import lease, storage
    from jobs import store

    meta, task, circuit = item
    where = store.claim_uri(uri, task, meta["model_id"], cfg.key(), None)
    claim, _ = lease.try_acquire(where, lease.new_owner("bench"), what=f"store {task}", take_over=True)
    with claim:
        if check == "now":
            assert not store.is_stored(uri, task, meta["model_id"], cfg.key(), None)
        else:
            assert not storage.exists(storage.resolve(uri).join(store.CIRCUITS, f"task={task}", store.result_uid(meta["model_id"], cfg.key(), None)))
        store.write_result(uri, meta, task, circuit, cfg=cfg)


def per_pair(uri: str, items, cfg) -> tuple[float, float]:
    """Seconds per result stored as a fan-out task stores it, with the check as it is now and
    as it was before compaction: the two alternate, result by result, so both see the same
    machine."""
    spent = {"now": 0.0, "before": 0.0}
    for i, it in enumerate(items):
        check = "now" if i % 2 == 0 else "before"
        t0 = time.perf_counter()
        write_one(uri, it, cfg, check)
        spent[check] += time.perf_counter() - t0
    half = len(items) / 2
    return round(spent["now"] / half, 4), round(spent["before"] / half, 4)


def first_checks(uri: str, cfg, tasks: list[str]) -> float:
    """Seconds per partition of a process's first existence check after a compaction: it
    reads the keys of the partition's new generation once (jobs.results.has_result)."""
    from jobs import store

    t0 = time.perf_counter()
    for task in tasks:
        store.is_stored(uri, task, "no-such-model", cfg.key(), None)
    return round((time.perf_counter() - t0) / len(tasks), 4)


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` runs (one run when it takes over 10 s: a cold, many-file read)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if best > 10:
            break
    return round(best, 3)


def queries(uri: str, task: str, model: str) -> dict:
    from jobs import results, store

    counts = {}
    out = {"read_circuits_s": timed(lambda: counts.setdefault("rows", len(results.read_table(uri))), 2),
           "read_one_task_s": timed(lambda: results.read_table(uri, task=task)),
           "edges_one_pair_s": timed(lambda: results.edges(uri, task=task, model=model))}
    from cluster import storage

    out["files"] = {t: len(storage.ls(storage.resolve(uri).join(t), suffix=".parquet")) for t in (store.CIRCUITS, store.NODES, store.EDGES)}
    out["circuits_rows"] = counts["rows"]
    return out


def run(uri: str, pairs: int, writers: int, sample: int) -> dict:
    import random

    from jobs import compact, results, store
    from sparsity.prune import PruneConfig
    from sparsity.tasks import REGISTRY

    cfg = PruneConfig()
    tasks = sorted(REGISTRY)
    class Items:  # result i, made when asked for (100,000 circuits would not fit in memory at once)
        def __getitem__(self, sl: slice):
            return (synthetic(i, tasks, random.Random(i)) for i in range(*sl.indices(pairs + 2 * sample)))

    items = Items()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:  # the bulk: the store's write path alone, as fast as it goes
        for start in range(0, pairs - 2 * sample, 2000):  # in batches: pool.map takes its whole input at once
            list(pool.map(lambda it: store.write_result(uri, *it, cfg=cfg), items[start:min(start + 2000, pairs - 2 * sample)]))
    bulk = time.perf_counter() - t0
    out = {"pairs": pairs, "writers": writers, "write_wall_s": round(bulk, 1)}
    # one writer's seconds per result at this size, with the check as it is now and as it was
    out["write_s_per_pair"], out["write_s_per_pair_before_change"] = per_pair(uri, list(items[pairs - 2 * sample:pairs]), cfg)
    meta0, task, _ = next(items[0:1])
    model = meta0["model_id"]
    out["before"] = queries(uri, task, model)
    t0 = time.perf_counter()
    got = compact.compact(uri)
    out["compact_s"] = round(time.perf_counter() - t0, 1)
    out["compacted_partitions"] = got["partitions"]
    out["after"] = queries(uri, task, model)
    out["first_check_s_per_partition_compacted"] = first_checks(uri, cfg, tasks)
    out["write_s_per_pair_compacted"], out["write_s_per_pair_compacted_before_change"] = per_pair(uri, list(items[pairs:]), cfg)
    out["after"]["read_circuits_with_new_files_s"] = timed(lambda: results.read_table(uri), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--where", default="local,s3", help="comma-separated: local, s3")
    ap.add_argument("--writers", type=int, default=8, help="threads writing at once")
    ap.add_argument("--sample", type=int, default=100, help="results timed one at a time")
    args = ap.parse_args()
    from cluster import s3server

    report = {"cpu": _bootstrap.cpu_name(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="csp-store-scale-") as tmp:
        if "local" in args.where:
            report["local"] = run(os.path.join(tmp, "res"), args.pairs, args.writers, args.sample)
        if "s3" in args.where:
            server = s3server.start(os.path.join(tmp, "s3"), "bench-" + secrets.token_hex(4), secrets.token_hex(20), buckets=("bench",))
            os.environ.update(server.env())
            try:
                report["s3"] = run("s3://bench/res", args.pairs, args.writers, args.sample)
            finally:
                server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
