"""A run directory on a storage URI (local or s3://), and the one owner of its layout.

    RUN/run.json                    the RunConfig and the dataset it trains on
    RUN/metrics.jsonl               every reported metric
    RUN/lease.json                  who writes the run now (cluster/lease.py)
    RUN/checkpoints/step-00000500/{model.safetensors, config.json, train_state.pt}
    RUN/checkpoints/latest.json     {"step": 500, "path": "step-00000500"}, written after the files

A reader follows latest.json, so it never sees a half-written checkpoint; older ones are
deleted after a newer one is complete (``keep_last``), except the run's milestones
(``TrainConfig.milestones``), which stay for analysis over training.
"""

from __future__ import annotations

from cluster import storage
from cluster.lease import LEASE_FILE  # noqa: F401  (RUN/lease.json, the run's one writer: the lease owns the name)
from sparsity import checkpoint_format as ckpt_lib

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
_FILES = (ckpt_lib.MODEL_FILE, ckpt_lib.CONFIG_FILE, ckpt_lib.STATE_FILE)


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def step_of(ckpt_dir_uri: str) -> int | None:
    """The step of a checkpoint directory named by :func:`step_dir` (None for another name)."""
    tail = str(ckpt_dir_uri).rstrip("/").rsplit("/", 1)[-1]
    return int(tail[5:]) if tail.startswith("step-") and tail[5:].isdigit() else None


def save(run_uri: str, files: dict[str, bytes], step: int, keep_last: int = 2, keep: tuple[int, ...] = ()) -> str:
    """Write one checkpoint, then point latest.json at it, then drop old ones. The milestones
    (``keep``: steps kept for good) stay, without their optimizer state once they are not
    among the last ``keep_last``: their weights and config are what analysis over training
    reads, at a third of a full checkpoint's bytes under Adam.

    latest.json only moves forward: a writer whose step is behind it (a second writer the
    lease did not stop, or a stale one) is refused before it writes anything."""
    root = storage.resolve(run_uri).join(CHECKPOINTS)
    ahead = _latest_record(root)
    if ahead is not None and int(ahead["step"]) > step:
        raise ckpt_lib.CheckpointError(f"{root.join(LATEST).uri} is already at step {ahead['step']}, ahead of this writer's step {step}: "
                                       "another process writes this run; refusing to move it back")
    d = root.join(step_dir(step))
    for name, data in files.items():
        storage.write_bytes(d.join(name), data)
    storage.write_json(root.join(LATEST), {"step": step, "path": step_dir(step)})
    if keep_last > 0:
        for old in _steps(root)[:-keep_last]:
            if old == step:
                continue
            if old in keep:  # a milestone keeps what analysis reads (weights, config), not the optimizer state
                if storage.exists(root.join(step_dir(old), ckpt_lib.STATE_FILE)):
                    storage.remove(root.join(step_dir(old), ckpt_lib.STATE_FILE))
            else:
                storage.remove(root.join(step_dir(old)), recursive=True)
    return d.uri


def steps(run_uri: str) -> list[int]:
    """The steps of a run's checkpoints on storage (milestones and the last ones), ascending."""
    return _steps(storage.resolve(run_uri).join(CHECKPOINTS))


def _steps(root: storage.Location) -> list[int]:
    """Step numbers of the step directories under ``root`` (RUN/checkpoints), ascending."""
    out = set()
    for u in storage.ls(root):
        tail = u.rsplit("/step-", 1)
        if len(tail) == 2 and tail[1].split("/", 1)[0].isdigit():
            out.add(int(tail[1].split("/", 1)[0]))
    return sorted(out)


def _complete(d: storage.Location) -> bool:
    return all(storage.exists(d.join(n)) for n in _FILES[:2])


def _latest_record(root: storage.Location) -> dict | None:
    loc = root.join(LATEST)
    return storage.read_json(loc) if storage.exists(loc) else None


_WARNED: set[str] = set()


def _resolve_latest(root: storage.Location) -> storage.Location | None:
    """The step directory latest.json names; when that one is missing or incomplete (deleted
    by hand, a copy cut short), the newest complete one, with a warning on stderr."""
    rec = _latest_record(root)
    if rec is None:
        return None
    d = root.join(rec["path"])
    if _complete(d):
        return d
    for step in reversed(_steps(root)):
        cand = root.join(step_dir(step))
        if _complete(cand):
            if root.uri not in _WARNED:
                _WARNED.add(root.uri)
                import sys

                print(f"csp: warning: {root.join(LATEST).uri} names {rec['path']}, which is missing or incomplete; "
                      f"using {step_dir(step)}, the newest complete checkpoint", file=sys.stderr)
            return cand
    raise ckpt_lib.CheckpointError(f"{root.join(LATEST).uri} names {rec['path']}, which is missing or incomplete, "
                                   "and no other complete checkpoint is there; delete the run directory and train again")


