"""The circuit results store's tables and how a result is written: three Hive-partitioned
Parquet tables under a results URI.

    RESULTS/circuits/task=NAME/<model>--<prune key>[--<control>].parquet       one row per result
    RESULTS/circuit_nodes/task=NAME/<model>--<prune key>[--<control>].parquet  one row per kept node
    RESULTS/circuit_edges/task=NAME/<model>--<prune key>[--<control>].parquet  one row per edge

A result is keyed by (checkpoint, task, pruning config, control): the prune key hashes
every field of the PruneConfig (ablation, target, steps, k_coef, seed, …), so variants live
side by side and a re-run of the same config replaces nothing and adds nothing. ``control``
is null for a real circuit and names the faithfulness control otherwise.

Partitioned by ``task`` (20 values: a filter on one task reads one directory). Schemas are
explicit module constants, never inferred; each result owns one file name per table,
written atomically (PUT or rename), nodes and edges before the circuits row — so readers
never see a partial row set, and a retried result replaces rather than duplicates.

A fan-out ends by merging each partition's one-result files into ``compacted-*.parquet``
generations (jobs/compact.py); readers resolve a result stored in two files there.

Only ``ok`` rows are verified circuits: the full model met the target on held-out test
pairs and so did the circuit (sufficiency); :func:`write_result` refuses any other ``ok``.
Reading and analysing the tables: jobs/results.py.
"""

from __future__ import annotations

import datetime
import json

import pyarrow as pa

from cluster import storage
from sparsity.circuit import (
    EXTRA_EDGE_KINDS,
    NO_CIRCUIT,
    NODE_LOCATIONS,
    SCHEMA_VERSION,
    WEIGHT_EDGE_KINDS,
    Circuit,
)
from sparsity.version import code_version

CIRCUITS, NODES, EDGES = "circuits", "circuit_nodes", "circuit_edges"
SEARCHES = "searches"  # RESULTS/searches/task=<task>/<search_id>.parquet: one row per `--search` (jobs/prune_search.py)

_MODEL_FIELDS = [
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("trial", pa.string()),  # the run's name: a sweep's trial (joins summary.parquet on `trial`)
    pa.field("checkpoint_uri", pa.string()),
    pa.field("checkpoint_fingerprint", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("pfrac", pa.float64()),
    pa.field("ef", pa.float64()),
    pa.field("ef_mlp", pa.float64()),  # null: the MLP widens with ef
    pa.field("density", pa.float64()),  # weight density of every block matrix, as trained (SparsityConfig.l0frac)
    pa.field("afrac", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("val_loss", pa.float64()),
]

CIRCUITS_SCHEMA = pa.schema(
    _MODEL_FIELDS
    + [
        pa.field("task", pa.string(), nullable=False),
        pa.field("prune_key", pa.string()),  # PruneConfig.key(): which pruning config made this row
        pa.field("control", pa.string()),  # null: a real circuit; else random_init | nonsense_task | ablation_* | seed_*
        pa.field("base_prune_key", pa.string()),  # a control's: the prune key of the real circuit it checks
        pa.field("ablation", pa.string()),
        pa.field("target", pa.float64()),
        pa.field("prune_steps", pa.int64()),
        pa.field("k_coef", pa.float64()),
        pa.field("prune_seed", pa.int64()),
        # ok (verified) | not_verified | trivial | target_not_reached | model_misses_target | chance | failed
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("k", pa.int64()),
        pa.field("n_open", pa.int64()),
        pa.field("n_train_pairs", pa.int64()),
        pa.field("nodes_total", pa.int64()),
        pa.field("n_nodes", pa.int64()),
        pa.field("n_edges", pa.int64()),
        pa.field("n_edges_resid", pa.int64()),
    ]
    + [pa.field(f"n_nodes_{loc.replace('.', '_')}", pa.int64()) for loc in NODE_LOCATIONS]
    + [pa.field(f"n_edges_{kind.replace('.', '_')}", pa.int64()) for kind in WEIGHT_EDGE_KINDS + EXTRA_EDGE_KINDS]
    + [
        pa.field("full_loss", pa.float64()),
        pa.field("full_accuracy", pa.float64()),
        pa.field("full_misses_target", pa.bool_()),
        pa.field("selection_loss", pa.float64()),
        pa.field("sufficiency_loss", pa.float64()),
        pa.field("sufficiency_accuracy", pa.float64()),
        pa.field("necessity_loss", pa.float64()),
        pa.field("necessity_random_loss", pa.float64()),  # as many random nodes ablated (mean of 5 draws)
        pa.field("ablated_loss", pa.float64()),  # every node ablated: what the direct (embedding → unembedding) path alone does
        # A verified circuit's sufficiency controls (sparsity/scoring.py): as many random nodes kept
        # instead (mean of 8 uniform draws; of 8 with its per-location counts; best of the 16), the
        # share of the circuit's gain over `ablated_loss` that the best one gets, and the verdict.
        pa.field("random_keep_loss", pa.float64()),
        pa.field("random_keep_loc_loss", pa.float64()),
        pa.field("random_keep_best", pa.float64()),
        pa.field("random_keep_recovered", pa.float64()),  # (ablated − best) / (ablated − sufficiency)
        pa.field("beats_random_keep", pa.bool_()),
        # the circuit kept and every other node ablated with probability ½ (16 draws): mean, worst
        pa.field("partial_ablation_loss", pa.float64()),
        pa.field("partial_ablation_worst", pa.float64()),
        pa.field("calibration_scale", pa.float64()),
        pa.field("calibration_shift", pa.float64()),
        pa.field("convergence", pa.string()),  # JSON [[step, task loss, open gates, smoothed loss], ...] of the mask training
        pa.field("mask_steps", pa.int64()),  # steps the masks trained (≤ prune_steps; null: no mask trained)
        pa.field("stop_reason", pa.string()),  # converged (PruneConfig.stop_window) | max_steps; null: no mask trained
        pa.field("prune_seconds", pa.float64()),
        pa.field("phase_seconds", pa.string()),  # JSON {phase: seconds}: setup, masks, choose_k, verify, controls, edges
        pa.field("ray_node_id", pa.string()),  # the Ray node that pruned it (null outside Ray)
        pa.field("code_version", pa.string()),  # package version + git commit (+ .dirty) that made the row
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("provenance", pa.string()),  # JSON: prune config, seeds, model config
        pa.field("search_id", pa.string()),  # a `csp prune --search` trial: its search (jobs/prune_search.py); null otherwise
        pa.field("search_trial", pa.int32()),  # ... and its trial number in that search
    ]
)

NODES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prune_key", pa.string()),
    pa.field("control", pa.string()),
    pa.field("layer", pa.int32()),
    pa.field("location", pa.string()),
    pa.field("node_index", pa.int32()),  # the unit within its location: a residual channel, head dim or neuron
])

