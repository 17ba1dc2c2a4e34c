"""Prune fan-out: one Ray task per (checkpoint, task[, control]), into the results tables.

Results already stored (by checkpoint fingerprint, task, pruning-config key and control)
are skipped, so a re-run of the same config prunes nothing; a pair another fan-out is
pruning at the moment (its claim, jobs.prune_pairs.prune_pair) is left to it, so
concurrent fan-outs into one store split the pairs. Each task is retried on
failure (a raised exception or a dead worker process); one that still fails is stored as a
``failed`` row with its error, never dropped. A checkpoint is loaded once per worker
process (cached by URI), and at most ``max_in_flight`` tasks are pending at once (runtime.bounded_map
back-pressure). Tasks are spread over the cluster's nodes (Ray's SPREAD strategy), and a
task whose node dies is retried on another; every row records the Ray node that made it
(``ray_node_id``). With controls, a second wave runs the faithfulness controls
(jobs.prune_pairs.CONTROLS) of every pair whose model solves its task.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict

from cluster import checkpoints, lease, runtime, storage
from jobs import loader, results, store, sweep
from jobs.prune_pairs import (
    Loaded,
    control_config,
    control_jobs,
    model_meta,
    prune_pair,
    row_keys,
    solved,
)
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib


def prune_task(ckpt_uri: str, task_name: str, out_uri: str, cfg_dict: dict, data_uri: str | None,
               fail_once_marker: str | None = None, kill: bool = False, control: str | None = None, owner: str | None = None) -> dict:
    """The Ray task body: prune one pair (or one control of it) and store it."""
    if fail_once_marker and not storage.exists(fail_once_marker):  # test hook: the first attempt fails
        storage.write_text(fail_once_marker, "1")
        if kill:
            os._exit(1)  # the worker process dies, as when its PID is killed
        raise RuntimeError("injected failure")
    cfg = prune_lib.PruneConfig(**cfg_dict)
    return prune_pair(loader.cached(ckpt_uri, data_uri, Loaded), task_lib.get(task_name), cfg, out_uri, control=control, owner=owner)


def expand_checkpoints(uris: list[str], which: str = "final", include_stopped: bool = False) -> list[str]:
    """The checkpoint directories to prune: of every run given, and of every trial of a sweep
    given, those ``which`` names (cluster.checkpoints.select: final, milestones, all or steps).
    A sweep's trials that its scheduler stopped early are left out unless ``include_stopped``."""
    out = []
    for uri in uris:
        runs = [uri]
        if sweep.is_sweep(uri):
            df = sweep.read_summary(uri)
            if "stopped_at" in df and not include_stopped:
                df = df[df["stopped_at"].isna()]
            runs = [str(u) for u in df["checkpoint_uri"] if u is not None and u == u]
        for run in runs:
            out += checkpoints.select(run, which)
    return list(dict.fromkeys(out))


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
    task_env: dict[str, str] | None = None,
    controls: bool | list[str] = False,
    control_ckpts: list[str] | None = None,
    which: str = "final",
    include_stopped: bool = False,
    compact: bool = True,
    compact_every: int = 2000,
) -> dict:
    """Prune every (checkpoint, task) pair not yet stored under ``cfg``; with ``controls``
    (True, or a list of task names) also every control of the solved pairs (of the
    checkpoints in ``control_ckpts`` only, when given). ``which``, ``include_stopped``: the
    checkpoints of each run (:func:`expand_checkpoints`). With ``compact``, the task
    partitions are compacted at the end (jobs/compact.py), and every ``compact_every``
    stored results while it runs (0: at the end only). Returns counts ("compacted":
    partitions merged, summed over those compactions)."""
    import ray

    cfg = cfg or prune_lib.PruneConfig()
    names = task_names or list(task_lib.REGISTRY)
    for n in names:
        task_lib.get(n)
    storage.resolve(out_uri)
    ckpts = expand_checkpoints(ckpt_uris, which, include_stopped)
    fps = {u: checkpoints.load(u, with_train_state=False).fingerprint for u in ckpts}
    if not ray.is_initialized():
        runtime.init()
    limit = max_in_flight or max(1, int(runtime.cluster_cpus()))
    remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True, scheduling_strategy="SPREAD")(prune_task)
    if task_env:  # e.g. the S3 endpoint the tasks must write to, when it is not the cluster's default
        remote = remote.options(runtime_env={"env_vars": task_env})
    counts = {"pairs": 0, "skipped": 0, "pruned": 0, "failed": 0, "elsewhere": 0}
    me = lease.new_owner("fanout")  # each pair's claim: owner me:pair, so Ray's retry of a task re-takes it
    compactor = _Compactor(out_uri, names, compact_every if compact else 0)

    def wave(items: list[tuple[str, str, str | None]]) -> None:
        done = results.stored_pairs(out_uri)
        todo = [(u, n, c) for u, n, c in items
                if any((fps[u], n, k, c or "") not in done for k in row_keys(control_config(cfg, c)))]
        counts["pairs"] += len(items)
        counts["skipped"] += len(items) - len(todo)
        def submit(item: tuple[str, str, str | None]):
            u, n, c = item
            marker = None
            if inject_failure and inject_failure.get("task") == n and c is None:
                marker = storage.resolve(out_uri).join("_debug", f"fail-{fps[u][:8]}-{n}").uri
            kill = bool(inject_failure and inject_failure.get("kill"))
            return remote.remote(u, n, out_uri, asdict(cfg), data_uri, marker, kill, c, f"{me}:{fps[u][:12]}:{n}:{c or ''}")

        for finished, ((u, n, c), ref) in enumerate(runtime.bounded_map(submit, todo, limit), start=1):
            try:
                row = ray.get(ref)
                if row["status"] == "claimed":  # another fan-out is pruning it right now
                    counts["elsewhere"] += 1
                elif row.get("already_stored"):  # stored by another fan-out since this wave began
                    counts["skipped"] += 1
                else:
                    counts["pruned"] += 1
                    compactor.stored()
            except (ray.exceptions.RayError, Exception) as e:  # retries exhausted: store the failure
                row = _store_failure(out_uri, cfg, u, n, c, e)
                counts["failed"] += 1
            if progress:
                progress(finished, len(todo), {**row, "checkpoint_uri": u, "step": checkpoints.step_of(u)})

    wave([(u, n, None) for u in ckpts for n in names])
    if controls:
        wave(_control_items(out_uri, cfg, ckpts, fps, names, controls, control_ckpts))
    counts["compacted"] = compactor.finish(final=compact)
    return counts


