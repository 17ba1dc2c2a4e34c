"""Prune fan-out: one Ray task per (checkpoint, task) pair, into the results tables.

Pairs already stored (by checkpoint fingerprint and task) are skipped, so a re-run prunes
nothing. Each task is retried on failure (a raised exception or a dead worker process);
a pair that still fails is stored as a ``failed`` row with its error, never dropped. A
checkpoint is loaded once per worker process (cached by URI), and at most ``max_in_flight``
tasks are pending at once (ray.wait back-pressure).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict

from cluster import checkpoints, runtime, storage
from jobs import results
from jobs.prune import cached_node_means, model_meta, pretrain_batches, prune_pair
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib

_LOADED: dict[str, tuple] = {}  # per worker process: ckpt URI → (ckpt, model, tokenizer, ablate, batches, meta)


def _load(ckpt_uri: str, data_uri: str | None, ablation: str):
    key = f"{ckpt_uri}|{data_uri}|{ablation}"
    if key not in _LOADED:
        from cluster import data

        ckpt = checkpoints.load(ckpt_uri, with_train_state=False)
        src = data_uri or checkpoints.run_data_uri(ckpt_uri)
        tok = data.load_tokenizer(src)
        model = ckpt.build_model()
        ablate = cached_node_means(ckpt_uri, model, src) if ablation == "mean" else None
        batches = pretrain_batches(src, model.config.block_size) if ablation == "resample" else None
        _LOADED.clear()  # one checkpoint resident per worker at a time
        _LOADED[key] = (ckpt, model, tok, ablate, batches, model_meta(ckpt, ckpt_uri))
    return _LOADED[key]


def prune_task(ckpt_uri: str, task_name: str, out_uri: str, cfg_dict: dict, data_uri: str | None,
               fail_once_marker: str | None = None, kill: bool = False, skip_chance: bool = True) -> dict:
    """The Ray task body: prune one pair and store it."""
    if fail_once_marker and not storage.exists(fail_once_marker):  # test hook: the first attempt fails
        storage.write_text(fail_once_marker, "1")
        if kill:
            os._exit(1)  # the worker process dies, as when its PID is killed
        raise RuntimeError("injected failure")
    cfg = prune_lib.PruneConfig(**cfg_dict)
    _, model, tok, ablate, batches, meta = _load(ckpt_uri, data_uri, cfg.ablation)
    return prune_pair(model, task_lib.get(task_name), tok, cfg, meta, out_uri, ablate=ablate, batches=batches, skip_chance=skip_chance)


def expand_checkpoints(uris: list[str]) -> list[str]:
    """Sweep directories become the final checkpoint of each trial; others stay as given."""
    out = []
    for uri in uris:
        loc = storage.resolve(uri)
        if storage.exists(loc.join("summary.parquet")):
            df = storage.read_parquet(loc.join("summary.parquet")).to_pandas()
            out += [str(u) for u in df["checkpoint_uri"]]
        else:
            out.append(checkpoints.checkpoint_dir(uri))
    return out


def fanout(
    ckpt_uris: list[str],
    task_names: list[str] | None,
    out_uri: str,
    cfg: prune_lib.PruneConfig | None = None,
    data_uri: str | None = None,
    max_in_flight: int | None = None,
    max_retries: int = 2,
    progress: Callable[[int, int, dict], None] | None = None,
    inject_failure: dict | None = None,
    skip_chance: bool = True,
    task_env: dict[str, str] | None = None,
) -> dict:
    """Prune every (checkpoint, task) pair not yet stored; returns counts."""
    import ray

    cfg = cfg or prune_lib.PruneConfig()
    names = task_names or list(task_lib.REGISTRY)
    for n in names:
        task_lib.get(n)
    storage.resolve(out_uri)
    ckpts = expand_checkpoints(ckpt_uris)
    fps = {u: checkpoints.load(u, with_train_state=False).fingerprint for u in ckpts}
    done = results.stored_pairs(out_uri)
    todo = [(u, n) for u in ckpts for n in names if (fps[u], n) not in done]
    if not ray.is_initialized():
        runtime.init()
    limit = max_in_flight or max(1, int(runtime.cluster_cpus()))
    remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(prune_task)
    if task_env:  # e.g. the S3 endpoint the tasks must write to, when it is not the cluster's default
        remote = remote.options(runtime_env={"env_vars": task_env})
    pending = list(todo)
    inflight: dict = {}
    counts = {"pairs": len(ckpts) * len(names), "skipped": len(ckpts) * len(names) - len(todo), "pruned": 0, "failed": 0}
    finished = 0
    while pending or inflight:
        while pending and len(inflight) < limit:
            u, n = pending.pop(0)
            marker = None
            if inject_failure and inject_failure.get("task") == n:
                marker = storage.resolve(out_uri).join("_debug", f"fail-{fps[u][:8]}-{n}").uri
            kill = bool(inject_failure and inject_failure.get("kill"))
            inflight[remote.remote(u, n, out_uri, asdict(cfg), data_uri, marker, kill, skip_chance)] = (u, n)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            u, n = inflight.pop(ref)
            try:
                row = ray.get(ref)
                counts["pruned"] += 1
            except (ray.exceptions.RayError, Exception) as e:  # retries exhausted: store the failure
                err = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                ckpt = checkpoints.load(u, with_train_state=False)
                results.write_result(out_uri, model_meta(ckpt, u), n, None, status="failed", error=err,
                                     extra={"ablation": cfg.ablation, "target": cfg.target})
                row = {"task": n, "status": "failed", "error": err}
                counts["failed"] += 1
            finished += 1
            if progress:
                progress(finished, len(todo), row)
    return counts