EDGES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prune_key", pa.string()),
    pa.field("control", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("weight", pa.float32()),
    pa.field("src_layer", pa.int32()),
    pa.field("src_location", pa.string()),
    pa.field("src_index", pa.int32()),
    pa.field("dst_layer", pa.int32()),
    pa.field("dst_location", pa.string()),
    pa.field("dst_index", pa.int32()),
])

SCHEMAS = {CIRCUITS: CIRCUITS_SCHEMA, NODES: NODES_SCHEMA, EDGES: EDGES_SCHEMA}

SEARCHES_SCHEMA = pa.schema([  # one row per finished `csp prune --search` of a pair (jobs/prune_search.py)
    pa.field("search_id", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("algorithm", pa.string()),
    pa.field("n_trials", pa.int32()),
    pa.field("n_verified", pa.int32()),
    pa.field("best_prune_key", pa.string()),  # null: no run verified
    pa.field("best_n_edges", pa.int64()),
    pa.field("best_config", pa.string()),  # JSON {k_coef, lr, steps} of the best run
    pa.field("space", pa.string()),  # JSON of SPACE
    pa.field("seed", pa.int64()),
    pa.field("seconds", pa.float64()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
])



def read_searches(results_uri: str):
    """Every finished search of a results store, one row each, with its task (pandas; empty when none)."""
    import pandas as pd

    root = storage.resolve(results_uri).join(SEARCHES)
    files = storage.ls(root, suffix=".parquet") if storage.exists(root) else []
    frames = []
    for f in files:
        df = storage.read_parquet(f).to_pandas()
        df["task"] = f.rsplit("/task=", 1)[-1].split("/", 1)[0]
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=[f.name for f in SEARCHES_SCHEMA] + ["task"])
    return pd.concat(frames, ignore_index=True)



def pandas_metadata(schema: pa.Schema) -> dict:
    """Pandas metadata for ``schema``: integers read back as nullable Int64/Int32 (null =
    not applicable, never a float NaN) and booleans as ``boolean``, with plain
    ``pd.read_parquet`` as with jobs.results.circuits."""
    import pandas as pd

    def dtype(t: pa.DataType):
        if pa.types.is_integer(t):
            return {8: "Int8", 16: "Int16", 32: "Int32", 64: "Int64"}[t.bit_width]
        if pa.types.is_boolean(t):
            return "boolean"
        if pa.types.is_timestamp(t):
            return f"datetime64[us, {t.tz}]" if t.tz else "datetime64[us]"
        return object if pa.types.is_string(t) else t.to_pandas_dtype()

    tmpl = pd.DataFrame({f.name: pd.Series([], dtype=dtype(f.type)) for f in schema if f.name != "task"})
    return pa.Schema.from_pandas(tmpl, preserve_index=False).metadata


_META: dict[str, dict] = {}


def arrow_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The rows as a table of ``schema`` without the partition column ``task``, carrying
    the pandas metadata that gives readers nullable integers and booleans."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    t = pa.Table.from_pydict(cols, schema=schema).drop(["task"])
    key = ",".join(schema.names)
    if key not in _META:
        _META[key] = pandas_metadata(t.schema)
    return t.replace_schema_metadata(_META[key])


# Statuses with no circuit (sparsity/circuit.py): their per-circuit counts are null ("not applicable"), not 0.
COUNT_COLUMNS = ["k", "n_open", "n_nodes", "n_edges", "n_edges_resid"] + [
    f.name for f in CIRCUITS_SCHEMA if f.name.startswith(("n_nodes_", "n_edges_")) and f.name != "n_edges_resid"]


def result_uid(model_id: str, prune_key: str, control: str | None) -> str:
    """The file name one result owns in each table's task partition."""
    return f"{model_id}--{prune_key}{'--' + control if control else ''}.parquet"


CLAIMS = "_claims"  # RESULTS/_claims/task=T/<uid>.json: the lease of a pair being pruned now


def claim_uri(results_uri: str, task: str, model_id: str, prune_key: str, control: str | None) -> storage.Location:
    """Where the process pruning one result holds its claim (cluster/lease.py)."""
    return storage.resolve(results_uri).join(CLAIMS, f"task={task}", result_uid(model_id, prune_key, control).replace(".parquet", ".json"))


def is_stored(results_uri: str, task: str, model_id: str, prune_key: str, control: str | None) -> bool:
    """Whether this result's circuits row exists (it is written last, after nodes and edges):
    its own file, or a row in a compacted one (jobs/compact.py). On S3 that is two requests,
    as many as the old check (its own file) took, sent at once: one round trip."""
    from jobs import results  # reads the store; results imports this module

    root = storage.resolve(results_uri)
    own = root.join(CIRCUITS, f"task={task}", result_uid(model_id, prune_key, control))
    if not root.is_s3:
        return storage.is_file(own) or results.has_result(results_uri, task, model_id, prune_key, control)
    compacted = _lookups().submit(results.has_result, results_uri, task, model_id, prune_key, control)
    if storage.is_file(own):
        return True
    return compacted.result()


_LOOKUPS = None


def _lookups():
    """The threads is_stored sends its second S3 lookup from (one pool per process)."""
    global _LOOKUPS
    if _LOOKUPS is None:
        from concurrent.futures import ThreadPoolExecutor

        _LOOKUPS = ThreadPoolExecutor(4, thread_name_prefix="csp-is-stored")
    return _LOOKUPS


def write_result(results_uri: str, model: dict, task: str, circuit: Circuit | None, status: str | None = None,
                 error: str | None = None, extra: dict | None = None, cfg=None) -> str:
    """Store one (checkpoint, task, pruning config, control) result: a circuit, or a verdict
    row with no nodes.

    ``model``: model_id, checkpoint_uri, checkpoint_fingerprint, step, pfrac, ef, afrac,
    seed, val_loss. ``cfg``: the PruneConfig that made it (its key and main fields become
    columns). Node and edge files are written before the circuits row, so a reader that
    sees the row can rely on its nodes and edges being there.
    """
    root = storage.resolve(results_uri)
    extra = dict(extra or {})
    control = extra.get("control")
    key = cfg.key() if cfg is not None else "none"
    # One file name per result in its task partition: a retried or repeated result
    # replaces its own files instead of adding rows, so every result is stored exactly once.
    uid = result_uid(model["model_id"], key, control)
    base = {"schema_version": SCHEMA_VERSION, "model_id": model["model_id"], "task": task}
    cfg_cols = {"prune_key": key}
    if cfg is not None:
        cfg_cols.update({"prune_steps": cfg.steps, "k_coef": cfg.k_coef, "prune_seed": cfg.seed,
                         "ablation": cfg.ablation, "target": cfg.target})
    if circuit is not None:
        cfg_cols["base_prune_key"] = circuit.provenance.get("base_prune_key")
    row = {**base, **model, "status": status, "error": error, "code_version": code_version(),
           "created_at": datetime.datetime.now(datetime.UTC), **cfg_cols, **extra}
    if circuit is not None:
        base = {**base, "prune_key": key, "control": control}
        crow, nodes, edges = circuit.to_rows()
        row.update({k: v for k, v in crow.items() if k not in ("task",)})
        row["status"] = status or circuit.metrics.get("status", "ok")
        storage.write_parquet(root.join(NODES, f"task={task}", uid), arrow_table([{**base, **n} for n in nodes], NODES_SCHEMA))
        storage.write_parquet(root.join(EDGES, f"task={task}", uid), arrow_table([{**base, **e} for e in edges], EDGES_SCHEMA))
    if row["status"] in NO_CIRCUIT:
        row.update(dict.fromkeys(COUNT_COLUMNS))
    if row["status"] == "ok" and not (row.get("sufficiency_loss") is not None and row.get("target") is not None
                                      and row["sufficiency_loss"] <= row["target"]):
        # The store's one invariant: `ok` means verified on test pairs (docs/design.md, Pruning).
        raise ValueError(f"refusing to store {model['model_id']}/{task} as ok: test sufficiency "
                         f"{row.get('sufficiency_loss')} does not meet target {row.get('target')}")
    if isinstance(row.get("provenance"), dict):
        row["provenance"] = json.dumps(row["provenance"], sort_keys=True)
    storage.write_parquet(root.join(CIRCUITS, f"task={task}", uid), arrow_table([row], CIRCUITS_SCHEMA))
    return uid
