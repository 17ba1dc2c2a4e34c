"""Compaction of the results store (jobs/compact.py): fewer files, the same rows, each read
once at every instant — a killed compaction, a re-run, a small file written again."""

import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
from test_results import META, _circuit
from typer.testing import CliRunner

from cli.main import app
from cluster import storage
from jobs import compact, results, store
from sparsity.prune import PruneConfig

TASKS = ["single_double_quote", "if_equals", "var_swap"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fill(uri: str, models: int = 6, start: int = 0) -> None:
    """Results of ``models`` models on TASKS: circuits of varied sizes, a control, and a verdict with no circuit."""
    cfg = PruneConfig(steps=10)
    for m in range(start, start + models):
        meta = {**META, "model_id": f"m{m}", "val_loss": 3.0 + m / 10}
        for i, task in enumerate(TASKS[:2]):
            store.write_result(uri, meta, task, _circuit(task, 2 + (m * 3 + i) % 9), cfg=cfg)
        store.write_result(uri, meta, TASKS[0], _circuit(TASKS[0], 4), extra={"control": "seed_1"}, cfg=cfg)
        store.write_result(uri, meta, TASKS[2], None, status="chance", extra={"full_loss": 0.7}, cfg=cfg)


def _snapshot(uri: str) -> dict[str, pd.DataFrame]:
    """Every table's rows as sorted strings (order-free comparison)."""
    out = {}
    for name, df in (("circuits", results.read_table(uri)), ("nodes", results.nodes(uri)), ("edges", results.edges(uri))):
        cols = [c for c in df.columns if c != "created_at"] + (["created_at"] if "created_at" in df else [])
        out[name] = df[cols].astype(str).sort_values(cols).reset_index(drop=True)
    return out


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


def _files(uri: str) -> dict[str, list[str]]:
    root = storage.resolve(uri)
    return {t: storage.ls(root.join(t), suffix=".parquet") for t in compact.TABLES}


def _assert_all_stored(uri: str, circuits: pd.DataFrame) -> None:
    """The fan-out's existence check finds every result of ``circuits`` (a snapshot's rows)."""
    for task, model, key, control in circuits[["task", "model_id", "prune_key", "control"]].itertuples(index=False):
        assert store.is_stored(uri, task, model, key, None if pd.isna(control) or control in ("None", "<NA>", "nan") else control), (task, model, key, control)


def test_compaction_keeps_every_row_once_in_one_file_per_partition(tmp_path):
    uri = str(tmp_path / "res")
    _fill(uri)
    before = _snapshot(uri)
    assert len(before["circuits"]) == 6 * 4 and len(_files(uri)["circuits"]) == 24
    got = compact.compact(uri)
    assert got["partitions"] == 3 and got["busy"] == [] and got["files_before"]["circuits"] == 24
    files = _files(uri)
    assert {t: len(f) for t, f in files.items()} == got["files_after"] == {"circuit_edges": 2, "circuit_nodes": 2, "circuits": 3}
    assert all(compact.gen_of(f) for fs in files.values() for f in fs)
    _assert_same(before, _snapshot(uri))
    # plain pandas reads each row once, with the store's dtypes
    plain = pd.read_parquet(f"{uri}/circuits")
    assert len(plain) == 24 and str(plain["n_edges"].dtype) == "Int64" and str(plain["beats_random_keep"].dtype) == "boolean"
    # rows are sorted by result key, so a model filter reads few row groups
    one = pd.read_parquet(files["circuit_edges"][0])
    assert list(one["model_id"]) == sorted(one["model_id"])
    # a second compaction has nothing to do
    assert compact.compact(uri)["partitions"] == 0 and _files(uri) == files


def test_a_result_stored_after_compaction_reads_once_and_is_merged_next_time(tmp_path):
    uri = str(tmp_path / "res")
    _fill(uri, models=3)
    compact.compact(uri)
    cfg = PruneConfig(steps=10)
    assert store.is_stored(uri, "if_equals", "m1", cfg.key(), None)  # in a compacted file, not its own
    assert not store.is_stored(uri, "if_equals", "m1", cfg.key(), "seed_1") and not store.is_stored(uri, "if_equals", "m9", cfg.key(), None)
    _fill(uri, models=2, start=3)  # new results beside the compacted files
    # one result written again with other content (a retried pair): its new rows win, once
    store.write_result(uri, {**META, "model_id": "m1", "val_loss": 3.1}, "if_equals", _circuit("if_equals", 11), cfg=cfg)
    mid = _snapshot(uri)
    assert len(mid["circuits"]) == 5 * 4
    q = results.circuits(uri, task="if_equals", model="m1")
    assert len(q) == 1 and q.iloc[0]["n_edges"] == 11 and len(results.edges(uri, task="if_equals", model="m1")) == 11
    # a pushed-down filter cannot bring the older copy back
    import pyarrow.dataset as ds

    assert len(results.circuits(uri, task="if_equals", model="m1", filters=ds.field("n_edges") < 11)) == 0
    compact.compact(uri)
    _assert_same(mid, _snapshot(uri))
    assert {t: len(f) for t, f in _files(uri).items()} == {"circuit_edges": 2, "circuit_nodes": 2, "circuits": 3}


def test_a_pair_being_written_is_left_alone_and_stray_files_stay(tmp_path):
    """Nodes and edges whose circuits row is not written yet (a pair in flight) are not merged;
    a file the store did not write is neither merged nor deleted."""
    uri = str(tmp_path / "res")
    _fill(uri, models=2)
    root = storage.resolve(uri)
    inflight = store.result_uid("m7", "k", None)
    for t, schema in ((store.NODES, store.NODES_SCHEMA), (store.EDGES, store.EDGES_SCHEMA)):
        rows = [{"schema_version": 1, "model_id": "m7", "task": "if_equals", "prune_key": "k", "layer": 0, "location": "attn.q",
                 "node_index": 1, "kind": "attn.q", "weight": 1.0}]
        storage.write_parquet(root.join(t, "task=if_equals", inflight), store.arrow_table(rows, schema))
    (tmp_path / "res" / "circuits" / "task=if_equals" / "notes.txt").write_text("mine")
    compact.compact(uri)
    assert storage.exists(root.join(store.NODES, "task=if_equals", inflight)) and storage.exists(root.join(store.EDGES, "task=if_equals", inflight))
    assert (tmp_path / "res" / "circuits" / "task=if_equals" / "notes.txt").read_text() == "mine"
    assert len(results.nodes(uri, task="if_equals", model="m7")) == 1


def test_large_generations_are_split_and_kept_until_a_newer_file_overlaps(tmp_path):
    uri = str(tmp_path / "res")
    _fill(uri)
    before = _snapshot(uri)
    compact.compact(uri, target_bytes=4000)  # tiny target: each partition's edges split over several files
    edges = _files(uri)["circuit_edges"]
    assert len(edges) > 2 and len({compact.gen_of(f) for f in edges}) == 2
    _assert_same(before, _snapshot(uri))
    _fill(uri, models=1, start=6)  # new results: merged into a new generation beside the large one
    compact.compact(uri, target_bytes=4000)
    assert set(edges) <= set(_files(uri)["circuit_edges"])  # the large generation was not rewritten
    assert len(results.read_table(uri)) == 28
    _assert_all_stored(uri, results.read_table(uri).astype(str))  # the pointer names the kept generations and the new one


KILLER = """
import sys, time
from jobs import compact
stage, n, target = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen = []
def hook(s):
    if s == stage:
        seen.append(s)
        if len(seen) == n:
            print("stopped", flush=True)
            time.sleep(120)
compact._HOOK = hook
compact.compact(sys.argv[1], target_bytes=target)
print("finished", flush=True)
"""


def _compact_killed_at(uri: str, stage: str, n: int, target: int) -> None:
    """Run a compaction in its own process and kill -9 it when it reaches ``stage`` for the ``n``-th time."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.Popen([sys.executable, "-c", KILLER, uri, stage, str(n), str(target)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = p.stdout.readline().strip()
        assert line == "stopped", f"the compaction never reached {stage} #{n} ({line!r})"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("stage,n", [("part_written", 2), ("deleting", 1), ("deleting", 3), ("deleting", 4)])
def test_a_compaction_killed_at_any_point_loses_nothing_and_a_rerun_finishes_it(where, stage, n, tmp_path, request):
    """kill -9 after a generation's first files are written, after one is whole but before
    its inputs are deleted, and after some partitions are done: every read returns each row
    once, before the re-run and after it."""
    uri = str(tmp_path / "res") if where == "local" else request.getfixturevalue("s3_prefix")
    _fill(uri)
    before = _snapshot(uri)
    _compact_killed_at(uri, stage, n, target=4000)
    killed = _files(uri)
    assert any(compact.gen_of(f) for fs in killed.values() for f in fs)  # it got as far as writing
    _assert_same(before, _snapshot(uri))
    _assert_all_stored(uri, before["circuits"])
    got = compact.compact(uri, target_bytes=4000)  # the dead owner's partition lease is taken over
    assert got["busy"] == []
    _assert_same(before, _snapshot(uri))
    _assert_all_stored(uri, before["circuits"])
    assert not [f for fs in _files(uri).values() for f in fs if not compact.gen_of(f)]
    assert not [f for f in storage.ls(storage.resolve(uri).join(compact.LOCKS)) if f.endswith(".json")]


def test_the_existence_check_reads_the_pointer_not_a_listing(tmp_path, monkeypatch):
    """After compaction the fan-out's check costs one small read per partition however many
    files it holds; a store compacted before the pointer existed gets one from a compaction."""
    uri = str(tmp_path / "res")
    _fill(uri)
    before = _snapshot(uri)
    compact.compact(uri)
    pointers = [tmp_path / "res" / "circuits" / f"task={t}" / compact.POINTER for t in TASKS]
    for p in pointers:  # the partition's generations, by name
        names = json.loads(p.read_text())["generations"]
        assert names and sorted(names) == sorted(os.path.basename(f) for f in _files(uri)["circuits"] if f"task={p.parent.name[5:]}/" in f)
    assert "_generations" not in " ".join(_files(uri)["circuits"]) and len(pd.read_parquet(f"{uri}/circuits")) == 24
    with monkeypatch.context() as m:  # no listing at all
        m.setattr(storage, "ls", lambda *a, **k: pytest.fail("listed"))
        m.setattr(storage, "versions", lambda *a, **k: pytest.fail("listed"))
        _assert_all_stored(uri, before["circuits"])
    for p in pointers:  # as compacted before the pointer existed
        p.unlink()
    results._GEN_KEYS.clear()
    assert not store.is_stored(uri, "if_equals", "m1", PruneConfig(steps=10).key(), None)
    assert compact.compact(uri)["partitions"] == 3 and all(p.exists() for p in pointers)
    _assert_all_stored(uri, before["circuits"])
    _assert_same(before, _snapshot(uri))


def test_a_read_of_many_files_in_batches_returns_the_same_rows(tmp_path, monkeypatch):
    """Queries read one-result files SCAN_FILES at a time (memory stays bounded at 100,000
    files): the same rows, in one file's batch or many, with or without the read rule."""
    uri = str(tmp_path / "res")
    _fill(uri)
    whole = _snapshot(uri)
    compact.compact(uri, tasks=["if_equals"])
    _fill(uri, models=2, start=6)  # small files beside a generation: the read rule at work
    mixed = _snapshot(uri)
    monkeypatch.setattr(compact, "SCAN_FILES", 3)
    _assert_same(mixed, _snapshot(uri))
    assert len(mixed["circuits"]) == len(whole["circuits"]) + 8
    assert len(results.edges(uri, task="if_equals", model="m1")) == len(whole["edges"].query("task == 'if_equals' and model_id == 'm1'"))


def test_a_long_fanout_compacts_as_it_goes(tmp_path):
    """A fan-out compacts its partitions every `compact_every` stored results, in a thread,
    one compaction at a time, and once more at its end: the files stay few while it runs."""
    from jobs import fanout

    uri = str(tmp_path / "res")
    every = fanout._Compactor(uri, TASKS, every=8)
    for m in range(3):
        _fill(uri, models=2, start=2 * m)  # 8 results of two models
        for _ in range(8):
            every.stored()
        every.thread.join()
        files = _files(uri)["circuits"]
        assert files and all(compact.gen_of(f) for f in files), m  # every result so far merged
    before = _snapshot(uri)
    _fill(uri, models=2, start=6)
    every.stored()  # 1 of 8: no compaction now
    assert any(not compact.gen_of(f) for f in _files(uri)["circuits"])
    assert every.finish(final=True) == 4 * 3
    assert all(compact.gen_of(f) for f in _files(uri)["circuits"])
    assert len(_snapshot(uri)["circuits"]) == len(before["circuits"]) + 8
    assert fanout._Compactor(uri, TASKS, every=0).finish(final=False) == 0


def test_a_partition_another_process_compacts_is_skipped(tmp_path):
    from cluster import lease

    uri = str(tmp_path / "res")
    _fill(uri, models=2)
    held = lease.acquire(storage.resolve(uri).join(compact.LOCKS, "task=if_equals.json"), owner="other-compactor").start()
    try:
        got = compact.compact(uri)
    finally:
        held.release()
    assert got["busy"] == ["if_equals"] and got["partitions"] == 2
    assert len(storage.ls(storage.resolve(uri).join("circuits", "task=if_equals"))) == 2  # untouched


def test_reads_while_a_compaction_runs_see_each_row_once(tmp_path):
    """A reader in a loop while compactions and writers run beside it."""
    import threading

    uri = str(tmp_path / "res")
    _fill(uri, models=4)
    stop, seen, errors = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                df = results.read_table(uri)
                seen.append(int(df.groupby(["model_id", "task", "prune_key", "control"], dropna=False, observed=True).size().max()))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    t = threading.Thread(target=read)
    t.start()
    try:
        for k in range(3):
            _fill(uri, models=1, start=10 + k)
            compact.compact(uri, target_bytes=4000)
    finally:
        stop.set()
        t.join()
    assert not errors and seen and max(seen) == 1, (errors[:2], seen)
    assert len(results.read_table(uri)) == 7 * 4


def test_csp_results_compact(tmp_path):
    uri = str(tmp_path / "res")
    _fill(uri, models=2)
    r = CliRunner().invoke(app, ["results", "compact", uri, "--task", "if_equals", "--format", "json"])
    assert r.exit_code == 0, r.output
    got = {x["table"]: (x["files_before"], x["files_after"]) for x in json.loads(r.stdout)}
    assert got["circuits"] == (8, 7) and "compacted 1 partition(s)" in r.stderr
    r = CliRunner().invoke(app, ["results", "compact", uri, "--task", "no_such_task"])
    assert r.exit_code == 2 and "no_such_task" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["results", "compact", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no results" in r.output  # as every `csp results` command


@pytest.mark.slow
def test_store_scale_benchmark_runs(tmp_path):
    """benchmarks/store_scale.py end to end on a few pairs, local only: its JSON has every figure."""
    p = subprocess.run([sys.executable, "benchmarks/store_scale.py", "--pairs", "60", "--sample", "5", "--where", "local"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)["local"]
    assert out["before"]["files"]["circuits"] == 60 and out["after"]["files"]["circuits"] == 20
    assert out["before"]["circuits_rows"] == out["after"]["circuits_rows"] == 60 and out["write_s_per_pair"] > 0
