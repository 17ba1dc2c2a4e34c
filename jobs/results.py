"""Reading the circuit results store (its tables and writing: jobs/store.py): the tables
as pandas with the task partition pruned, the checks a reader who names a store gets, and
the analyses — the capability/interpretability frontier and the faithfulness controls.

Only ``ok`` rows are verified circuits: the full model met the target on held-out test
pairs and so did the circuit (sufficiency). :func:`frontier` and the CLI count those.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from cluster import storage
from cluster.storage_errors import CorruptFileError, one_line
from jobs import compact
from jobs.store import CIRCUITS, EDGES, NODES, SCHEMAS, arrow_table, pandas_metadata, read_searches
from sparsity.circuit import SOLVED, TESTED
from sparsity.errors import CspError


def read_table(results_uri: str, table: str = CIRCUITS, task: str | None = None):
    """A results table as a pandas DataFrame (``task`` is a partition filter)."""
    return _query(results_uri, table, task, None)


def stored_pairs(results_uri: str) -> set[tuple[str, str, str, str]]:
    """(checkpoint fingerprint, task, prune key, control or "") of every stored result."""
    df = read_table(results_uri, CIRCUITS)
    return set(zip(df["checkpoint_fingerprint"].astype(str), df["task"].astype(str), df["prune_key"].astype(str),
                   df["control"].fillna("").astype(str), strict=True))


def _query(results_uri: str, table: str, task: str | None, model: str | None, filters=None):
    """A table as pandas: only the task's partition is listed and read, the model and
    ``filters`` (a pyarrow expression) are pushed down to row groups, and where compaction
    left a result in two files (jobs/compact.py) each of its rows is read once."""
    loc = storage.resolve(results_uri).join(table)
    for attempt in range(3):
        files = _table_files(loc.join(f"task={task}") if task else loc)
        try:
            t = _read_files(loc, table, files, task, model, filters)
            break
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:  # a truncated or foreign .parquet file in the store
            if attempt < 2 and _table_files(loc.join(f"task={task}") if task else loc) != files:
                continue  # a compaction replaced files while we read: read the new ones
            raise CorruptFileError(f"cannot read the {table} table under {loc.uri}: {one_line(str(e), 240)}; "
                                   "remove the damaged file and prune its pair again") from None
    if t is None:
        df = arrow_table([], SCHEMAS[table]).to_pandas()
        df["task"] = pd.Categorical([])
        return df
    # As plain `pd.read_parquet` reads the table: nullable integers and booleans, the task
    # partition last, as a category.
    body = t.drop(["task"])
    df = body.replace_schema_metadata(pandas_metadata(body.schema)).to_pandas()
    df["task"] = t.column("task").combine_chunks().dictionary_encode().to_pandas().astype("category")
    return df


def _read_files(loc: storage.Location, table: str, files: list[str], task: str | None, model: str | None, filters):
    import pyarrow.dataset as ds

    if not files:
        return None
    schema = SCHEMAS[table]
    part = ds.partitioning(pa.schema([pa.field("task", pa.string())]), flavor="hive")
    paths = [storage.resolve(f).path for f in files]
    keys = None
    for e in ([ds.field("task") == task] if task else []) + ([ds.field("model_id") == model] if model else []):
        keys = e if keys is None else keys & e

    def read(**kw):
        return compact.scan(loc, paths, schema, partitioning=part, base_dir=loc.path, **kw)

    if not compact.may_overlap(files):
        return read(filter=keys if filters is None else filters if keys is None else keys & filters)
    # A result in two files: pick its rows by file first, then apply the filters, so that a
    # filter on a value that changed between the copies cannot bring back the older one.
    t = compact.dedupe(read(filter=keys, columns=schema.names + ["__filename"]))
    return t if filters is None else t.filter(filters)


_GEN_KEYS: dict[str, tuple[list[str], set]] = {}  # partition → (its generation files, their result keys)


def has_result(results_uri: str, task: str, model_id: str, prune_key: str, control: str | None) -> bool:
    """Whether this result's circuits row is in a compacted file of its partition (its own
    file is one existence check: jobs.store.is_stored). One small read per call, the
    partition's pointer to its generations (jobs/compact.py), never a listing of the
    partition; the generations' keys are read once per process."""
    part = storage.resolve(results_uri).join(CIRCUITS, f"task={task}")
    for attempt in range(3):
        gens = compact.pointed_gens(part)
        if not gens:
            return False
        cached = _GEN_KEYS.get(part.uri)
        if cached is None or cached[0] != gens:
            try:
                t = _read_files(part.parent, CIRCUITS, gens, task, None, None)
            except OSError:  # a compaction replaced them while we read
                if attempt == 2:
                    raise
                continue
            cached = _GEN_KEYS[part.uri] = (gens, compact.result_keys(t))
        return (model_id, prune_key, control) in cached[1]
    return False


