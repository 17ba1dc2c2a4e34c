"""One-process training from token shards to checkpoints on a storage URI.

    RUN/run.json           the RunConfig (and the dataset it trains on)
    RUN/metrics.jsonl      every reported metric, rewritten whole at each checkpoint
    RUN/checkpoints/…      see cluster/checkpoints.py

Re-running the same command resumes from the latest checkpoint; a finished run does no
work. Ray Train's distributed version (cluster/ray_train.py) reuses these pieces.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from cluster import checkpoints, data, storage
from cluster.checkpoints import METRICS_FILE, RUN_FILE
from sparsity import train as train_lib
from sparsity.batches import FixedBatches, TokenRows
from sparsity.config import RunConfig
from sparsity.errors import CspError


class RunError(CspError):
    pass


def load_data(data_uri: str, cfg: RunConfig):
    """(train rows, val rows) cut to the model's context, checked against its vocabulary."""
    manifest = data.read_manifest(data_uri)
    n_ctx, vocab = manifest["n_ctx"], manifest["tokenizer"]["vocab_size"]
    if cfg.model.block_size > n_ctx:
        raise RunError(f"block_size={cfg.model.block_size} exceeds the data's n_ctx={n_ctx}; prepare data with --n-ctx {cfg.model.block_size} or lower --n-ctx")
    if cfg.model.vocab_size != vocab:
        raise RunError(f"vocab_size={cfg.model.vocab_size} but the data's tokenizer has {vocab} ids")
    width = cfg.model.block_size + 1
    train_rows = data.load_rows(data_uri, "train")[:, :width]
    val_rows = data.load_rows(data_uri, "val", max_rows=cfg.train.eval_batches * cfg.train.batch_size)[:, :width]
    return train_rows, val_rows, manifest


def train_local(
    data_uri: str,
    out_uri: str,
    cfg: RunConfig,
    device: str = "auto",
    progress: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> train_lib.TrainResult | None:
    """Train (or resume, or skip when finished) one run; returns None when already done."""
    train_lib.resolve_device(device)  # a bad --device fails before anything is written
    out = storage.resolve(out_uri)
    run_file = out.join(RUN_FILE)
    record = {"config": cfg.to_dict(), "data": storage.resolve(data_uri).uri}
    if storage.exists(run_file):
        old = storage.read_json(run_file)
        if old.get("config") != record["config"]:
            raise RunError(f"{out.uri} holds a run with another configuration; choose a new --out or delete it")
    state = None
    step = checkpoints.latest_step(out.uri)
    if step is not None:
        if step >= cfg.train.steps:
            return None
        state = checkpoints.load(out.uri)
    train_rows, val_rows, _ = load_data(data_uri, cfg)
    storage.write_json(run_file, record)
    metrics_loc = out.join(METRICS_FILE)
    history: list[dict] = []
    if state is not None and storage.exists(metrics_loc):
        history = [json.loads(line) for line in storage.read_text(metrics_loc).splitlines() if line.strip()]
        history = [m for m in history if m.get("step", 0) <= state.step]

    def report(m: dict) -> None:
        history.append(m)
        if progress is not None:
            progress(m)

    def save(files: dict[str, bytes], step: int) -> None:
        checkpoints.save(out.uri, files, step)
        storage.write_text(metrics_loc, "".join(json.dumps(m) + "\n" for m in history))

    return train_lib.train(
        cfg,
        TokenRows(train_rows, cfg.train.batch_size // cfg.train.micro_batches, seed=cfg.train.seed),
        device,
        report,
        val_batches=FixedBatches(val_rows, cfg.train.batch_size, cfg.train.eval_batches),
        state=state,
        save=save,
        stop_after=stop_after,
    )
