import json

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from cli.main import app
from cluster import storage
from jobs import results
from jobs import store as store_lib
from sparsity.circuit import NO_CIRCUIT, Circuit

META = {"checkpoint_uri": "/x", "checkpoint_fingerprint": "f" * 64, "step": 10, "pfrac": 0.25, "ef": 1.0, "afrac": 0.25, "seed": 0}


def _circuit(task, n_edges):
    nodes = [(0, "attn.act_in", i) for i in range(3)]
    edges = [{"src": (0, "attn.act_in", 0), "dst": (0, "attn.q", i), "kind": "attn.q", "weight": 0.5} for i in range(n_edges)]
    return Circuit(task, nodes, edges, {"status": "ok", "k": 3, "full_loss": 0.1, "sufficiency_loss": 0.1, "necessity_loss": 0.9, "target": 0.15})


@pytest.fixture
def store(tmp_path):
    uri = str(tmp_path / "res")
    for model, val, edges in (("m1", 3.0, 8), ("m2", 4.0, 2)):
        for task in ("single_double_quote", "if_equals"):
            store_lib.write_result(uri, {**META, "model_id": model, "val_loss": val}, task, _circuit(task, edges))
        store_lib.write_result(uri, {**META, "model_id": model, "val_loss": val}, "var_swap", None, status="chance",
                               extra={"full_loss": 0.7, "full_accuracy": 0.5})
    return uri


def test_query_with_partition_and_model_filters(store):
    assert len(results.circuits(store)) == 6
    q = results.circuits(store, task="if_equals")
    assert set(q["task"].astype(str)) == {"if_equals"} and len(q) == 2
    assert len(results.circuits(store, model="m2")) == 3
    big = results.circuits(store, filters=ds.field("n_edges") > 4)
    assert set(big["model_id"]) == {"m1"}
    assert len(results.edges(store, task="single_double_quote", model="m1")) == 8
    assert len(results.nodes(store, task="if_equals")) == 6


def test_frontier_is_the_geometric_mean_of_edges_over_solved_tasks(store):
    f = results.frontier(store).set_index("model_id")
    assert f.loc["m1", "geomean_edges"] == pytest.approx(8.0) and f.loc["m2", "geomean_edges"] == pytest.approx(2.0)
    assert f.loc["m1", "tasks_with_circuit"] == 2 and f.loc["m1", "tasks"] == 3


def test_rewriting_a_pair_replaces_its_rows(store):
    store_lib.write_result(store, {**META, "model_id": "m1", "val_loss": 3.0}, "if_equals", _circuit("if_equals", 5))
    q = results.circuits(store, task="if_equals", model="m1")
    assert len(q) == 1 and q.iloc[0]["n_edges"] == 5


def test_the_store_refuses_an_ok_row_that_misses_its_target(tmp_path):
    """`ok` means verified: a circuit whose test sufficiency misses the target cannot be stored as ok."""
    c = _circuit("if_equals", 2)
    c.metrics["sufficiency_loss"] = 0.3
    with pytest.raises(ValueError, match="refusing to store"):
        store_lib.write_result(str(tmp_path / "res"), {**META, "model_id": "x"}, "if_equals", c)
    assert not (tmp_path / "res" / "circuits").exists()


def test_files_of_an_older_schema_version_still_read(store):
    """A file without the newer columns reads through the explicit schema, with nulls."""
    old = pa.table({"schema_version": pa.array([0], pa.int32()), "model_id": ["old"], "status": ["ok"], "n_edges": pa.array([7], pa.int64())})
    storage.write_parquet(storage.resolve(store).join("circuits", "task=if_equals", "old.parquet"), old)
    df = results.circuits(store, task="if_equals")
    row = df[df["model_id"] == "old"].iloc[0]
    assert row["n_edges"] == 7 and row["schema_version"] == 0 and row["full_loss"] != row["full_loss"]  # NaN


