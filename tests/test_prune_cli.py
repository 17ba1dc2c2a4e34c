import json

import pandas as pd
import pytest
from test_planted import planted_model
from typer.testing import CliRunner

from cli.main import app
from cluster import checkpoints, storage
from jobs import results, store
from sparsity import checkpoint_format as ckpt_lib
from sparsity import tasks as task_lib
from sparsity.config import PruneConfig, RunConfig, SparsityConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def planted_run(stdlib_data, stdlib_tokenizer, tmp_path_factory):
    """The planted quote model stored as a csp run whose run.json names the stdlib data."""
    run = tmp_path_factory.mktemp("planted-run")
    model = planted_model(stdlib_tokenizer)
    cfg = RunConfig(model=model.config, sparsity=SparsityConfig(pfrac=1.0))
    checkpoints.save(str(run), ckpt_lib.to_files(model, cfg, 100, {"metrics": {"val_loss": 7.0}}), 100)
    storage.write_json(str(run / "run.json"), {"config": cfg.to_dict(), "data": stdlib_data})
    return str(run)


@pytest.mark.slow
def test_csp_prune_stores_a_circuit_or_a_verdict_per_task(planted_run, tmp_path):
    """`csp prune` writes one circuits row per task — a verified circuit, or `chance` — with nodes and edges readable by pandas."""
    out = str(tmp_path / "results")
    r = runner.invoke(app, ["prune", planted_run, "--task", "single_double_quote", "--task", "if_equals", "--out", out])
    assert r.exit_code == 0, r.output
    assert "single_double_quote" in r.stdout and "chance" in r.stdout
    circuits = pd.read_parquet(f"{out}/circuits")
    # a row per task at each of the two default targets (the paper's 0.15 read on the sum and per prompt)
    assert sorted(zip(circuits["task"].astype(str), circuits["target"], strict=True)) == [
        ("if_equals", 0.15), ("if_equals", 0.30), ("single_double_quote", 0.15), ("single_double_quote", 0.30)]
    quotes = circuits[circuits["task"] == "single_double_quote"].set_index("target")
    quote, loose = quotes.loc[0.15], quotes.loc[0.30]
    # The planted value path (act_in 0/1 → v 0/1 → resid_delta 3/4), and little else; with node
    # means over the whole split, the key k0 may be dropped (attention at its mean still copies enough).
    assert quote["status"] == "ok" and 6 <= quote["n_nodes"] <= 14 and quote["sufficiency_loss"] <= 0.15
    assert loose["status"] == "ok" and loose["n_nodes"] <= quote["n_nodes"] and loose["sufficiency_loss"] <= 0.30
    assert loose["prune_key"] == PruneConfig(target=0.30).key() and quote["prune_key"] == PruneConfig().key()
    assert (circuits[circuits["task"] == "if_equals"]["status"] == "chance").all()
    # every verified circuit carries its sufficiency controls; the planted one beats random node sets
    ok = circuits[circuits["status"] == "ok"]
    cols = ["random_keep_loss", "random_keep_loc_loss", "random_keep_best", "beats_random_keep",
            "partial_ablation_loss", "partial_ablation_worst", "ablated_loss"]
    assert len(ok) == 2 and ok[cols].notna().all().all() and ok["beats_random_keep"].all()
    assert (ok["partial_ablation_loss"] <= ok["partial_ablation_worst"]).all()
    # how long the masks trained, why they stopped, where the seconds went; null without a mask
    assert ok["stop_reason"].isin(["converged", "max_steps"]).all() and (ok["mask_steps"] <= PruneConfig().steps).all()
    assert all(set(json.loads(p)) >= {"setup", "masks", "choose_k", "verify"} for p in ok["phase_seconds"])
    chance = circuits[circuits["status"] == "chance"]
    assert chance["mask_steps"].isna().all() and chance["stop_reason"].isna().all()
    nodes = results.read_table(out, store.NODES, task="single_double_quote")
    nodes = nodes[nodes["prune_key"] == quote["prune_key"]]
    edges = results.read_table(out, store.EDGES, task="single_double_quote")
    edges = edges[edges["prune_key"] == quote["prune_key"]]
    assert len(nodes) == quote["n_nodes"] and (edges["kind"] != "resid").sum() == quote["n_edges"] > 0
    # node means were cached beside the checkpoint for the next task / run
    assert any("node_means-" in u for u in storage.ls(checkpoints.checkpoint_dir(planted_run)))


