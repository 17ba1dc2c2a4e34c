"""The circuit results store: three Hive-partitioned Parquet tables under a results URI.

    RESULTS/circuits/task=NAME/<model>-<uid>.parquet        one row per (checkpoint, task)
    RESULTS/circuit_nodes/task=NAME/<model>-<uid>.parquet   one row per kept node
    RESULTS/circuit_edges/task=NAME/<model>-<uid>.parquet   one row per edge

Partitioned by ``task`` (20 values: a filter on one task reads one directory). Schemas are
explicit module constants, never inferred; each (model, task) pair owns one file name per
table, written atomically (PUT or rename), nodes and edges before the circuits row — so
readers never see a partial row set, and a retried pair replaces rather than duplicates.
"""

from __future__ import annotations

import json

import pyarrow as pa

from cluster import storage
from sparsity.circuit import NODE_LOCATIONS, SCHEMA_VERSION, WEIGHT_EDGE_KINDS, Circuit

CIRCUITS, NODES, EDGES = "circuits", "circuit_nodes", "circuit_edges"

_MODEL_FIELDS = [
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("checkpoint_uri", pa.string()),
    pa.field("checkpoint_fingerprint", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("pfrac", pa.float64()),
    pa.field("ef", pa.float64()),
    pa.field("afrac", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("val_loss", pa.float64()),
]

CIRCUITS_SCHEMA = pa.schema(
    _MODEL_FIELDS
    + [
        pa.field("task", pa.string(), nullable=False),
        pa.field("ablation", pa.string()),
        pa.field("target", pa.float64()),
        pa.field("status", pa.string(), nullable=False),  # ok | trivial | target_not_reached | chance | failed
        pa.field("error", pa.string()),
        pa.field("k", pa.int64()),
        pa.field("nodes_total", pa.int64()),
        pa.field("n_nodes", pa.int64()),
        pa.field("n_edges", pa.int64()),
        pa.field("n_edges_resid", pa.int64()),
    ]
    + [pa.field(f"n_nodes_{loc.replace('.', '_')}", pa.int64()) for loc in NODE_LOCATIONS]
    + [pa.field(f"n_edges_{kind.replace('.', '_')}", pa.int64()) for kind in WEIGHT_EDGE_KINDS]
    + [
        pa.field("full_loss", pa.float64()),
        pa.field("full_accuracy", pa.float64()),
        pa.field("full_misses_target", pa.bool_()),
        pa.field("sufficiency_loss", pa.float64()),
        pa.field("sufficiency_accuracy", pa.float64()),
        pa.field("necessity_loss", pa.float64()),
        pa.field("calibration_scale", pa.float64()),
        pa.field("calibration_shift", pa.float64()),
        pa.field("prune_seconds", pa.float64()),
        pa.field("code_version", pa.string()),
        pa.field("provenance", pa.string()),  # JSON: prune config, seeds, model config
    ]
)

NODES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("layer", pa.int32()),
    pa.field("location", pa.string()),
    pa.field("index", pa.int32()),
])

EDGES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("kind", pa.string()),
    pa.field("weight", pa.float32()),
    pa.field("src_layer", pa.int32()),
    pa.field("src_location", pa.string()),
    pa.field("src_index", pa.int32()),
    pa.field("dst_layer", pa.int32()),
    pa.field("dst_location", pa.string()),
    pa.field("dst_index", pa.int32()),
])


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("csp")
    except PackageNotFoundError:
        return "unknown"


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def write_result(results_uri: str, model: dict, task: str, circuit: Circuit | None, status: str | None = None,
                 error: str | None = None, extra: dict | None = None) -> str:
    """Store one (checkpoint, task) result: a circuit, or a verdict row with no nodes.

    ``model``: model_id, checkpoint_uri, checkpoint_fingerprint, step, pfrac, ef, afrac,
    seed, val_loss. Node and edge files are written before the circuits row, so a reader
    that sees the row can rely on its nodes and edges being there.
    """
    root = storage.resolve(results_uri)
    # One file name per (model, task) in its task partition: a retried or repeated pair
    # replaces its own files instead of adding rows, so every pair is stored exactly once.
    uid = f"{model['model_id']}.parquet"
    base = {"schema_version": SCHEMA_VERSION, "model_id": model["model_id"], "task": task}
    row = {**base, **model, "status": status, "error": error, "code_version": code_version(), **(extra or {})}
    if circuit is not None:
        crow, nodes, edges = circuit.to_rows()
        row.update({k: v for k, v in crow.items() if k not in ("task",)})
        row["status"] = status or circuit.metrics.get("status", "ok")
        storage.write_parquet(root.join(NODES, f"task={task}", uid), _table([{**base, **n} for n in nodes], NODES_SCHEMA).drop(["task"]))
        storage.write_parquet(root.join(EDGES, f"task={task}", uid), _table([{**base, **e} for e in edges], EDGES_SCHEMA).drop(["task"]))
    if isinstance(row.get("provenance"), dict):
        row["provenance"] = json.dumps(row["provenance"], sort_keys=True)
    storage.write_parquet(root.join(CIRCUITS, f"task={task}", uid), _table([row], CIRCUITS_SCHEMA).drop(["task"]))
    return uid


