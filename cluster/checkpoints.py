"""A run directory on a storage URI (local or s3://), and the one owner of its layout.

    RUN/run.json                    the RunConfig and the dataset it trains on
    RUN/metrics.jsonl               every reported metric
    RUN/checkpoints/step-00000500/{model.safetensors, config.json, train_state.pt}
    RUN/checkpoints/latest.json     {"step": 500, "path": "step-00000500"}, written after the files

A reader follows latest.json, so it never sees a half-written checkpoint; older ones are
deleted after a newer one is complete (``keep_last``).
"""

from __future__ import annotations

from cluster import storage
from sparsity import checkpoint_format as ckpt_lib

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
_FILES = (ckpt_lib.MODEL_FILE, ckpt_lib.CONFIG_FILE, ckpt_lib.STATE_FILE)


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def save(run_uri: str, files: dict[str, bytes], step: int, keep_last: int = 2) -> str:
    """Write one checkpoint, then point latest.json at it, then drop old ones."""
    root = storage.resolve(run_uri).join(CHECKPOINTS)
    d = root.join(step_dir(step))
    for name, data in files.items():
        storage.write_bytes(d.join(name), data)
    storage.write_json(root.join(LATEST), {"step": step, "path": step_dir(step)})
    if keep_last > 0:
        steps = sorted({int(u.rsplit("step-", 1)[1].split("/", 1)[0]) for u in storage.ls(root) if "/step-" in u})
        for old in steps[:-keep_last]:
            if old != step:
                storage.remove(root.join(step_dir(old)), recursive=True)
    return d.uri


def latest_uri(run_uri: str) -> storage.Location:
    """Where a run's latest.json is (written last, after the checkpoint it names)."""
    return storage.resolve(run_uri).join(CHECKPOINTS, LATEST)


def latest_step(run_uri: str) -> int | None:
    loc = latest_uri(run_uri)
    return int(storage.read_json(loc)["step"]) if storage.exists(loc) else None


def run_name(ckpt_uri: str) -> str:
    """The name of the run a checkpoint belongs to: its run directory's last component
    (a sweep trial's name), for a run, its checkpoints/ or one step directory."""
    d = _checkpoint_dir(ckpt_uri)
    run = d.parent.parent if d.parent.name == CHECKPOINTS else d
    return run.name or "model"


def _checkpoint_dir(uri: str) -> storage.Location:
    """A run directory, its checkpoints/ directory, or one step directory → the step dir."""
    loc = storage.resolve(uri)
    if storage.exists(loc.join(ckpt_lib.CONFIG_FILE)):
        return loc
    for root in (loc.join(CHECKPOINTS), loc):
        if storage.exists(root.join(LATEST)):
            return root.join(storage.read_json(root.join(LATEST))["path"])
    raise ckpt_lib.CheckpointError(
        f"no checkpoint at {loc.uri}: expected {ckpt_lib.CONFIG_FILE}, or {CHECKPOINTS}/{LATEST} from `csp train`"
    )


def load(uri: str, with_train_state: bool = True) -> ckpt_lib.Checkpoint:
    """The checkpoint at ``uri`` (the latest one when ``uri`` is a run directory)."""
    d = _checkpoint_dir(uri)
    names = _FILES if with_train_state else _FILES[:2]
    files = {n: storage.read_bytes(d.join(n)) for n in names if storage.exists(d.join(n))}
    return ckpt_lib.from_files(files, where=d.uri, with_train_state=with_train_state)


def export_reference(ckpt_uri: str, out_uri: str) -> str:
    """Write the checkpoint in the reference layout (beeg_config.json + final_model.pt)."""
    ckpt = load(ckpt_uri, with_train_state=False)
    out = storage.resolve(out_uri)
    for name, data in ckpt_lib.export_reference(ckpt.build_model()).items():
        storage.write_bytes(out.join(name), data)
    return out.uri


def import_reference(ref_uri: str, out_uri: str) -> ckpt_lib.Checkpoint:
    """Read a reference-layout model and store it as a csp checkpoint (weights + config)."""
    ref = storage.resolve(ref_uri)
    files = {n: storage.read_bytes(ref.join(n)) for n in (ckpt_lib.REF_CONFIG, ckpt_lib.REF_WEIGHTS) if storage.exists(ref.join(n))}
    ckpt = ckpt_lib.import_reference(files, where=ref.uri)
    model = ckpt.build_model()
    out_files = ckpt_lib.to_files(model, ckpt.config, 0, {"imported_from": ref.uri})
    save(out_uri, out_files, 0)
    return ckpt


def run_data_uri(ckpt_uri: str) -> str | None:
    """The dataset a checkpoint was trained on, from its run's run.json (None if unknown)."""
    d = _checkpoint_dir(ckpt_uri)
    for cand in (d.parent.parent, d.parent, d):  # run/checkpoints/step-N, or the run dir itself
        f = cand.join(RUN_FILE)
        if storage.exists(f):
            return storage.read_json(f).get("data")
    return None


def checkpoint_dir(ckpt_uri: str) -> str:
    """The URI of the step directory a checkpoint URI resolves to."""
    return _checkpoint_dir(ckpt_uri).uri