def test_csp_results_commands(store):
    runner = CliRunner()
    r = runner.invoke(app, ["results", "circuits", store, "--task", "if_equals", "--format", "json"])
    assert r.exit_code == 0 and {x["model_id"] for x in json.loads(r.stdout)} == {"m1", "m2"}
    # strict JSON: a missing value is null, never the bare NaN that JSON parsers reject
    r = runner.invoke(app, ["results", "circuits", store, "--all", "--format", "json"])
    rows = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in --format json"))
    assert r.exit_code == 0 and rows and any(v is None for x in rows for v in x.values())
    r = runner.invoke(app, ["results", "circuits", store, "--where", "n_edges > 4 and status == 'ok'", "--format", "csv"])
    assert r.exit_code == 0 and r.stdout.count("\n") == 3  # header + m1's two circuits
    r = runner.invoke(app, ["results", "frontier", store])
    assert r.exit_code == 0 and "m2" in r.stdout
    r = runner.invoke(app, ["results", "circuits", store, "--where", "bogus >"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment, code", [
    (["results", "circuits", "STORE", "--task", "nope"], "--task 'nope': no rows in STORE; it holds if_equals, single_double_quote, var_swap", 2),
    (["results", "circuits", "STORE", "--model", "m9"], "no model 'm9' under STORE; stored: m1, m2", 2),
    (["results", "controls", "STORE", "--task", "nope"], "--task 'nope': no rows", 2),
    (["results", "circuits", "STRAY"], "Parquet magic bytes not found", 1),
    (["results", "frontier", "STRAY"], "remove the damaged file and prune its pair again", 1),
    (["viz", "frontier", "STRAY"], "cannot read the circuits table", 1),
])
def test_results_name_what_exists_and_refuse_a_damaged_file(store, tmp_path, args, fragment, code):
    """A mistyped task or model says what the store holds (exit 2); a damaged Parquet file in
    a partition is a one-line error naming the table (exit 1: the store, not the command) —
    never "(no rows)" with exit 0, never a traceback."""
    import shutil

    stray = tmp_path / "stray"
    shutil.copytree(store, stray)
    (stray / "circuits" / "task=if_equals" / "notes.parquet").write_text("not parquet")
    args = [a.replace("STORE", store).replace("STRAY", str(stray)) for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment.replace("STORE", store) in lines[0], r.stderr
    assert "Traceback" not in r.output and not lines[0].endswith(("…", ";"))


def test_files_that_are_not_parquet_are_skipped_with_one_warning(store, tmp_path):
    """A stray notes.txt (or an editor's backup) in a table's partition does not make the
    store unreadable: every command reads the Parquet files and warns once naming the rest."""
    import shutil

    stray = tmp_path / "stray"
    shutil.copytree(store, stray)
    (stray / "circuits" / "task=if_equals" / "notes.txt").write_text("my notes")
    (stray / "circuit_nodes" / "README").write_text("hi")
    expected = len(results.circuits(store))
    r = CliRunner().invoke(app, ["results", "circuits", str(stray), "--all", "--format", "csv"])
    assert r.exit_code == 0 and r.stdout.count("\n") == expected + 1, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("csp: warning:")]
    assert len(warnings) == 1 and "notes.txt" in warnings[0] and "not Parquet" in warnings[0], r.stderr
    assert len(results.nodes(str(stray))) == len(results.nodes(store))


def assert_documented_dtypes(uri: str) -> None:
    """The three tables read with plain `pd.read_parquet` have the dtypes docs/circuits.md documents,
    and `jobs.results` returns the same columns in the same order with the same dtypes."""
    import pandas as pd

    for table, reader in ((store_lib.CIRCUITS, results.circuits), (store_lib.NODES, results.nodes), (store_lib.EDGES, results.edges)):
        plain = pd.read_parquet(f"{uri}/{table}", storage_options=storage.storage_options(uri))
        ours = reader(uri)
        assert list(plain.columns) == list(ours.columns) and plain.columns[-1] == "task", table
        assert isinstance(plain["task"].dtype, pd.CategoricalDtype) and isinstance(ours["task"].dtype, pd.CategoricalDtype)
        for col in plain.columns:
            assert str(plain[col].dtype) == str(ours[col].dtype), (table, col, plain[col].dtype, ours[col].dtype)
        ints = [c for c in plain.columns if str(plain[c].dtype).startswith("int")]
        assert not ints, f"{table}: numpy ints {ints} (they turn float on the first null)"
    c = pd.read_parquet(f"{uri}/{store_lib.CIRCUITS}", storage_options=storage.storage_options(uri))
    for col in ("n_nodes", "n_edges", "k", "n_nodes_attn_q", "n_edges_qk", "step", "prune_seed"):
        assert str(c[col].dtype) == "Int64", (col, c[col].dtype)
    assert str(c["full_misses_target"].dtype) == "boolean"
    assert str(c["created_at"].dtype) == "datetime64[us, UTC]" and c["created_at"].notna().all()
    assert c["code_version"].str.match(r"^\d+\.\d+\.\d+(\+g[0-9a-f]{12}(\.dirty)?)?$").all()
    verdicts = c[c["status"].isin(NO_CIRCUIT)]
    assert verdicts[store_lib.COUNT_COLUMNS].isna().all().all()  # no circuit: counts are "not applicable", not 0
    circuits = c[~c["status"].isin(NO_CIRCUIT)]
    assert circuits[["n_nodes", "n_edges"]].notna().all().all()
    n = pd.read_parquet(f"{uri}/{store_lib.NODES}", storage_options=storage.storage_options(uri))
    assert "node_index" in n.columns and "index" not in n.columns and str(n["node_index"].dtype) == "Int32"


