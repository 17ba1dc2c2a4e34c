import pandas as pd
import pytest
import torch
from test_planted import planted_model

from cluster import checkpoints, storage, storage_errors
from jobs import compact, fanout, results, store
from sparsity import checkpoint_format as ckpt_lib
from sparsity.config import RunConfig, SparsityConfig
from sparsity.prune import PruneConfig

TASKS = ["single_double_quote", "if_equals", "var_swap"]


@pytest.fixture(scope="module")
def two_runs(stdlib_data, stdlib_tokenizer, tmp_path_factory):
    """Two distinct checkpoints (the planted model and a perturbed copy), each a run naming the stdlib data."""
    uris = []
    for i in range(2):
        run = tmp_path_factory.mktemp(f"fan-run{i}")
        model = planted_model(stdlib_tokenizer)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.bias[0] += 0.001 * i  # a different fingerprint, same behaviour
        cfg = RunConfig(model=model.config, sparsity=SparsityConfig(pfrac=1.0))
        checkpoints.save(str(run), ckpt_lib.to_files(model, cfg, 10), 10)
        storage.write_json(str(run / "run.json"), {"config": cfg.to_dict(), "data": stdlib_data})
        uris.append(str(run))
    return uris


@pytest.mark.slow
def test_fanout_stores_each_pair_once_retries_failures_and_reruns_do_nothing(ray_session, two_runs, s3_prefix):
    """2 checkpoints × 3 tasks on local Ray into S3: one circuits row per pair and target; a
    pair whose task raises once is retried and stored once; a second run prunes nothing and
    adds no row."""
    cfg = PruneConfig(steps=100)  # two targets: 0.15 and 0.30
    counts = fanout.fanout(two_runs, TASKS, s3_prefix, cfg, inject_failure={"task": "if_equals"})
    assert counts == {"pairs": 6, "skipped": 0, "pruned": 6, "failed": 0, "elsewhere": 0, "compacted": 3}
    assert all(len(storage.ls(f"{s3_prefix}/{t}", suffix=".parquet")) == 3 for t in ("circuits", "circuit_nodes", "circuit_edges"))
    opts = storage.storage_options(s3_prefix)
    circuits = pd.read_parquet(f"{s3_prefix}/circuits", storage_options=opts)
    assert len(circuits) == 12 and sorted(set(circuits["target"])) == [0.15, 0.30]
    assert circuits.groupby(["checkpoint_fingerprint", "task", "target"]).size().max() == 1
    assert storage.exists(f"{s3_prefix}/_debug/" + next(u.rsplit("/", 1)[1] for u in storage.ls(f"{s3_prefix}/_debug")))
    quote = circuits[circuits["task"] == "single_double_quote"]
    assert (quote["status"] == "ok").all()
    nodes = pd.read_parquet(f"{s3_prefix}/circuit_nodes", storage_options=opts)
    edges = pd.read_parquet(f"{s3_prefix}/circuit_edges", storage_options=opts)
    assert len(nodes) == circuits["n_nodes"].sum() and len(edges) >= circuits["n_edges"].sum()

    again = fanout.fanout(two_runs, TASKS, s3_prefix, cfg)
    assert again == {"pairs": 6, "skipped": 6, "pruned": 0, "failed": 0, "elsewhere": 0, "compacted": 0}
    assert len(results.read_table(s3_prefix)) == 12


