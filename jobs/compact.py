"""Compaction of the results store: many one-result files become a few large ones per
task partition, with no reader ever seeing a row twice and nothing lost if it is killed.

A fan-out writes one small file per result and table (jobs/store.py); compaction merges
them, per table and task partition, into *generation* files

    RESULTS/<table>/task=T/compacted-<gen>-<i>.parquet     gen = <UTC time>-<random>: sortable

sorted by result key, so a filter on ``model_id`` reads few row groups. The protocol needs
no log and no coordinator, only atomic file writes (rename locally, one PUT on S3):

1. list the partition's files with their versions (mtime or ETag);
2. read the inputs: every small file of a stored result (for circuit_nodes and
   circuit_edges, only results whose circuits row exists: an in-flight pair is left alone)
   and every generation smaller than half the target size, or that holds a result a small
   file holds too;
3. write the merged rows as a new generation, file by file, then (circuits) the partition's
   pointer ``_generations.json``: the generation files it holds once the inputs are gone,
   which the fan-out's existence check reads instead of listing the partition;
4. delete the inputs, a small file only if its version is still the one that was read.

Until step 4 ends, a result can be in a small file and in a generation, or in two
generations. Readers (jobs/results.py) resolve that by one rule, :func:`dedupe`: a result's
rows come from one file, a small file before any generation and a newer generation before
an older one. So a reader sees each row once at every instant — while a compaction runs,
after one was killed at any point, while two run at once, and while fan-outs write — and a
re-run merges what a killed one left. Plain ``pd.read_parquet`` of a table applies no such
rule: it returns each row once except while a compaction is between steps 3 and 4 or after
one was killed there (until the next compaction).

One compaction at a time per partition: a lease (cluster/lease.py) at
``RESULTS/_compaction/task=T.json``; a partition another process is compacting is skipped.
"""

from __future__ import annotations

import datetime
import re
import uuid

import pyarrow as pa

from cluster import lease as lease_lib
from cluster import storage
from jobs.store import CIRCUITS, EDGES, NODES, SCHEMAS, pandas_metadata, result_uid

TABLES = (EDGES, NODES, CIRCUITS)  # circuits last: a stored result's row is merged after its nodes and edges
KEYS = ["model_id", "prune_key", "control"]  # with the task partition: one result
LOCKS = "_compaction"
TARGET_BYTES = 128 << 20  # a generation file's size, about
ROW_GROUP_ROWS = {CIRCUITS: 4096, NODES: 131072, EDGES: 131072}
POINTER = "_generations.json"  # in circuits/task=T/: the partition's generation files, written before any input is deleted
GEN_RE = re.compile(r"^compacted-(\d{8}T\d{12}Z-[0-9a-f]{8})-\d+\.parquet$")
_HOOK = None  # tests: called with a stage name ("part_written", "deleting") to stop a compaction there