def test_tables_read_back_with_the_documented_dtypes(store):
    store_lib.write_result(store, {**META, "model_id": "m3", "val_loss": 5.0}, "if_equals", None, status="failed", error="boom")
    assert_documented_dtypes(store)


def test_controls_judge_only_what_ran_to_its_test_verdict(tmp_path):
    """A random-init or nonsense control passes only when its pruning reached the test pairs and
    did not verify; `chance`, `trivial` and `failed` rows are "not run" (null). Two empty node
    sets have no Jaccard (null), not 1.0."""
    from jobs.prune_pairs import control_config
    from sparsity.config import PruneConfig

    uri, cfg = str(tmp_path / "res"), PruneConfig(also_targets=())
    meta = {**META, "model_id": "m", "val_loss": 3.0}

    def put(task, control, status, nodes=()):
        c = Circuit(task, list(nodes), [], {"status": status, "k": len(nodes), "sufficiency_loss": 0.1 if status == "ok" else 0.9,
                                          "full_loss": 0.05, "target": 0.15}, {"base_prune_key": cfg.key()})
        store_lib.write_result(uri, meta, task, c, extra={"control": control}, cfg=control_config(cfg, control))

    real = [(0, "attn.q", 1), (0, "attn.k", 2)]
    put("if_equals", None, "ok", real)
    put("if_equals", "random_init", "chance")
    put("if_equals", "nonsense_fixed", "trivial")
    store_lib.write_result(uri, meta, "if_equals", None, status="failed", error="boom",
                           extra={"control": "nonsense_swap"}, cfg=control_config(cfg, "nonsense_swap"))
    put("if_equals", "seed_1", "ok", real[:1])
    put("for_while", None, "ok", real)
    put("for_while", "nonsense_swap", "ok", real)
    put("for_while", "nonsense_fixed", "target_not_reached", real)
    put("for_while", "random_init", "not_verified", real)
    put("else_elif", None, "trivial")
    put("else_elif", "seed_1", "trivial")
    ctl = results.controls(uri).set_index(["task", "control"])
    not_run = {("if_equals", "random_init"), ("if_equals", "nonsense_fixed"), ("if_equals", "nonsense_swap"),
               ("if_equals", "seed_1"), ("else_elif", "seed_1")}  # three that never reached the test, two seed variants
    assert set(ctl.index[ctl["passes"].isna()]) == not_run
    assert ctl.loc[("for_while", "nonsense_swap"), "passes"] == False  # noqa: E712  (it verified: a finding)
    assert ctl.loc[("for_while", "nonsense_fixed"), "passes"] == True  # noqa: E712
    assert ctl.loc[("for_while", "random_init"), "passes"] == True  # noqa: E712
    assert ctl.loc[("if_equals", "seed_1"), "jaccard"] == pytest.approx(0.5)
    jac = ctl.loc[("else_elif", "seed_1"), "jaccard"]
    assert jac is None or jac != jac  # null, not 1.0
    assert ctl.loc[("for_while", "nonsense_swap"), "full_loss"] == pytest.approx(0.05)