class _Compactor:
    """Compaction while a long fan-out runs: once every ``every`` results it stores, the
    fan-out's task partitions are compacted in a thread of the driver, one compaction at a
    time, so that queries and a re-run's scan of the stored pairs stay fast however many
    pairs it prunes (a compaction is safe beside the tasks still writing)."""

    def __init__(self, out_uri: str, names: list[str], every: int):
        self.out_uri, self.names, self.every = out_uri, names, every
        self.since, self.partitions, self.thread = 0, 0, None

    def stored(self) -> None:
        import threading

        self.since += 1
        if not self.every or self.since < self.every or (self.thread is not None and self.thread.is_alive()):
            return
        self.since = 0
        self.thread = threading.Thread(target=self._run, name="csp-compact", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.partitions += _compact(self.out_uri, self.names)

    def finish(self, final: bool) -> int:
        """Partitions merged: the running compaction's (waited for) and, if ``final``, one more."""
        if self.thread is not None:
            self.thread.join()
        if final:
            self._run()
        return self.partitions


def _compact(out_uri: str, names: list[str]) -> int:
    """Compact the partitions of this fan-out's tasks; partitions merged. Every result is
    stored already, so a failure here loses nothing: it is a warning naming the command
    that finishes the job."""
    import sys

    from jobs import compact

    try:
        return compact.compact(out_uri, tasks=names)["partitions"]
    except Exception as e:  # noqa: BLE001 - the results are stored; only their layout is left as it was
        print(f"csp: warning: compacting {out_uri} failed ({' '.join(str(e).split())[:200]}); "
              f"every result is stored; `csp results compact {out_uri}` merges its files later", file=sys.stderr)
        return 0


def _store_failure(out_uri: str, cfg: prune_lib.PruneConfig, u: str, n: str, c: str | None, e: BaseException) -> dict:
    """A pair whose task failed past its retries: stored as a ``failed`` row per target,
    with its error; returns the row the progress callback is given."""
    err = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    ckpt = checkpoints.load(u, with_train_state=False)
    run_cfg = control_config(cfg, c)
    for t in run_cfg.targets:
        store.write_result(out_uri, model_meta(ckpt, u), n, None, status="failed", error=err,
                           extra={"control": c, "target": t}, cfg=run_cfg.for_target(t))
    return {"task": n, "control": c, "status": "failed", "error": err}


def _control_items(out_uri: str, cfg: prune_lib.PruneConfig, ckpts: list[str], fps: dict[str, str], names: list[str],
                   controls: bool | list[str], control_ckpts: list[str] | None) -> list[tuple[str, str, str | None]]:
    """The control runs (checkpoint, task, control): every control of each pair whose model
    solves its task, for the tasks ``controls`` names (True: all of ``names``) and the
    checkpoints in ``control_ckpts`` (None: all)."""
    ctl_tasks = set(names if controls is True else controls)
    df = results.circuits(out_uri)
    real = df[df["control"].isna() & df["prune_key"].isin(row_keys(cfg))]
    by_fp = {u: fps[u] for u in ckpts}
    items = []
    for u in ckpts if control_ckpts is None else [c for c in ckpts if c in set(control_ckpts)]:
        mine = real[real["checkpoint_fingerprint"] == by_fp[u]]
        for n in names:
            hit = mine[mine["task"] == n]
            if n in ctl_tasks and hit["status"].astype(str).map(solved).any():
                items += [(u, n, c) for c in control_jobs(cfg)]
    return items