@pytest.mark.slow
def test_pruning_variants_live_side_by_side_and_a_repeat_adds_nothing(planted_run, tmp_path):
    """Two ablations of one pair are two rows (keyed by the pruning config); re-running one adds no row."""
    out = str(tmp_path / "results")
    base = ["prune", planted_run, "--task", "single_double_quote", "--out", out, "--steps", "150", "--target", "0.15"]
    for ablation in ("mean", "zero"):
        r = runner.invoke(app, [*base, "--ablation", ablation])
        assert r.exit_code == 0, r.output
    circ = results.circuits(out)
    assert sorted(circ["ablation"]) == ["mean", "zero"] and circ["prune_key"].nunique() == 2
    assert circ["control"].isna().all() and (circ["prune_steps"] == 150).all()
    nodes = results.nodes(out)
    assert set(nodes["prune_key"]) == set(circ["prune_key"])  # each variant keeps its own node set
    before = {u: storage.read_bytes(u) for u in storage.ls(f"{out}/circuits/task=single_double_quote")}
    r = runner.invoke(app, [*base, "--ablation", "zero"])
    assert r.exit_code == 0 and "already stored" in r.stdout
    after = {u: storage.read_bytes(u) for u in storage.ls(f"{out}/circuits/task=single_double_quote")}
    assert after == before and len(results.circuits(out)) == 2


@pytest.mark.slow
def test_controls_are_stored_as_rows_and_the_random_init_model_does_not_verify(planted_run, tmp_path):
    """--controls on a solved task: random-init, the two rule-based nonsense tasks, other
    ablations and two more seeds, each a row naming its control, at each target; the untrained
    model and the nonsense tasks yield no verified circuit of the planted model."""
    out = str(tmp_path / "results")
    r = runner.invoke(app, ["prune", planted_run, "--task", "single_double_quote", "--out", out, "--steps", "150", "--controls"])
    assert r.exit_code == 0, r.output
    circ = results.circuits(out)
    assert sorted(set(circ["target"])) == [0.15, 0.30]
    for target in (0.15, 0.30):
        at = circ[circ["target"] == target]
        real = at[at["control"].isna()].iloc[0]
        assert real["status"] == "ok"
        ctl = at[at["control"].notna()].set_index("control")
        assert sorted(ctl.index) == sorted(["random_init", "nonsense_swap", "nonsense_fixed", "ablation_zero",
                                            "ablation_resample", "seed_1", "seed_2"])
        assert (ctl["base_prune_key"] == real["prune_key"]).all()  # each checks the real row at its own target
        rnd = ctl.loc["random_init"]
        assert rnd["status"] != "ok" and rnd["full_misses_target"]  # pruned anyway, and still no verified circuit
        for rule in ("nonsense_swap", "nonsense_fixed"):  # the full model's own score on the rule: far off
            assert ctl.loc[rule, "full_loss"] > task_lib.CHANCE_LOSS
        assert ctl.loc["ablation_zero", "ablation"] == "zero" and ctl.loc["seed_1", "prune_seed"] == 1
    summary = results.controls(out)
    assert len(summary) == 14
    judged = summary[summary["control"].isin(["random_init", "nonsense_swap", "nonsense_fixed"])]
    assert judged["passes"].notna().all() and judged["passes"].astype(bool).all()  # each ran to its test verdict
    seed = summary[summary["control"] == "seed_1"].iloc[0]
    assert 0 < seed["jaccard"] <= 1  # the planted nodes are found under both seeds
    r = runner.invoke(app, ["results", "controls", out])
    assert r.exit_code == 0 and "nonsense_fixed" in r.stdout


