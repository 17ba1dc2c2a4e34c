"""Prune one checkpoint for a list of tasks and store each result (one process).

For each task the full model is scored on held-out pairs first; a model at chance or one
that misses the target is recorded as that verdict without pruning (``prune_anyway``
prunes it all the same and the row says so). Node means are taken over a seeded random
sample of rows across the whole train split, computed once per checkpoint and cached
beside it. The fan-out over many checkpoints on Ray (jobs/fanout.py) reuses
:func:`prune_pair`; :func:`control_jobs` lists the faithfulness controls of a pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict

import torch

from cluster import checkpoints, data, lease, shards, storage
from jobs import results, store
from jobs.loader import LoadedModel
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib
from sparsity.circuit import solved
from sparsity.errors import CspError
from sparsity.model import GPT
from sparsity.topk import WeightSparsifier

MEANS_ROWS = 256  # pretraining rows (× n_ctx positions) sampled for node means
RESAMPLE_ROWS = 128  # pretraining rows in the resample-ablation pool
SAMPLE_SHARDS = 8  # rows are sampled from up to this many random shards of the train split
MEANS_SEED = 0  # node means are a property of the model and data, the same for every pruning seed

# The faithfulness controls of a (checkpoint, task) pair whose model solves the task
# (docs/circuits.md, "Controls"). Each is stored as its own row, `control` naming it.
# nonsense_swap / nonsense_fixed: the task's own prompts with a consistent rule for the answers
# (sparsity/tasks/base.py), pruned with the same config.
CONTROLS = ("random_init", "nonsense_swap", "nonsense_fixed", "ablation_zero", "ablation_resample", "seed_1", "seed_2")


class PruneError(CspError):
    pass


def model_meta(ckpt, ckpt_uri: str) -> dict:
    cfg = ckpt.config
    name = checkpoints.run_name(ckpt_uri)
    return {
        "model_id": f"{name}-{ckpt.fingerprint[:8]}",
        "trial": name,
        "checkpoint_uri": checkpoints.checkpoint_dir(ckpt_uri),
        "checkpoint_fingerprint": ckpt.fingerprint,
        "step": ckpt.step,
        "pfrac": cfg.sparsity.pfrac,
        "ef": cfg.sparsity.ef,
        "ef_mlp": cfg.sparsity.ef_mlp,
        "density": cfg.sparsity.l0frac,
        "afrac": cfg.model.afrac,
        "seed": cfg.train.seed,
        "val_loss": ckpt.meta.get("metrics", {}).get("val_loss"),
    }


def pretrain_batches(data_uri: str, block_size: int, rows: int = MEANS_ROWS, seed: int = MEANS_SEED, batch: int = 32) -> list[torch.Tensor]:
    """``rows`` token rows drawn at random (seeded) from up to :data:`SAMPLE_SHARDS` random
    shards of the train split — not the first files in path order — in batches of ``batch``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    uris = data.shard_uris(data_uri, "train")
    pick = sorted(rng.choice(len(uris), size=min(SAMPLE_SHARDS, len(uris)), replace=False).tolist())
    arrs = [a for a in (shards.read_shard(uris[i]) for i in pick) if len(a)]
    if not arrs:
        raise PruneError(f"the train split of {storage.resolve(data_uri).uri} has no sequences to take node means over")
    allrows = np.concatenate(arrs)
    take = np.sort(rng.choice(len(allrows), size=min(rows, len(allrows)), replace=False))
    arr = allrows[take][:, :block_size].astype("int64")
    return [torch.from_numpy(arr[i : i + batch]) for i in range(0, len(arr), batch)]


def cached_node_means(ckpt_uri: str, model, data_uri: str) -> dict[str, torch.Tensor]:
    """Node means for this checkpoint on this dataset, computed once and cached beside it."""
    from safetensors.torch import load, save

    fp = data.read_manifest(data_uri)["plan_fingerprint"][:12]
    cache = storage.resolve(checkpoints.checkpoint_dir(ckpt_uri)).join(f"node_means-{fp}-r{MEANS_ROWS}s{MEANS_SEED}.safetensors")
    if storage.exists(cache):
        return load(storage.read_bytes(cache))
    means = prune_lib.node_means(model, pretrain_batches(data_uri, model.config.block_size))
    storage.write_bytes(cache, save({k: v.contiguous().cpu() for k, v in means.items()}))
    return means