def test_csp_prune_over_several_checkpoints_fans_out_and_skips_stored_pairs(ray_session, two_runs, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    out = str(tmp_path / "res")
    r = runner.invoke(app, ["prune", *two_runs, "--task", "var_swap", "--out", out, "--target", "0.15"])
    assert r.exit_code == 0, r.output
    assert "2 pairs: 2 pruned, 0 already stored, 0 failed" in r.stdout
    r = runner.invoke(app, ["prune", *two_runs, "--task", "var_swap", "--out", out, "--target", "0.15"])
    assert "2 pairs: 0 pruned, 2 already stored" in r.stdout
    assert len(pd.read_parquet(f"{out}/circuits")) == 2


@pytest.mark.slow
def test_a_worker_process_dying_mid_fanout_still_stores_every_pair_once(ray_session, two_runs, tmp_path):
    """The worker running one pair dies (os._exit) → Ray retries the task; every pair is stored exactly once."""
    out = str(tmp_path / "res")
    counts = fanout.fanout(two_runs, ["var_swap", "if_equals"], out, PruneConfig(steps=20, also_targets=()),
                           inject_failure={"task": "var_swap", "kill": True}, compact_every=1)
    assert counts["pruned"] == 4 and counts["failed"] == 0
    c = results.read_table(out)
    assert len(c) == 4 and c.groupby(["checkpoint_fingerprint", "task"]).size().max() == 1
    # compacted while it ran (every stored result, one compaction at a time) and at the end
    assert counts["compacted"] >= 2 and all(compact.gen_of(f) for f in storage.ls(f"{out}/circuits", suffix=".parquet"))
    assert len(storage.ls(f"{out}/_debug")) == 2  # both var_swap pairs lost their first worker


@pytest.mark.slow
def test_s3_going_down_mid_fanout_is_a_clear_error_and_leaves_no_partial_pair(ray_session, two_runs, tmp_path, monkeypatch):
    """The results server stops after the first pair: the fan-out ends with a one-line storage
    error, and every stored pair is whole (each node/edge file has its circuits row)."""
    from cluster import s3server

    server = s3server.start(tmp_path / "s3", "down-key", "down-secret-123", buckets=("res",))
    port = int(server.endpoint_url.rsplit(":", 1)[1])
    env = {**server.env()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stopped = []

    def stop_after_first(done, total, row):
        if not stopped:
            server.stop()
            stopped.append(done)

    try:
        with pytest.raises(storage_errors.StorageError) as e:
            fanout.fanout(two_runs, ["single_double_quote", "if_equals", "with_as"], "s3://res/c", PruneConfig(steps=40, also_targets=()),
                          max_in_flight=1, max_retries=1, progress=stop_after_first, task_env=env)
        assert "\n" not in str(e.value) and "down-secret-123" not in str(e.value)
    finally:
        server.stop()
    again = s3server.start(tmp_path / "s3", "down-key", "down-secret-123", buckets=("res",), port=port)
    try:
        files = storage.ls("s3://res/c")
        rows = {u.split("/c/", 1)[1].split("/", 1)[1] for u in files if "/c/circuits/" in u}
        parts = {u.split("/c/", 1)[1].split("/", 1)[1] for u in files if "/c/circuit_nodes/" in u or "/c/circuit_edges/" in u}
        assert parts and parts <= rows  # the first pair is whole; no node/edge file lacks its circuits row
        assert stopped == [1]
    finally:
        again.stop()


@pytest.mark.slow
def test_concurrent_fanouts_into_one_store_prune_each_pair_once_in_total(ray_session, two_runs, tmp_path):
    """Two fan-outs and a compaction loop at once into one store: each pair is pruned by one
    fan-out, every read meanwhile sees each row once, nothing is lost; a pair whose claim
    another live process holds is left to it (and pruned once the claim is gone)."""
    import threading

    from cluster import lease
    from jobs import compact
    from jobs.prune_pairs import model_meta

    out = str(tmp_path / "res")
    cfg = PruneConfig(steps=20, also_targets=())
    tasks = ["var_swap", "if_equals"]
    got, most, errors = [None, None], [], []
    done = threading.Event()

    def run(i):
        got[i] = fanout.fanout(two_runs, tasks if i == 0 else tasks[::-1], out, cfg)

    def compact_and_read():  # the third writer: compaction (and a reader) while both fan-outs write
        while not done.is_set():
            try:
                compact.compact(out)
                c = results.read_table(out)
                most.append(int(c.groupby(["checkpoint_fingerprint", "task"], observed=True).size().max()) if len(c) else 0)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    side = threading.Thread(target=compact_and_read)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    side.join()
    assert not errors and most and max(most) <= 1, (errors[:2], most)
    assert sum(c["pruned"] for c in got) == 4, got
    assert all(c["pruned"] + c["skipped"] + c["elsewhere"] == 4 and c["failed"] == 0 for c in got), got
    c = results.read_table(out)
    assert len(c) == 4 and c.groupby(["checkpoint_fingerprint", "task"], observed=True).size().max() == 1
    assert len(results.nodes(out)) == c["n_nodes"].fillna(0).sum()  # every stored pair's nodes, once
    assert not [u for u in storage.ls(f"{out}/_claims") if u.endswith(".json")]  # every claim released

    # A live claim held elsewhere: this fan-out leaves that pair alone.
    meta = model_meta(checkpoints.load(two_runs[0], with_train_state=False), two_runs[0])
    where = store.claim_uri(out, "with_as", meta["model_id"], cfg.key(), None)
    held = lease.acquire(where, owner="someone-else", what="prune with_as").start()
    try:
        counts = fanout.fanout(two_runs, ["with_as"], out, cfg)
        assert counts == {"pairs": 2, "skipped": 0, "pruned": 1, "failed": 0, "elsewhere": 1, "compacted": 0}  # one file: nothing to merge
    finally:
        held.release()
    counts = fanout.fanout(two_runs, ["with_as"], out, cfg)
    assert counts == {"pairs": 2, "skipped": 1, "pruned": 1, "failed": 0, "elsewhere": 0, "compacted": 1}


@pytest.mark.slow
def test_circuits_over_training_one_row_per_checkpoint_and_task_with_overlap_and_a_plot(ray_session, stdlib_data, stdlib_tokenizer, tmp_path):
    """A run with milestones 10 and 20 and its final step 30 (the planted model, nudged per
    step so each checkpoint is its own model; step 5 was dropped): `csp prune --checkpoints
    milestones` prunes each (checkpoint, task) once, each row carries its step, a re-run adds
    nothing; `results over-training` gives the circuits in step order with their node-set
    overlap with the previous step; `viz over-training` draws them; a step the run does not
    keep is a one-line usage error naming those it does."""
    import dataclasses
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from sparsity.config import TrainConfig

    run = tmp_path / "run"
    for step in (5, 10, 20, 30):
        model = planted_model(stdlib_tokenizer)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.bias[0] += 0.001 * step
        cfg = dataclasses.replace(RunConfig(model=model.config, sparsity=SparsityConfig(pfrac=1.0)), train=TrainConfig(steps=30, milestones=(10, 20)))
        checkpoints.save(str(run), ckpt_lib.to_files(model, cfg, step), step, keep=cfg.train.milestones)
        storage.write_json(str(run / "run.json"), {"config": cfg.to_dict(), "data": stdlib_data})
    assert checkpoints.steps(str(run)) == [10, 20, 30]
    runner = CliRunner()
    out = str(tmp_path / "res")
    args = ["prune", str(run), "--checkpoints", "milestones", "--task", "single_double_quote", "--out", out, "--target", "0.15", "--steps", "100"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "3 checkpoints (milestones) × 1 tasks" in r.stdout and "3 pairs: 3 pruned" in r.stdout and "@ step 20" in r.stdout
    again = runner.invoke(app, args)
    assert "3 pairs: 0 pruned, 3 already stored" in again.stdout
    circ = pd.read_parquet(f"{out}/circuits")
    assert sorted(circ["step"]) == [10, 20, 30] and circ["model_id"].nunique() == 3 and (circ["status"] == "ok").all()
    ot = json.loads(runner.invoke(app, ["results", "over-training", out, "--format", "json"]).stdout)
    assert [row["step"] for row in ot] == [10, 20, 30] and {row["trial"] for row in ot} == {"run"}
    assert ot[0]["jaccard_prev"] is None and all(0.5 < row["jaccard_prev"] <= 1 for row in ot[1:])  # the same model, barely nudged
    table = runner.invoke(app, ["results", "over-training", out, "--model", "run"])
    assert table.exit_code == 0 and "jaccard_prev" in table.stdout and "single_double_quote" in table.stdout
    figs = runner.invoke(app, ["viz", "over-training", out, "--out", str(tmp_path / "figs")])
    assert figs.exit_code == 0, figs.output
    assert (tmp_path / "figs" / "over-training.png").stat().st_size > 10_000 and (tmp_path / "figs" / "over-training.svg").exists()
    bad = runner.invoke(app, ["prune", str(run), "--checkpoints", "5", "--out", out])
    assert bad.exit_code == 2 and "step 5 is not kept" in bad.stderr and "it keeps 10, 20, 30" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