class ResultsError(CspError):
    pass


_WARNED: set[str] = set()


def _table_files(loc: storage.Location) -> list[str]:
    """The table's Parquet files (the store writes nothing else there). Any other file —
    notes, an editor's backup — is skipped with a warning, once per table and process."""
    every = [u for u in storage.ls(loc) if not u.rsplit("/", 1)[-1].startswith("_")]  # _name: the store's own, as pyarrow skips
    files = [u for u in every if u.endswith(".parquet")]
    stray = [u for u in every if not u.endswith(".parquet")]
    if stray and loc.uri not in _WARNED:
        _WARNED.add(loc.uri)
        import sys

        print(f"csp: warning: skipped {len(stray)} file(s) in {loc.uri} that are not Parquet: "
              f"{', '.join(u.rsplit('/', 1)[-1] for u in stray[:3])}{'…' if len(stray) > 3 else ''}", file=sys.stderr)
    return files


def check_store(results_uri: str, task: str | None = None, model: str | None = None) -> None:
    """For a reader who names a store, a task or a model: an error that says what exists
    when the store has no circuits table, or none of that task or model."""
    loc = storage.resolve(results_uri)
    if not storage.exists(loc.join(CIRCUITS)) or not storage.ls(loc.join(CIRCUITS), suffix=".parquet"):
        raise ResultsError(f"no results at {loc.uri}: it has no {CIRCUITS}/ table (`csp prune … --out {loc.uri}` writes one)")
    if task is None and model is None:
        return
    df = _query(results_uri, CIRCUITS, None, None).loc[:, ["task", "model_id"]]
    for flag, col, value in (("--task", "task", task), ("--model", "model_id", model)):
        have = sorted(set(df[col].astype(str)))
        if value is not None and value not in have:
            shown = ", ".join(have[:12]) + (f", … ({len(have)} in all)" if len(have) > 12 else "")
            raise ResultsError(f"{flag} {value!r}: no rows in {loc.uri}; it holds {shown}")


def find_model(results_uri: str, model: str, task: str | None = None) -> str:
    """The stored model id that ``model`` names, the same way for every command: an exact
    model id, else an exact trial name (``d128-dense``: the run's sweep trial), else a
    unique prefix of one id. ResultsError saying what is stored otherwise."""
    df = _query(results_uri, CIRCUITS, task, None).loc[:, ["model_id", "trial"]].astype(str)
    ids = sorted(set(df["model_id"]))
    if model in ids:
        return model
    by_trial = sorted(set(df.loc[df["trial"] == model, "model_id"]))
    if len(by_trial) == 1:
        return by_trial[0]
    hits = by_trial or [i for i in ids if i.startswith(model)]
    if len(hits) == 1:
        return hits[0]
    where = storage.resolve(results_uri).uri
    if not ids:
        raise ResultsError(f"no circuits stored under {where}" + (f" for task {task!r}" if task else ""))
    if hits:
        raise ResultsError(f"--model {model!r} matches {len(hits)} models ({', '.join(hits[:4])}{'…' if len(hits) > 4 else ''}); "
                           "give more of the id")
    raise ResultsError(f"no model {model!r} under {where}; stored: {', '.join(ids[:6])}{'…' if len(ids) > 6 else ''}")


def circuits(results_uri: str, task: str | None = None, model: str | None = None, filters=None, searches: str = "best"):
    """One row per (checkpoint, task, pruning config, control) as a DataFrame; ``filters`` is
    a pyarrow expression. Rows of `csp prune --search` runs carry ``search_best`` (True for
    the best run of its search); ``searches="best"`` keeps only those of them, ``"all"``
    every run."""
    df = _query(results_uri, CIRCUITS, task, model, filters)
    if not len(df) or not df["search_id"].notna().any():
        return df
    found = read_searches(results_uri)
    best = set(zip(found["search_id"], found["best_prune_key"], strict=True))  # per search: two searches may sample the same settings
    df["search_best"] = pd.array([None if sid is None or sid != sid else (sid, key) in best
                                  for sid, key in zip(df["search_id"], df["prune_key"], strict=True)], dtype="boolean")
    return df[df["search_best"].fillna(True)].reset_index(drop=True) if searches == "best" else df


