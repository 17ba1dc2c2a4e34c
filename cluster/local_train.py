"""One-process training from token shards to checkpoints on a storage URI.

    RUN/run.json           the RunConfig (and the dataset it trains on)
    RUN/metrics.jsonl      every reported metric, merged by step at each checkpoint
    RUN/lease.json         who writes this run now (cluster/lease.py)
    RUN/checkpoints/…      see cluster/checkpoints.py

Re-running the same command resumes from the latest checkpoint; a finished run does no
work. A second process on the same run is refused while the first one lives. Ray Train's distributed version (cluster/ray_train.py) reuses these pieces.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from cluster import checkpoints, data, lease, storage
from cluster.checkpoints import LEASE_FILE, RUN_FILE
from sparsity import train as train_lib
from sparsity.batches import FixedBatches, TokenRows
from sparsity.config import RunConfig
from sparsity.errors import CspError


class RunError(CspError):
    pass


def check_data(data_uri: str, cfg: RunConfig) -> dict:
    """The dataset's manifest, checked against the model (context, vocabulary): read-only,
    so a mismatch fails before anything is written."""
    manifest = data.read_manifest(data_uri)
    n_ctx, vocab = manifest["n_ctx"], manifest["tokenizer"]["vocab_size"]
    if cfg.model.block_size > n_ctx:
        raise RunError(f"block_size={cfg.model.block_size} exceeds the data's n_ctx={n_ctx}; prepare data with --n-ctx {cfg.model.block_size} or lower --n-ctx")
    if cfg.model.vocab_size != vocab:
        raise RunError(f"vocab_size={cfg.model.vocab_size} but the data's tokenizer has {vocab} ids")
    return manifest


_KEPT: dict[tuple, tuple] = {}  # load_data(keep=True): the last dataset read in this process


def load_data(data_uri: str, cfg: RunConfig, keep: bool = False):
    """(train rows, val rows) cut to the model's context, checked against its vocabulary.
    ``keep``: hold the rows in this process for the next call on the same dataset and shapes
    (a sweep's trials share one long-lived process; a dataset never changes once written)."""
    manifest = check_data(data_uri, cfg)
    width = cfg.model.block_size + 1
    n_val = cfg.train.eval_batches * cfg.train.batch_size
    key = (storage.resolve(data_uri).uri, manifest.get("plan_fingerprint"), width, n_val)  # a re-prepared dataset is another key
    if keep and key in _KEPT:
        return _KEPT[key]
    train_rows = data.load_rows(data_uri, "train")[:, :width]
    val_rows = data.load_rows(data_uri, "val", max_rows=n_val)[:, :width]
    if keep:
        _KEPT.clear()
        _KEPT[key] = (train_rows, val_rows, manifest)
    return train_rows, val_rows, manifest


@contextlib.contextmanager
def run_lease(out: storage.Location, what: str, take_over: bool = False, owner: str | None = None) -> Iterator[lease.Lease]:
    """Own RUN/lease.json while the block runs (renewed in the background, released after)."""
    held = lease.acquire(out.join(LEASE_FILE), owner=owner, what=what, take_over=take_over)
    if held.took_over:
        import sys

        print(f"csp: taking over {out.uri} from {lease.describe(held.took_over)}", file=sys.stderr)
    with held.start():
        yield held


def check_config(out: storage.Location, config: dict) -> None:
    """Refuse a run directory that holds a run of another configuration, naming the first
    setting that differs (``train.steps=1200, not 2400``)."""
    run_file = out.join(RUN_FILE)
    if not storage.exists(run_file):
        return
    stored = storage.read_json(run_file).get("config")
    if stored == config:
        return
    diff = _first_difference(stored, config)
    raise RunError(f"{out.uri} holds a run with another configuration ({diff}); resume it with its own settings, "
                   "or choose a new --out (or delete it)")


def _first_difference(old, new, path: str = "") -> str:
    """``a.b=old, not new`` for the first key (sorted, depth first) where two configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    return f"{path or 'config'}={old!r}, not {new!r}"


def train_local(
    data_uri: str,
    out_uri: str,
    cfg: RunConfig,
    device: str = "auto",
    progress: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    take_over: bool = False,
    owner: str | None = None,
    keep_rows: bool = False,
    marks: dict | None = None,
) -> train_lib.TrainResult | None:
    """Train (or resume, or skip when finished) one run; returns None when already done.

    ``owner`` names the lease holder (a sweep trial passes its own, so Tune's retry of the
    trial re-takes it); ``keep_rows`` keeps the dataset's rows in this process for the next
    run (``load_data``); ``marks`` gets the wall-clock times at which setup and the training
    loop ended (``t_ready``, ``t_loop_end``)."""
    train_lib.resolve_device(device)  # a bad --device fails before anything is written
    out = storage.resolve(out_uri)
    record = {"config": cfg.to_dict(), "data": storage.resolve(data_uri).uri}
    check_config(out, record["config"])
    step = checkpoints.latest_step(out.uri)
    if step is not None and step >= cfg.train.steps:
        return None
    check_data(data_uri, cfg)  # every check that needs no write comes before the lease
    with run_lease(out, "csp train", take_over, owner) as held:
        check_config(out, record["config"])  # re-read under the lease: the last owner may have changed it
        state = checkpoints.load(out.uri) if checkpoints.latest_step(out.uri) is not None else None
        if state is not None and state.step >= cfg.train.steps:
            return None
        train_rows, val_rows, _ = load_data(data_uri, cfg, keep=keep_rows)
        storage.write_json(out.join(RUN_FILE), record)
        since = state.step if state is not None else 0
        history: list[dict] = []  # this process's reports; stored ones up to `since` are kept on save

        def report(m: dict) -> None:
            history.append(m)
            if progress is not None:
                progress(m)

        def save(files: dict[str, bytes], step: int) -> None:
            held.check()
            checkpoints.save(out.uri, files, step, keep=cfg.train.milestones)
            checkpoints.write_metrics(out.uri, history, since)

        if marks is not None:
            marks["t_ready"] = time.time()
        result = train_lib.train(
            cfg,
            TokenRows(train_rows, cfg.train.batch_size // cfg.train.micro_batches, seed=cfg.train.seed),
            device,
            report,
            val_batches=FixedBatches(val_rows, cfg.train.batch_size, cfg.train.eval_batches),
            state=state,
            save=save,
            stop_after=stop_after,
        )
        if marks is not None:
            marks["t_loop_end"] = time.time()
        return result