def read_table(results_uri: str, table: str = CIRCUITS, task: str | None = None):
    """A results table as a pandas DataFrame (``task`` is a partition filter)."""
    return _query(results_uri, table, task, None)


def stored_pairs(results_uri: str) -> set[tuple[str, str]]:
    """(checkpoint fingerprint, task) of every pair already in the circuits table."""
    df = read_table(results_uri, CIRCUITS)
    return set(zip(df["checkpoint_fingerprint"].astype(str), df["task"].astype(str), strict=True))


def _query(results_uri: str, table: str, task: str | None, model: str | None, filters=None):
    """A table as pandas with the task partition pruned and extra pyarrow filters pushed down."""
    import pyarrow.dataset as ds

    schema = {CIRCUITS: CIRCUITS_SCHEMA, NODES: NODES_SCHEMA, EDGES: EDGES_SCHEMA}[table]
    loc = storage.resolve(results_uri).join(table)
    if not storage.ls(loc):
        return _table([], schema).to_pandas()
    part = ds.partitioning(pa.schema([pa.field("task", pa.string())]), flavor="hive")
    d = ds.dataset(loc.path, filesystem=loc.pa_fs, format="parquet", partitioning=part, schema=schema)
    expr = None
    for e in ([ds.field("task") == task] if task else []) + ([ds.field("model_id") == model] if model else []) + ([filters] if filters is not None else []):
        expr = e if expr is None else expr & e
    return d.to_table(filter=expr).to_pandas()


def circuits(results_uri: str, task: str | None = None, model: str | None = None, filters=None):
    """One row per (checkpoint, task) as a DataFrame; ``filters`` is a pyarrow expression."""
    return _query(results_uri, CIRCUITS, task, model, filters)


def nodes(results_uri: str, task: str | None = None, model: str | None = None, filters=None):
    return _query(results_uri, NODES, task, model, filters)


def edges(results_uri: str, task: str | None = None, model: str | None = None, filters=None):
    return _query(results_uri, EDGES, task, model, filters)


def frontier(results_uri: str):
    """Per model: validation loss (capability) and the geometric mean of circuit edges over
    the tasks where a circuit met the target (interpretability; lower is better).

    ``geomean_edges`` is over each model's own solved tasks; ``geomean_edges_common`` over
    the tasks that every model solved (``common_tasks`` of them), the fair comparison when
    models solve different task sets (NaN when no task is common)."""
    import numpy as np
    import pandas as pd

    df = circuits(results_uri)
    ok = df[df["status"] == "ok"]
    models = sorted(df["model_id"].unique())
    common = sorted(set.intersection(*(set(ok[ok["model_id"] == m]["task"]) for m in models))) if models else []

    def geomean(edges) -> float:
        return float(np.exp(np.log(edges.clip(lower=1).astype(float)).mean())) if len(edges) else float("nan")

    rows = []
    for model_id, g in df.groupby("model_id"):
        good = ok[ok["model_id"] == model_id]
        first = g.iloc[0]
        rows.append({
            "model_id": model_id, "pfrac": first["pfrac"], "ef": first["ef"], "val_loss": first["val_loss"],
            "tasks_with_circuit": len(good), "tasks": len(g),
            "geomean_edges": geomean(good["n_edges"]),
            "common_tasks": len(common),
            "geomean_edges_common": geomean(good[good["task"].isin(common)]["n_edges"]),
        })
    return pd.DataFrame(rows).sort_values("val_loss").reset_index(drop=True) if rows else pd.DataFrame(rows)