def gen_of(uri: str) -> str | None:
    """The generation a file belongs to; None for a one-result file."""
    m = GEN_RE.match(uri.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def pointed_gens(part: storage.Location) -> list[str]:
    """The generation files of one circuits partition, as its pointer (:data:`POINTER`) names
    them: one small read, local or on S3, however many one-result files the partition
    holds. No pointer: no compaction got as far as deleting anything there, so every result
    still has its own file."""
    from cluster.storage_errors import NotFoundError

    try:
        names = storage.read_json(part.join(POINTER))["generations"]
    except NotFoundError:
        return []
    return [part.join(n).uri for n in names]


def _point(loc: storage.Location, gens: list[str]) -> None:
    storage.write_json(loc.join(POINTER), {"generations": sorted(u.rsplit("/", 1)[-1] for u in gens)})


def task_of(uri: str) -> str:
    return uri.rsplit("/task=", 1)[-1].split("/", 1)[0]


def may_overlap(files: list[str]) -> bool:
    """Whether some result can be in two of these files: a partition holding a generation
    and a small file, or two generations."""
    parts: dict[str, tuple[set, int]] = {}
    for f in files:
        gens, smalls = parts.setdefault(task_of(f), (set(), 0))
        g = gen_of(f)
        parts[task_of(f)] = (gens | {g}, smalls) if g else (gens, smalls + 1)
    return any(gens and (smalls or len(gens) > 1) for gens, smalls in parts.values())


def _precedence(uri: str) -> tuple[int, str]:
    g = gen_of(uri)
    return (0, g) if g else (1, "")  # every small file before every generation; newer generations first


def dedupe(t: pa.Table, file_col: str = "__filename") -> pa.Table:
    """The rows of ``t`` (with the file each came from in ``file_col``, and ``task``) that
    win: per result key, those of its highest-precedence file. Drops ``file_col``."""
    import numpy as np
    import pandas as pd
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(t.column(file_col)).combine_chunks()
    files = enc.dictionary.to_pylist()
    ranks = sorted(set(map(_precedence, files)))
    rank_of = np.array([ranks.index(_precedence(f)) for f in files], dtype=np.int64)
    df = pd.DataFrame({k: t.column(k).to_pandas() for k in [*KEYS, "task"]}).astype(object).fillna("")
    df["rank"] = rank_of[enc.indices.to_numpy(zero_copy_only=False)]
    keep = df.groupby([*KEYS, "task"], sort=False)["rank"].transform("max").to_numpy() == df["rank"].to_numpy()
    return t.drop_columns([file_col]).filter(pa.array(keep))


def compact(results_uri: str, tasks: list[str] | None = None, owner: str | None = None,
            target_bytes: int = TARGET_BYTES) -> dict:
    """Merge the small files of every task partition (of ``tasks`` only, when given) that
    has some. Returns counts: partitions merged, partitions skipped because another process
    is compacting them, and files per table before and after."""
    root = storage.resolve(results_uri)
    found = {t: storage.versions(root.join(t), ".parquet") for t in TABLES}
    parts = sorted({task_of(u) for files in found.values() for u in files})
    todo = [p for p in parts if (tasks is None or p in tasks) and (_worth(p, found) or _unpointed(root, p, found))]
    out = {"partitions": 0, "busy": [], "files_before": {t: len(found[t]) for t in TABLES}}
    me = owner or lease_lib.new_owner("compact")
    for task in todo:
        held, _ = lease_lib.try_acquire(root.join(LOCKS, f"task={task}.json"), me, what=f"compact task={task}", take_over=True)
        if held is None:
            out["busy"].append(task)
            continue
        with held.start():
            out["partitions"] += _compact_partition(root, task, target_bytes)
    out["files_after"] = {t: len(storage.versions(root.join(t), ".parquet")) for t in TABLES}
    return out


def _worth(task: str, found: dict) -> bool:
    """A partition with two files to merge in some table: small files or generations."""
    for t in TABLES:
        mine = [u for u in found[t] if task_of(u) == task]
        if len({gen_of(u) for u in mine if gen_of(u)}) + sum(gen_of(u) is None for u in mine) >= 2:
            return True
    return False


def _unpointed(root: storage.Location, task: str, found: dict) -> bool:
    """A circuits partition with generations and no pointer: compacted by csp before it wrote
    one. Compacting it writes the pointer."""
    has_gens = any(gen_of(u) and task_of(u) == task for u in found[CIRCUITS])
    return has_gens and not _has_pointer(root, task)


def _has_pointer(root: storage.Location, task: str) -> bool:
    return storage.exists(root.join(CIRCUITS, f"task={task}", POINTER))


def _compact_partition(root: storage.Location, task: str, target_bytes: int) -> bool:
    """Whether some table of the partition was merged."""
    gen = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:8]
    files = {t: storage.versions(root.join(t, f"task={task}"), ".parquet") for t in TABLES}
    stored = _stored_uids(root, task, files[CIRCUITS])
    merged = False
    for table in TABLES:  # a circuits file always; a node or edge file once its result's row is stored
        merged |= _compact_table(root.join(table, f"task={task}"), table, files[table], None if table == CIRCUITS else stored, gen, target_bytes)
    if not merged and not _has_pointer(root, task):
        _point(root.join(CIRCUITS, f"task={task}"), [u for u in files[CIRCUITS] if gen_of(u)])
        return True
    return merged


def _stored_uids(root: storage.Location, task: str, circ_files: dict) -> set[str]:
    """File names (jobs.store.result_uid) of the results whose circuits row is stored: a
    one-result file's own name, and the keys of the generations."""
    out = {u.rsplit("/", 1)[-1] for u in circ_files if not gen_of(u)}
    gens = [u for u in circ_files if gen_of(u)]
    if gens:
        t = _read(root.join(CIRCUITS, f"task={task}"), CIRCUITS, gens, columns=KEYS)
        out |= {result_uid(*key) for key in result_keys(t)}
    return out


def _read(loc: storage.Location, table: str, uris: list[str], columns: list[str] | None = None) -> pa.Table:
    """Rows of these files of one partition (the table's schema, without ``task``), with ``__filename``."""
    schema = SCHEMAS[table].remove(SCHEMAS[table].get_field_index("task"))
    return scan(loc, [storage.resolve(u).path for u in uris], schema, columns=(columns or schema.names) + ["__filename"])