def test_csp_tasks_list_show_and_eval(planted_run):
    r = runner.invoke(app, ["tasks", "list"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 20
    r = runner.invoke(app, ["tasks", "show", "single_double_quote", "--n", "2"])
    assert r.exit_code == 0 and r.stdout.count("--- pair") == 2
    r = runner.invoke(app, ["tasks", "eval", planted_run, "--task", "single_double_quote"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if line.startswith("single_double_quote"))
    assert float(row.split()[-1]) == 1.0
    assert "chance 1.386" in r.stdout and "0.15 and 0.30" in r.stdout  # the scale the numbers are read on


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_prune_on_cuda_without_cuda_is_a_usage_error(planted_run, tmp_path):
    r = runner.invoke(app, ["prune", planted_run, "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert r.exit_code == 2 and "CUDA is not available here; use --device cpu" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["tasks", "show", "nope"], "unknown task 'nope'"),
    (["prune", "RUN", "--out", "OUT", "--task", "nope"], "unknown task 'nope'"),
    (["prune", "RUN", "--out", "OUT", "--ablation", "median"], "Invalid value for '--ablation'"),
    (["prune", "RUN", "--out", "OUT", "--target", "0"], "--target 0.0 out of range"),
    (["prune", "RUN", "--out", "OUT", "--target", "0.15", "--target", "-1"], "--target -1.0 out of range"),
    (["prune", "RUN", "--out", "OUT", "--grad-clip-rms", "0"], "--grad-clip-rms 0.0 out of range"),
    (["prune", "RUN", "--out", "OUT", "--warmup-frac", "1"], "--warmup-frac 1.0 out of range"),
    (["prune", "RUN", "--out", "OUT", "--device", "gpu0"], "--device 'gpu0' out of range"),
    (["tasks", "eval", "RUN", "--task", "else_elif", "--n", "0"], "--n must be ≥ 1, got 0"),
    (["prune", "/no/such/run", "--out", "OUT"], "no checkpoint at /no/such/run"),
    (["prune", "RUN", "--out", "OUT", "--checkpoints", "latest"], "--checkpoints 'latest': give final, milestones, all or steps"),
    (["prune", "RUN", "--out", "OUT", "--checkpoints", "3"], "--checkpoints 3: step 3 is not kept in"),
    (["prune", "RUN", "--out", "OUT", "--search", "4", "--controls"], "--search and --controls"),
    (["prune", "RUN", "--out", "OUT", "--search", "1"], "--search must be ≥ 2"),
])
def test_prune_and_tasks_bad_input(planted_run, tmp_path, args, fragment):
    args = [a.replace("RUN", planted_run).replace("OUT", str(tmp_path / "out")) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_prune_settings_benchmark_reprunes_a_stored_verified_pair(planted_run, tmp_path):
    """benchmarks/prune_settings.py: picks the store's verified pair, prunes it again under each
    setting (the replication's schedule too) and prints one JSON line per run; stores nothing."""
    import json
    import os
    import subprocess
    import sys

    out = str(tmp_path / "results")
    r = runner.invoke(app, ["prune", planted_run, "--task", "single_double_quote", "--out", out, "--steps", "60", "--target", "0.15"])
    assert r.exit_code == 0, r.output
    before = sorted(storage.ls(f"{out}/circuits/task=single_double_quote"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "benchmarks/prune_settings.py", out, "--pairs", "1", "--steps", "30,60", "--k-coef", "1e-3",
                        "--replication", "--jobs", "2"], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["steps"], r.get("grad_clip_rms")) for r in rows] == [(30, None), (60, None), (30, 1.0), (60, 1.0)]
    assert all(r["task"] == "single_double_quote" and r["n_nodes"] > 0 for r in rows)
    assert sorted(storage.ls(f"{out}/circuits/task=single_double_quote")) == before


@pytest.mark.slow
def test_the_early_stop_study_reads_every_rule_from_one_run_per_seed(planted_run, tmp_path):
    """benchmarks/prune_early_stop.py: one run per (pair, seed) gives each rule's stopping
    step and the circuits there (built while training goes on); a long run beside; then a
    summary per rule. The circuits a rule stops with are those a run stopping there returns."""
    import json
    import os
    import subprocess
    import sys

    from jobs import prune_pairs as pp
    from sparsity import prune as prune_lib
    from sparsity import tasks as task_lib

    out = str(tmp_path / "results")
    r = runner.invoke(app, ["prune", planted_run, "--task", "single_double_quote", "--out", out, "--steps", "60"])
    assert r.exit_code == 0, r.output
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "benchmarks/prune_early_stop.py", out, "--pairs", "1", "--seeds", "0,1", "--steps", "100",
                        "--long", "120", "--long-pairs", "1", "--jobs", "2"], cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    runs, longs, summary = ([r for r in rows if r["kind"] == k] for k in ("run", "long", "summary"))
    assert sorted(r["seed"] for r in runs) == [0, 1] and [r["steps"] for r in longs] == [120]
    assert len({s["rule"] for s in summary}) == len(summary) > 1 and all(s["verified_full"] >= 1 for s in summary)
    run = next(r for r in runs if r["seed"] == 0)
    assert run["final"][0]["status"] == "ok" and run["stops"], run
    # a rule's stop, re-run for real with that rule: the same step and the same circuits
    name, step = min(run["stops"].items(), key=lambda kv: kv[1])
    window, open_tol, loss_tol = (float(x[1:]) for x in name.split("_"))
    loaded = pp.Loaded(str(pd.read_parquet(f"{out}/circuits")["checkpoint_uri"].iloc[0]))
    model, ablate, batches = loaded.inputs("mean")
    saved = prune_lib.STOP_LOSS_TOL
    prune_lib.STOP_LOSS_TOL = loss_tol
    try:
        real = prune_lib.prune_targets(model, task_lib.get("single_double_quote"), loaded.tok,
                                       prune_lib.PruneConfig(steps=100, stop_window=int(window), stop_open_tol=open_tol), batches,
                                       ablate=ablate)
    finally:
        prune_lib.STOP_LOSS_TOL = saved
    assert real[0].metrics["mask_steps"] == step
    stopped = run["at_stop"][str(step)] if step < 100 else run["final"]
    assert [(c.metrics["status"], len(c.nodes), c.n_edges) for c in real] == [(s["status"], s["n_nodes"], s["n_edges"]) for s in stopped]


@pytest.mark.slow
def test_the_pruning_benchmark_times_each_path_and_says_where_a_step_goes():
    """`benchmarks/prune.py --smoke`: the plain path, the read positions alone, all the exact
    savings and early stopping on one pair, with their phases, the same circuit from the three
    exact-equivalent paths, and a mask step split into gates / AbsTopK / attention / MLP /
    other that adds up, with fewer FLOPs at each saving; with --repeats, every variant timed
    that many times and reported by its median."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "benchmarks/prune.py", "--smoke", "--profile-steps", "2", "--repeats", "2"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    pairs = out["pairs"]
    assert set(pairs) == {"plain", "positions", "exact", "exact+stop"} and out["ratio_to_plain"]["plain"] == 1.0
    for v in ("positions", "exact"):
        assert {k: pairs["plain"][k] for k in ("status", "n_nodes", "n_edges", "mask_steps")} == \
            {k: pairs[v][k] for k in ("status", "n_nodes", "n_edges", "mask_steps")}
    for v in pairs.values():
        assert len(v["runs"]) == 2 and v["seconds_per_pair"] == pytest.approx(sum(v["runs"]) / 2, abs=0.011)
    assert pairs["plain"]["stop_reason"] == "max_steps" and pairs["exact+stop"]["mask_steps"] <= pairs["plain"]["mask_steps"]
    assert {"setup", "masks", "choose_k", "verify"} <= set(pairs["exact"]["phase_seconds"])
    for step in out["mask_step"].values():
        assert set(step["share"]) == {"gates", "abstopk", "attention", "mlp", "other"}
        assert sum(step["share"].values()) == pytest.approx(1.0, abs=0.01) and min(step["share"].values()) > 0
        assert step["matmul_attention_gflop"] > 0
    gflop = {v: out["mask_step"][v]["matmul_attention_gflop"] for v in ("plain", "positions", "exact")}
    assert gflop["exact"] < gflop["positions"] < gflop["plain"]


@pytest.mark.slow
def test_search_stores_every_run_marks_the_best_verified_one_and_a_rerun_adds_nothing(ray_session, planted_run, tmp_path):
    """`csp prune --search 4` on the planted model: 4 runs of one search stored as rows (their
    search_id and trial numbers), one search row naming the best, which is verified and the
    smallest verified; `results circuits` shows that one by default and every run with
    --all; a repeat searches nothing."""
    import glob
    import json
    import os
    import tempfile

    import pandas as pd

    from jobs import results
    from jobs.store import read_searches

    out = str(tmp_path / "res")
    args = ["prune", planted_run, "--task", "single_double_quote", "--out", out, "--target", "0.15", "--search", "4"]
    scratch = os.path.join(tempfile.gettempdir(), "csp-search-*")
    before = set(glob.glob(scratch))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert set(glob.glob(scratch)) == before  # Tune's state for the search is gone with it (it leaked one dir a search)
    rows = pd.read_parquet(f"{out}/circuits")  # plain pandas: every run is a row
    assert len(rows) == 4 and rows["search_id"].nunique() == 1 and sorted(rows["search_trial"]) == [0, 1, 2, 3]
    assert rows["prune_key"].nunique() == 4 and (rows["target"] == 0.15).all()
    s = read_searches(out)
    assert len(s) == 1 and s["n_trials"].iloc[0] == 4 and s["task"].iloc[0] == "single_double_quote"
    ok = rows[rows["status"] == "ok"]
    assert len(ok) >= 1 and s["best_prune_key"].iloc[0] in set(ok["prune_key"])
    best = ok[ok["prune_key"] == s["best_prune_key"].iloc[0]].iloc[0]
    assert best["n_edges"] == ok["n_edges"].min() and best["sufficiency_loss"] <= 0.15  # the best is verified and the smallest
    assert set(json.loads(s["best_config"].iloc[0])) == {"k_coef", "lr", "steps"}
    shown = results.circuits(out)
    assert len(shown) == 1 and shown["search_best"].iloc[0] and shown["prune_key"].iloc[0] == best["prune_key"]
    assert len(results.circuits(out, searches="all")) == 4
    listed = json.loads(runner.invoke(app, ["results", "circuits", out, "--format", "json"]).stdout)
    assert [x["prune_key"] for x in listed] == [best["prune_key"]]
    assert len(json.loads(runner.invoke(app, ["results", "circuits", out, "--all", "--format", "json"]).stdout)) == 4
    assert f"best {int(best['n_edges'])} edges" in r.stdout
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already searched" in again.stdout and len(pd.read_parquet(f"{out}/circuits")) == 4
    bad = runner.invoke(app, ["prune", planted_run, "--out", out, "--search", "1"])
    assert bad.exit_code == 2 and "--search must be ≥ 2" in bad.stderr


@pytest.mark.slow
def test_the_before_after_benchmark_times_two_trees_in_turns_and_checks_which_code_ran(planted_run, tmp_path):
    """benchmarks/prune_before_after.py: the store's mask-training pairs pruned by two csp trees
    in turns (here the checkout twice, so both sides must find the same circuits); each side
    runs in its own tree and says so; a folder that is not a csp tree is a usage error."""
    import json
    import os
    import subprocess
    import sys

    out = str(tmp_path / "results")
    r = runner.invoke(app, ["prune", planted_run, "--task", "single_double_quote", "--task", "if_equals", "--out", out, "--steps", "40"])
    assert r.exit_code == 0, r.output
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "benchmarks/prune_before_after.py", out, "--steps", "20", "--rounds", "2", "--jobs", "1"]
    p = subprocess.run([*cmd, "--before", root], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["before"] == res["after"] == os.path.realpath(root)
    assert [pair["task"] for pair in res["pairs"]] == ["single_double_quote"]  # if_equals is at chance: no mask trained
    pair = res["pairs"][0]
    assert len(pair["before_runs"]) == len(pair["after_runs"]) == 2 and len(res["rounds"]) == 2
    assert pair["before_circuits"] == pair["after_circuits"] and pair["after_circuits"][0]["mask_steps"] <= 20
    assert res["ratio_of_sums"] > 0 and pair["ratio"] > 0
    bad = subprocess.run([*cmd, "--before", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no csp source tree there" in bad.stderr.strip().splitlines()[-1]
