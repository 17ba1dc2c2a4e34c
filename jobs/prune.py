"""Prune one checkpoint for a list of tasks and store each result (one process).

For each task the model is first evaluated on held-out pairs; a model at chance is
recorded as such (status ``chance``) without pruning, so time goes to pairs that can yield
circuits. Node means over pretraining data are computed once per checkpoint and cached
beside it (``node_means-<data fingerprint>.safetensors``). The fan-out over many
checkpoints on Ray (issue: prune fan-out) reuses :func:`prune_pair`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict

import torch

from cluster import checkpoints, data, storage
from jobs import results
from sparsity import prune as prune_lib
from sparsity import tasks as task_lib
from sparsity.errors import CspError

# Below this held-out accuracy a model is at chance on a task (64 pairs × 2 prompts: one
# standard error of a coin is ~0.044, so 0.6 is > 2 SE above 0.5).
CHANCE_ACCURACY = 0.6
MEANS_ROWS = 128  # pretraining sequences for node means


class PruneError(CspError):
    pass


def model_meta(ckpt, ckpt_uri: str) -> dict:
    cfg = ckpt.config
    name = os.path.basename(checkpoints.checkpoint_dir(ckpt_uri).rstrip("/").rsplit("/checkpoints", 1)[0]) or "model"
    return {
        "model_id": f"{name}-{ckpt.fingerprint[:8]}",
        "checkpoint_uri": checkpoints.checkpoint_dir(ckpt_uri),
        "checkpoint_fingerprint": ckpt.fingerprint,
        "step": ckpt.step,
        "pfrac": cfg.sparsity.pfrac,
        "ef": cfg.sparsity.ef,
        "afrac": cfg.model.afrac,
        "seed": cfg.train.seed,
        "val_loss": ckpt.meta.get("metrics", {}).get("val_loss"),
    }


def pretrain_batches(data_uri: str, block_size: int, rows: int = MEANS_ROWS, batch: int = 16) -> list[torch.Tensor]:
    arr = data.load_rows(data_uri, "train", max_rows=rows)[:, :block_size]
    return [torch.from_numpy(arr[i : i + batch].astype("int64")) for i in range(0, len(arr), batch)]


def cached_node_means(ckpt_uri: str, model, data_uri: str) -> dict[str, torch.Tensor]:
    """Node means for this checkpoint on this dataset, computed once and cached beside it."""
    from safetensors.torch import load, save

    fp = data.read_manifest(data_uri)["plan_fingerprint"][:12]
    cache = storage.resolve(checkpoints.checkpoint_dir(ckpt_uri)).join(f"node_means-{fp}.safetensors")
    if storage.exists(cache):
        return load(storage.read_bytes(cache))
    means = prune_lib.node_means(model, pretrain_batches(data_uri, model.config.block_size))
    storage.write_bytes(cache, save({k: v.contiguous().cpu() for k, v in means.items()}))
    return means


def prune_checkpoint(
    ckpt_uri: str,
    task_names: list[str] | None,
    out_uri: str,
    cfg: prune_lib.PruneConfig | None = None,
    data_uri: str | None = None,
    tokenizer_uri: str | None = None,
    device: str = "cpu",
    progress: Callable[[str, dict], None] | None = None,
) -> list[dict]:
    """Prune ``ckpt_uri`` for each task (all when None); store and return one summary each."""
    cfg = cfg or prune_lib.PruneConfig()
    names = list(task_lib.REGISTRY) if not task_names else task_names
    tasks = [task_lib.get(n) for n in names]  # unknown names fail before any work
    storage.resolve(out_uri)
    ckpt = checkpoints.load(ckpt_uri, with_train_state=False)
    data_uri = data_uri or checkpoints.run_data_uri(ckpt_uri)
    if tokenizer_uri is None and data_uri is None:
        raise PruneError(f"no tokenizer for {ckpt_uri}: its run.json names no dataset; pass --data (or --tokenizer)")
    tok = data.load_tokenizer(tokenizer_uri or data_uri)
    if tok.n_vocab != ckpt.config.model.vocab_size:
        raise PruneError(f"tokenizer has {tok.n_vocab} ids but the model's vocab_size is {ckpt.config.model.vocab_size}")
    model = ckpt.build_model(device)
    ablate = None
    if cfg.ablation == "mean":
        if data_uri is None:
            raise PruneError("mean ablation needs the pretraining data for node means; pass --data, or use --ablation zero")
        ablate = cached_node_means(ckpt_uri, model, data_uri)
    batches = pretrain_batches(data_uri, model.config.block_size) if cfg.ablation == "resample" and data_uri else None
    meta = model_meta(ckpt, ckpt_uri)
    out = []
    for task in tasks:
        out.append(prune_pair(model, task, tok, cfg, meta, out_uri, ablate=ablate, batches=batches, device=device))
        if progress:
            progress(task.name, out[-1])
    return out


def prune_pair(model, task, tok, cfg, meta: dict, out_uri: str, ablate=None, batches=None, device="cpu", skip_chance: bool = True) -> dict:
    """Evaluate, then prune (unless at chance and ``skip_chance``), then store one result."""
    base = {"ablation": cfg.ablation, "target": cfg.target,
            "provenance": {"prune_config": asdict(cfg), "model": meta}}
    ev = task_lib.evaluate(model, task, tok, n=cfg.n_test)
    if skip_chance and ev["accuracy"] < CHANCE_ACCURACY:
        extra = {**base, "full_loss": ev["loss"], "full_accuracy": ev["accuracy"], "n_nodes": 0, "n_edges": 0}
        results.write_result(out_uri, meta, task.name, None, status="chance", extra=extra)
        return {"task": task.name, "status": "chance", **{k: extra[k] for k in ("full_loss", "full_accuracy")}}
    try:
        circuit = prune_lib.prune(model, task, tok, cfg, batches, device=device, ablate=ablate,
                                  provenance={"model": meta})
    except task_lib.TaskError as e:
        results.write_result(out_uri, meta, task.name, None, status="failed", error=str(e), extra=base)
        return {"task": task.name, "status": "failed", "error": str(e)}
    results.write_result(out_uri, meta, task.name, circuit, extra={"ablation": cfg.ablation})
    return {"task": task.name, **circuit.metrics, **circuit.counts(), "nodes_by_layer": circuit.nodes_by_layer()}