def nodes(results_uri: str, task: str | None = None, model: str | None = None, filters=None):
    return _query(results_uri, NODES, task, model, filters)


def edges(results_uri: str, task: str | None = None, model: str | None = None, filters=None):
    return _query(results_uri, EDGES, task, model, filters)


def _verified_filter():
    import pyarrow.dataset as ds

    return (ds.field("status") == "ok") & ds.field("control").is_null()


VERIFIED_FILTER = _verified_filter()  # verified(), as a filter pushed down to the Parquet row groups


def verified(df):
    """The rows that are verified real circuits: status ``ok`` and no control."""
    return df[(df["status"] == "ok") & df["control"].isna()]


def at_target(df, target: float | None):
    """The rows of ``df`` pruned to ``target`` (all rows when None), and those that name no
    target (a verdict stored without its pruning config)."""
    import numpy as np

    if target is None:
        return df
    t = df["target"].astype(float)
    return df[t.isna() | np.isclose(t.fillna(-1.0), float(target))]


def frontier(results_uri: str, target: float | None = None):
    """Per model: validation loss (capability) and the geometric mean of circuit edges over
    the tasks with a verified circuit (interpretability; lower is better). Controls are left
    out; with several pruning configs stored, each (model, prune key) is its own row — a run
    with two targets stores one per target (``target`` keeps one). ``tasks_beating_random``:
    verified circuits that clearly beat random node sets of their size (beats_random_keep).

    ``geomean_edges`` is over each model's own solved tasks; ``geomean_edges_common`` over
    the tasks that every model solved (``common_tasks`` of them), the fair comparison when
    models solve different task sets (NaN when no task is common)."""
    import numpy as np
    import pandas as pd

    df = at_target(circuits(results_uri), target)
    df = df[df["control"].isna()]
    ok = verified(df)
    models = sorted(set(zip(df["model_id"], df["prune_key"], strict=True)))
    common = sorted(set.intersection(*(set(ok[(ok["model_id"] == m) & (ok["prune_key"] == k)]["task"]) for m, k in models))) if models else []

    def geomean(edges) -> float:
        return float(np.exp(np.log(edges.clip(lower=1).astype(float)).mean())) if len(edges) else float("nan")

    rows = []
    for (model_id, key), g in df.groupby(["model_id", "prune_key"]):
        good = ok[(ok["model_id"] == model_id) & (ok["prune_key"] == key)]
        first = g.iloc[0]
        rows.append({
            "model_id": model_id, "prune_key": key, "target": first["target"], "pfrac": first["pfrac"], "ef": first["ef"],
            "density": first.get("density"), "val_loss": first["val_loss"],
            "tasks_solved": int(g["status"].isin(SOLVED).sum()),
            "tasks_with_circuit": len(good), "tasks": len(g),
            "tasks_beating_random": int(good["beats_random_keep"].fillna(False).astype(bool).sum()),
            "geomean_edges": geomean(good["n_edges"]),
            "common_tasks": len(common),
            "geomean_edges_common": geomean(good[good["task"].isin(common)]["n_edges"]),
        })
    return pd.DataFrame(rows).sort_values("val_loss").reset_index(drop=True) if rows else pd.DataFrame(rows)


# Controls that must not yield a verified circuit (nonsense_task: the random-label control of
# stores written before the rule-based ones; read and judged, no longer run).
MUST_NOT_VERIFY = ("random_init", "nonsense_swap", "nonsense_fixed", "nonsense_task")


def jaccard(a: set, b: set) -> float | None:
    """|a ∩ b| / |a ∪ b| of two node sets; None when either is empty (no circuit to compare)."""
    return len(a & b) / len(a | b) if a and b else None