def latest_uri(run_uri: str) -> storage.Location:
    """Where a run's latest.json is (written last, after the checkpoint it names)."""
    return storage.resolve(run_uri).join(CHECKPOINTS, LATEST)


def latest_step(run_uri: str) -> int | None:
    """The step of the checkpoint a resume would load (None: no checkpoint yet)."""
    d = _resolve_latest(storage.resolve(run_uri).join(CHECKPOINTS))
    return None if d is None else int(d.name.split("-", 1)[1])


def recorded_step(run_uri: str) -> int | None:
    """The step latest.json records (None: none yet): one small read, for progress polls;
    :func:`latest_step` also checks that checkpoint is complete."""
    rec = _latest_record(storage.resolve(run_uri).join(CHECKPOINTS))
    return None if rec is None else int(rec["step"])


def read_metrics(run_uri: str) -> list[dict]:
    """The run's metrics rows (RUN/metrics.jsonl), oldest first."""
    import json

    loc = storage.resolve(run_uri).join(METRICS_FILE)
    if not storage.exists(loc):
        return []
    return [json.loads(line) for line in storage.read_text(loc).splitlines() if line.strip()]


def write_metrics(run_uri: str, rows: list[dict], since_step: int) -> None:
    """Store this process's metric ``rows`` (all after ``since_step``, where it resumed)
    merged with the stored rows up to ``since_step``: what earlier processes of the run
    reported is kept, rows of steps it redid are replaced."""
    import json

    kept = [m for m in read_metrics(run_uri) if m.get("step", 0) <= since_step] if since_step > 0 else []
    mine = [m for m in rows if m.get("step", 0) > since_step]
    storage.write_text(storage.resolve(run_uri).join(METRICS_FILE), "".join(json.dumps(m) + "\n" for m in kept + mine))


def run_name(ckpt_uri: str) -> str:
    """The name of the run a checkpoint belongs to: its run directory's last component
    (a sweep trial's name), for a run, its checkpoints/ or one step directory."""
    d = _checkpoint_dir(ckpt_uri)
    run = d.parent.parent if d.parent.name == CHECKPOINTS else d
    return run.name or "model"


def kept(ckpt_uri: str, milestones: tuple[int, ...] = ()) -> dict | None:
    """What the run of a checkpoint keeps on storage: every step, which of them are
    ``milestones``, and their bytes (None: a checkpoint outside a run directory)."""
    d = _checkpoint_dir(ckpt_uri)
    if d.parent.name != CHECKPOINTS:
        return None
    root = d.parent
    steps = _steps(root)
    return {"steps": steps, "milestones": [m for m in steps if m in milestones], "bytes": sum(storage.sizes(root).values())}


def select(uri: str, which: str = "final") -> list[str]:
    """Checkpoint directories of the run at ``uri`` (a run, its checkpoints/ or one step
    directory): ``final`` the latest; ``milestones`` the run's kept milestones and its latest;
    ``all`` every step on storage; or steps ``"500,1000"``, each of which must be kept.
    Ascending by step."""
    d = _checkpoint_dir(uri)
    if which == "final":
        return [d.uri]
    if d.parent.name != CHECKPOINTS:
        raise ckpt_lib.CheckpointError(f"--checkpoints {which}: {storage.resolve(uri).uri} is a lone checkpoint, not a run; "
                                       "give the run directory, or --checkpoints final")
    root = d.parent
    on_disk = _steps(root)
    if which == "all":
        steps = on_disk
    elif which == "milestones":
        run = root.parent.join(RUN_FILE)
        marked = set(storage.read_json(run).get("config", {}).get("train", {}).get("milestones", [])) if storage.exists(run) else set()
        steps = sorted({s for s in on_disk if s in marked} | {step_of(d.uri)})
    else:
        try:
            steps = sorted({int(x) for x in which.split(",") if x.strip()})
        except ValueError:
            raise ckpt_lib.CheckpointError(f"--checkpoints {which!r}: give final, milestones, all or steps such as 500,1000") from None
        missing = [s for s in steps if s not in on_disk]
        if missing or not steps:
            raise ckpt_lib.CheckpointError(f"--checkpoints {which}: step {missing[0] if missing else '?'} is not kept in {root.parent.uri} "
                                           f"(it keeps {', '.join(map(str, on_disk))})")
    return [root.join(step_dir(s)).uri for s in steps]


def _checkpoint_dir(uri: str) -> storage.Location:
    """A run directory, its checkpoints/ directory, or one step directory → the step dir."""
    loc = storage.resolve(uri)
    if storage.exists(loc.join(ckpt_lib.CONFIG_FILE)):
        return loc
    for root in (loc.join(CHECKPOINTS), loc):
        d = _resolve_latest(root)
        if d is not None:
            return d
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
