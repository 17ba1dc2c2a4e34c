"""`csp prune --search N`: a search over the pruning settings of each (checkpoint, task) pair.

The default settings (k_coef, mask lr, mask steps) are one point of a space in which some
pairs have smaller verified circuits. For each pair, N pruning runs are chosen by a real
search algorithm (Optuna's TPE sampler, through Ray Tune), each stored as an ordinary row
of the results store with ``search_id`` and ``search_trial``, at the config's first
target. The objective is the circuit's edge count where it is verified; an unverified run
scores worse than any verified one. Each finished search writes one row of its own
(RESULTS/searches/task=<task>/<search_id>.parquet) that names its best run; readers show
the best run of each search by default (jobs.results.circuits).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
import tempfile

import pyarrow as pa

from cluster import checkpoints, runtime, storage
from jobs import loader, store
from jobs.prune_pairs import Loaded, model_meta, prune_pair
from jobs.store import SEARCHES_SCHEMA
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib
from sparsity.errors import CspError

# (low, high) of each searched setting, sampled log-uniform (steps: integers); the defaults
# (k_coef 1e-3, lr 3e-3, 400 steps) lie inside.
SPACE = {"k_coef": (1e-4, 1e-2), "lr": (1e-3, 1e-2), "steps": (200, 800)}
UNVERIFIED = 1e9  # the objective of a run whose circuit is not verified (plus its test loss)
ALGORITHM = "optuna-tpe"

class SearchError(CspError):
    pass


def search_id(model_id: str, task: str, cfg: prune_lib.PruneConfig, n: int, seed: int) -> str:
    """The identity of one search: the pair, the base config, its size and seed, the space."""
    text = json.dumps([model_id, task, cfg.key(), n, seed, SPACE, ALGORITHM], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _uri(out_uri: str, task: str, sid: str) -> storage.Location:
    return storage.resolve(out_uri).join(store.SEARCHES, f"task={task}", f"{sid}.parquet")


def trial_config(cfg: prune_lib.PruneConfig, point: dict) -> prune_lib.PruneConfig:
    """The pruning config of one search trial: ``cfg`` at the point's settings, its first target only."""
    return dataclasses.replace(cfg, k_coef=float(point["k_coef"]), lr=float(point["lr"]), steps=int(point["steps"]), also_targets=())


def search_pair(ckpt_uri: str, task_name: str, out_uri: str, cfg: prune_lib.PruneConfig, n: int, data_uri: str | None = None,
                seed: int = 0) -> dict:
    """Run (or find already done) the search of one pair; returns its searches row."""
    import time

    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    task_lib.get(task_name)
    if n < 2:
        raise SearchError(f"--search {n}: a search needs at least 2 trials")
    model_id = model_meta(checkpoints.load(ckpt_uri, with_train_state=False), ckpt_uri)["model_id"]
    sid = search_id(model_id, task_name, cfg, n, seed)
    done = _uri(out_uri, task_name, sid)
    if storage.exists(done):
        return {**storage.read_parquet(done).to_pylist()[0], "task": task_name, "already_stored": True}
    space = {"k_coef": tune.loguniform(*SPACE["k_coef"]), "lr": tune.loguniform(*SPACE["lr"]),
             "steps": tune.lograndint(SPACE["steps"][0], SPACE["steps"][1] + 1)}

    def trial(point: dict) -> None:
        number = int(tune.get_context().get_trial_name().rsplit("-", 1)[-1])  # search-<n>: see trial_name_creator
        row = prune_pair(loader.cached(ckpt_uri, data_uri, Loaded), task_lib.get(task_name), trial_config(cfg, point), out_uri,
                         extra={"search_id": sid, "search_trial": number})
        ok = row.get("status") == "ok"
        loss = row.get("sufficiency_loss")
        tune.report({"objective": float(row["n_edges"]) if ok else UNVERIFIED + (loss if loss is not None else 10.0),
                     "status": str(row.get("status")), "n_edges": row.get("n_edges")})

    t0 = time.perf_counter()
    algo = ConcurrencyLimiter(OptunaSearch(metric="objective", mode="min", seed=seed), max_concurrent=max(1, int(runtime.cluster_cpus())))
    tune_dir = tempfile.mkdtemp(prefix=f"csp-search-{sid[:8]}-")  # Tune's experiment state; the rows are the record

    def fit(stopper):
        return tune.Tuner(
            tune.with_resources(trial, {"CPU": 1}), param_space=space,
            tune_config=tune.TuneConfig(search_alg=algo, num_samples=n, reuse_actors=True,
                                        # Tune numbers trials from 1 in the order it creates them (experiment_tag "<n>_<settings>")
                                        trial_name_creator=lambda t: f"search-{int(t.experiment_tag.split('_', 1)[0]) - 1}"),
            run_config=tune.RunConfig(name=sid, storage_path=tune_dir, verbose=0, stop=stopper),
        ).fit()

    try:
        grid = runtime.tune_fit(fit)
        results = [(r.config, r.metrics) for r in grid if r.error is None and r.metrics]
        errors = [r.error for r in grid if r.error is not None]
    finally:
        shutil.rmtree(tune_dir, ignore_errors=True)
    if not results:
        first = errors[0] if errors else None
        raise SearchError(f"every trial of the search of {task_name} failed" + (f": {str(first).splitlines()[0][:200]}" if first else ""))
    verified = [(c, m) for c, m in results if m.get("status") == "ok"]
    best = min(verified, key=lambda cm: cm[1]["objective"]) if verified else None
    row = {"search_id": sid, "model_id": model_id, "algorithm": ALGORITHM, "n_trials": len(results), "n_verified": len(verified),
           "best_prune_key": trial_config(cfg, best[0]).key() if best else None,
           "best_n_edges": int(best[1]["n_edges"]) if best else None,
           "best_config": json.dumps({k: best[0][k] for k in SPACE}) if best else None, "space": json.dumps(SPACE), "seed": seed,
           "seconds": time.perf_counter() - t0, "created_at": datetime.datetime.now(datetime.UTC)}
    storage.write_parquet(done, pa.Table.from_pylist([row], schema=SEARCHES_SCHEMA))
    return {**row, "task": task_name}