def random_init_model(ckpt) -> GPT:
    """The checkpoint's architecture untrained: its initialisation (seeded by the run's
    seed), projected to the run's final weight density — the same shape and sparsity, no
    learning."""
    cfg = ckpt.config
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).eval()
    WeightSparsifier(model, cfg.sparsity, cfg.train.steps, seed=cfg.train.seed).apply(cfg.train.steps)
    return model


class Loaded(LoadedModel):
    """One checkpoint ready to prune: model, tokenizer, ablation inputs, metadata."""

    def __init__(self, ckpt_uri: str, data_uri: str | None = None, tokenizer_uri: str | None = None, device: str = "cpu"):
        super().__init__(ckpt_uri, data_uri, tokenizer_uri, device)
        self.meta = model_meta(self.ckpt, ckpt_uri)
        self._means: dict | None = None  # node means of the trained model (cached beside it)
        self._random_model: GPT | None = None  # the random-init control's model and its node means
        self._random_means: dict | None = None

    def inputs(self, ablation: str, control: str | None = None) -> tuple:
        """(model, ablate, batches) for one ablation, on the trained or the random-init model."""
        if control == "random_init":
            if self._random_model is None:
                self._random_model = random_init_model(self.ckpt).to(self.device)
            model = self._random_model
        else:
            model = self.model
        needs_data = ablation in ("mean", "resample")
        if needs_data and self.data_uri is None:
            raise PruneError(f"{ablation} ablation needs the pretraining data; pass --data, or use --ablation zero")
        ablate = batches = None
        if ablation == "mean" and control != "random_init":
            if self._means is None:
                self._means = cached_node_means(self.ckpt_uri, model, self.data_uri)
            ablate = self._means
        elif ablation == "mean":
            if self._random_means is None:
                self._random_means = prune_lib.node_means(model, pretrain_batches(self.data_uri, model.config.block_size))
            ablate = self._random_means
        elif ablation == "resample":
            batches = pretrain_batches(self.data_uri, model.config.block_size, rows=RESAMPLE_ROWS, seed=MEANS_SEED + 1)
        return model, ablate, batches


def control_config(cfg: prune_lib.PruneConfig, control: str | None) -> prune_lib.PruneConfig:
    """The pruning config a control runs with: the random-init model and the nonsense tasks
    are pruned even though they miss the target (whether they then verify is the finding)."""
    if control is None:
        return cfg
    if control in results.MUST_NOT_VERIFY and control in CONTROLS:
        return dataclasses.replace(cfg, prune_anyway=True)
    if control.startswith("ablation_"):
        return dataclasses.replace(cfg, ablation=control.split("_", 1)[1])
    if control.startswith("seed_"):
        return dataclasses.replace(cfg, seed=cfg.seed + int(control.split("_", 1)[1]))
    raise PruneError(f"unknown control {control!r}; choose from {', '.join(CONTROLS)}")


def control_jobs(cfg: prune_lib.PruneConfig) -> list[str]:
    """The controls to run for a solved pair under ``cfg`` (an ablation equal to the real
    run's is not repeated)."""
    return [c for c in CONTROLS if c != f"ablation_{cfg.ablation}"]


def prune_checkpoint(
    ckpt_uri: str,
    task_names: list[str] | None,
    out_uri: str,
    cfg: prune_lib.PruneConfig | None = None,
    data_uri: str | None = None,
    tokenizer_uri: str | None = None,
    device: str = "cpu",
    progress: Callable[[str, dict], None] | None = None,
    controls: bool = False,
) -> list[dict]:
    """Prune ``ckpt_uri`` for each task (all when None); store and return one summary each
    (with ``controls``, then the controls of every task the model solves)."""
    cfg = cfg or prune_lib.PruneConfig()
    names = list(task_lib.REGISTRY) if not task_names else task_names
    tasks = [task_lib.get(n) for n in names]  # unknown names fail before any work
    storage.resolve(out_uri)
    loaded = Loaded(ckpt_uri, data_uri, tokenizer_uri, device)
    stored = results.circuits(out_uri, model=loaded.meta["model_id"])

    def run(task, control=None) -> dict:
        keys = row_keys(control_config(cfg, control))
        hit = stored[(stored["task"] == task.name) & stored["prune_key"].isin(keys)
                     & (stored["control"].fillna("") == (control or ""))] if len(stored) else stored
        if hit["prune_key"].nunique() == len(keys):  # every target's row already stored: a re-run adds nothing
            first = hit[hit["prune_key"] == keys[0]]
            return {"task": task.name, "control": control, "status": str(first["status"].iloc[0]), "already_stored": True,
                    "by_target": {float(r.target): {"task": task.name, "control": control, "status": r.status,
                                                    "already_stored": True} for r in hit.itertuples()}}
        return prune_pair(loaded, task, cfg, out_uri, control=control)

    out = []
    for task in tasks:
        out.append(run(task))
        if progress:
            progress(task.name, out[-1])
    if controls:
        for row in [r for r in out if solved_anywhere(r)]:
            for c in control_jobs(cfg):
                out.append(run(task_lib.get(row["task"]), c))
                if progress:
                    progress(f"{row['task']} [{c}]", out[-1])
    return out