def controls(results_uri: str, task: str | None = None):
    """The faithfulness controls beside the real circuit they check, one row per
    (model, task, control): the real circuit's status and size, the control's status, size
    and test sufficiency, and for seed/ablation variants the Jaccard overlap of its node set
    with the real circuit's (None where either has no nodes). ``passes`` says whether the
    control came out as a faithful circuit requires: a random-init or nonsense control
    passes when its pruning ran to a test verdict (:data:`TESTED`) and did not verify, and
    fails when it verified; a row that never reached the test (chance, trivial, failed) is
    "not run" (None), as is every seed or ablation variant (reported, not judged).
    ``full_loss`` is the full model's own loss on the control's pairs."""
    import pandas as pd

    df = circuits(results_uri, task=task)
    ctl = df[df["control"].notna()]
    if not len(ctl):
        return pd.DataFrame(columns=["model_id", "task", "target", "control", "status", "n_nodes", "n_edges", "sufficiency_loss",
                                     "full_loss", "real_status", "real_n_nodes", "jaccard", "passes"])
    real = df[df["control"].isna()].set_index(["model_id", "task", "prune_key"])
    nd = nodes(results_uri, task=task)

    def node_set(model_id, t, key, control):
        uid_rows = nd[(nd["model_id"] == model_id) & (nd["task"] == t)]
        if "prune_key" in uid_rows:
            uid_rows = uid_rows[(uid_rows["prune_key"] == key) & (uid_rows["control"].fillna("") == (control or ""))]
        return set(zip(uid_rows["layer"], uid_rows["location"], uid_rows["node_index"], strict=True))

    rows = []
    for r in ctl.itertuples():
        key = r.base_prune_key
        base = real.loc[(r.model_id, r.task, key)] if (r.model_id, r.task, key) in real.index else None
        jac = None
        if base is not None and (r.control.startswith("seed_") or r.control.startswith("ablation_")):
            a, b = node_set(r.model_id, r.task, key, None), node_set(r.model_id, r.task, r.prune_key, r.control)
            jac = jaccard(a, b)
        passes = (r.status != "ok") if r.control in MUST_NOT_VERIFY and r.status in TESTED else None
        rows.append({"model_id": r.model_id, "task": r.task, "target": r.target, "control": r.control, "status": r.status,
                     "n_nodes": r.n_nodes, "n_edges": r.n_edges, "sufficiency_loss": r.sufficiency_loss, "full_loss": r.full_loss,
                     "real_status": None if base is None else base["status"],
                     "real_n_nodes": None if base is None else base["n_nodes"], "jaccard": jac, "passes": passes})
    return pd.DataFrame(rows).sort_values(["model_id", "task", "target", "control"]).reset_index(drop=True)


OVER_TRAINING_COLUMNS = ["trial", "task", "target", "step", "status", "full_loss", "n_nodes", "n_edges", "sufficiency_loss",
                         "jaccard_prev", "model_id", "prune_key"]


def over_training(results_uri: str, task: str | None = None, model: str | None = None, target: float | None = None):
    """Circuits over training: per run (``trial``), task, pruning config and checkpoint step,
    the full model's task loss, the verdict, the circuit's size, and ``jaccard_prev``, the
    node-set overlap with the same run's circuit at its previous pruned step (None at the
    first step, or where either has no nodes). ``model``: a trial name, else a model id or a
    unique prefix of one (its trial). Real circuits only, no controls."""
    import pandas as pd

    df = at_target(circuits(results_uri, task=task), target)
    df = df[df["control"].isna()]
    if model is not None:
        trials = set(df["trial"])
        df = df[df["trial"] == (model if model in trials else str(df.loc[df["model_id"] == find_model(results_uri, model, task), "trial"].iloc[0]))]
    if not len(df):
        return pd.DataFrame(columns=OVER_TRAINING_COLUMNS)
    nd = nodes(results_uri, task=task)
    nd = nd[nd["control"].isna()]
    sets = {k: set(zip(g["layer"], g["location"], g["node_index"], strict=True)) for k, g in nd.groupby(["model_id", "task", "prune_key"])}
    df = df.sort_values(["trial", "task", "prune_key", "step"]).copy()
    jac = []
    for _, g in df.groupby(["trial", "task", "prune_key"], sort=False):
        prev = None
        for r in g.itertuples():
            mine = sets.get((r.model_id, r.task, r.prune_key), set())
            jac.append(None if prev is None else jaccard(prev, mine))
            prev = mine
    df["jaccard_prev"] = pd.array(jac, dtype="Float64")
    return df[OVER_TRAINING_COLUMNS].sort_values(["trial", "task", "target", "step"]).reset_index(drop=True)