SCAN_FILES = 512  # files per read: one-result files are read this many at a time


def scan(loc: storage.Location, paths: list[str], schema: pa.Schema, columns: list[str] | None = None, filter=None,
         partitioning=None, base_dir: str | None = None) -> pa.Table:
    """The rows of these Parquet files (paths on ``loc``'s filesystem), :data:`SCAN_FILES` at
    a time, each batch copied into buffers of its own before the next is read. Reading a
    one-result file holds about 350 KB of decoded pages, which its rows keep alive: 100,000
    of them read at once would need about 35 GB."""
    import pyarrow.dataset as ds

    parts = []
    for i in range(0, len(paths), SCAN_FILES):
        d = ds.dataset(paths[i : i + SCAN_FILES], filesystem=loc.pa_fs, format="parquet", schema=schema,
                       partitioning=partitioning, partition_base_dir=base_dir)
        t = d.to_table(filter=filter, columns=columns)
        parts.append(t.combine_chunks() if len(paths) > SCAN_FILES else t)
    return pa.concat_tables(parts) if len(parts) != 1 else parts[0]


def _compact_table(loc: storage.Location, table: str, files: dict, stored: set[str] | None, gen: str, target_bytes: int) -> bool:
    smalls = [u for u in files if gen_of(u) is None and (stored is None or u.rsplit("/", 1)[-1] in stored)]
    gens: dict[str, list[str]] = {}
    for u in files:
        if gen_of(u):
            gens.setdefault(gen_of(u), []).append(u)
    if not smalls and len(gens) <= 1:
        return False
    size = {g: sum(files[u][0] for u in us) for g, us in gens.items()}
    inputs = smalls + [u for g, us in gens.items() if size[g] < target_bytes // 2 for u in us]
    big = [u for g, us in gens.items() if size[g] >= target_bytes // 2 for u in us]
    if big and smalls:  # a big generation is rewritten only when it holds a result a newer file holds too
        newer = result_keys(_read(loc, table, inputs, KEYS))
        big_keys = _read(loc, table, big, KEYS)
        for g in {gen_of(u) for u in big}:
            mine = [u for u in big if gen_of(u) == g]
            if result_keys(big_keys.filter(_in(big_keys, mine))) & newer:
                inputs += mine
    if len(inputs) < 2:
        return False
    import pyarrow.compute as pc

    t = _read(loc, table, inputs)
    t = dedupe(t.append_column("task", pa.array([""] * len(t), pa.string())))
    t = t.drop_columns(["task"])
    t = t.take(pc.sort_indices(t, sort_keys=[(k, "ascending") for k in KEYS]))
    t = t.replace_schema_metadata(pandas_metadata(t.schema))
    # the output's size, over-estimated both ways: one-result files are mostly footer, and
    # Arrow's in-memory size is before compression
    size = min(sum(files[u][0] for u in inputs), t.nbytes)
    per_file = max(1, int(len(t) * target_bytes / max(size, 1)))
    written = []
    for i, start in enumerate(range(0, max(len(t), 1), per_file)):
        written.append(storage.write_parquet(loc.join(f"compacted-{gen}-{i}.parquet"), t.slice(start, per_file),
                                             row_group_size=ROW_GROUP_ROWS[table], compression="zstd").uri)
        if _HOOK:
            _HOOK("part_written")
    if table == CIRCUITS:  # what the existence check reads (jobs.results.has_result): the generations once the inputs are gone
        _point(loc, [*(u for u in files if gen_of(u) and u not in inputs), *written])
    if _HOOK:
        _HOOK("deleting")
    now = storage.versions(loc, ".parquet")  # a small file written again since it was read stays
    _remove(loc, [u for u in inputs if u in now and (gen_of(u) or now[u][1] == files[u][1])])
    return True


def _remove(loc: storage.Location, uris: list[str]) -> None:
    """Delete these files of one partition: on S3 in batches of 1,000 per request."""
    import contextlib
    import os

    from cluster.storage_errors import translated

    with translated(loc, "delete"):
        if loc.is_s3:
            loc.fs.rm([storage.resolve(u).path for u in uris])
            return
        for u in uris:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(u)


def result_keys(t: pa.Table) -> set[tuple]:
    """The (model_id, prune_key, control) of every result with a row in ``t``."""
    return set(zip(*(t.column(k).to_pylist() for k in KEYS), strict=True))


def _in(t: pa.Table, uris: list[str]):
    import pyarrow.compute as pc

    return pc.is_in(t.column("__filename"), value_set=pa.array([storage.resolve(u).path for u in uris]))