def solved_anywhere(row: dict) -> bool:
    """A pruning summary whose model does the task at any of its targets."""
    return solved(row["status"]) or any(solved(v["status"]) for v in row.get("by_target", {}).values())


def row_keys(cfg: prune_lib.PruneConfig) -> list[str]:
    """The prune keys of the rows one run of ``cfg`` stores: one per target, ``cfg.target``'s first."""
    return [cfg.for_target(t).key() for t in cfg.targets]


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def prune_pair(loaded: Loaded, task, cfg: prune_lib.PruneConfig, out_uri: str, control: str | None = None,
               owner: str | None = None, extra: dict | None = None) -> dict:
    """Claim the pair, then evaluate, prune (unless the model misses) and store one result.

    The claim (a lease under RESULTS/_claims/) makes concurrent fan-outs into one store
    split the pairs: a pair claimed by a live process, or stored meanwhile, is left to it.
    ``owner`` lets a retry of the same Ray task re-take its own claim at once; ``extra``:
    more columns for its rows (a search's ``search_id`` and ``search_trial``)."""
    run_cfg = control_config(cfg, control)
    where = store.claim_uri(out_uri, task.name, loaded.meta["model_id"], run_cfg.key(), control)
    claim, holder = lease.try_acquire(where, owner or lease.new_owner("prune"), what=f"prune {task.name}", take_over=True)
    if claim is None:
        return {"task": task.name, "control": control, "status": "claimed", "held_by": lease.describe(holder or {})}
    with claim.start():
        if all(store.is_stored(out_uri, task.name, loaded.meta["model_id"], k, control) for k in row_keys(run_cfg)):
            return {"task": task.name, "control": control, "status": "already_stored", "already_stored": True}
        return _prune_and_store(loaded, task, cfg, run_cfg, out_uri, control, extra)


def _prune_and_store(loaded: Loaded, task, cfg: prune_lib.PruneConfig, run_cfg: prune_lib.PruneConfig, out_uri: str,
                     control: str | None, more: dict | None = None) -> dict:
    """Prune one pair at every target of ``run_cfg`` and store a row per target; returns the
    first target's summary with ``by_target`` {target: summary} for all of them."""
    model, ablate, batches = loaded.inputs(run_cfg.ablation, control)
    extra = {"ablation": run_cfg.ablation, "control": control, "ray_node_id": _ray_node_id(), **(more or {})}
    try:
        ptask = task_lib.nonsense(task, control.split("_", 1)[1], loaded.tok) if control and control.startswith("nonsense_") else task
        found = prune_lib.prune_targets(model, ptask, loaded.tok, run_cfg, batches, device=loaded.device, ablate=ablate,
                                        provenance={"model": loaded.meta, "control": control})
    except task_lib.TaskError as e:
        for t in run_cfg.targets:
            tcfg = run_cfg.for_target(t)
            store.write_result(out_uri, loaded.meta, task.name, None, status="failed", error=str(e),
                               extra={**extra, "target": t, "provenance": {"prune_config": asdict(tcfg), "model": loaded.meta}},
                               cfg=tcfg)
        return {"task": task.name, "control": control, "status": "failed", "error": str(e)}
    by_target = {}
    for t, circuit in zip(run_cfg.targets, found, strict=True):
        circuit.task = task.name  # a nonsense control is stored under the task whose prompts it uses
        circuit.provenance["base_prune_key"] = cfg.for_target(t).key()  # the real row at this target
        store.write_result(out_uri, loaded.meta, task.name, circuit, extra={**extra, "target": t}, cfg=run_cfg.for_target(t))
        by_target[t] = {"task": task.name, "control": control, **circuit.metrics, **circuit.counts(),
                        "nodes_by_layer": circuit.nodes_by_layer()}
    return {**by_target[run_cfg.target], "by_target": by_target}
