"""`csp demo --quick` end to end on the real stdlib, a real Ray and real Parquet; the
figures and the report it leaves; a re-run that does no work; `csp viz` on its results."""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from jobs import demo as demo_lib
from jobs import diagram, results
from jobs import prune_pairs as prune_job
from sparsity import tasks as task_lib

pytestmark = pytest.mark.slow
SVG = "{http://www.w3.org/2000/svg}"


def _files(root) -> dict[str, float]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_quick_demo_stores_every_pair_in_the_three_tables(quick_demo):
    out, stdout = quick_demo
    plan = demo_lib.quick_plan()
    n_models = len(plan.points())
    circ = pd.read_parquet(out / "results" / "circuits")
    real, ctl = circ[circ["control"].isna()], circ[circ["control"].notna()]
    n_targets = len(plan.prune.targets)  # every pair is stored at each of the plan's targets
    assert n_targets == 2 and sorted(set(real["target"])) == sorted(plan.prune.targets)
    assert len(real) == n_models * len(task_lib.REGISTRY) * n_targets
    assert real.groupby("model_id").size().tolist() == [len(task_lib.REGISTRY) * n_targets] * n_models
    assert set(real["task"].astype(str)) == set(task_lib.REGISTRY)
    # the quote task's controls, for both models (the quick plan prunes every pair anyway)
    assert set(ctl["task"].astype(str)) == set(plan.controls)
    assert len(ctl) == n_models * len(prune_job.control_jobs(plan.prune)) * n_targets
    assert {"nonsense_swap", "nonsense_fixed", "random_init"} <= set(ctl["control"])
    nodes = pd.read_parquet(out / "results" / "circuit_nodes")
    edges = pd.read_parquet(out / "results" / "circuit_edges")
    # Every stored node and edge belongs to a stored result, in the counts its circuits row states.
    assert len(nodes) == circ["n_nodes"].fillna(0).sum() > 0
    assert len(edges) == (circ["n_edges"].fillna(0) + circ["n_edges_resid"].fillna(0)).sum()
    per_result = nodes.fillna({"control": ""}).groupby(["model_id", "task", "prune_key", "control"], observed=True).size()
    for r in circ[circ["n_nodes"] > 0].itertuples():
        assert per_result[(r.model_id, r.task, r.prune_key, r.control if isinstance(r.control, str) else "")] == r.n_nodes
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(summary) == n_models and summary["val_loss"].notna().all()
    assert summary["nonzeros"].min() < summary["nonzeros"].max()  # the dense baseline has more weights
    for m in summary["trial"]:
        assert m in stdout  # the summary table printed at the end names every model


def test_quick_demo_tables_read_back_with_the_documented_dtypes_and_join_the_sweep_on_trial(quick_demo):
    import pandas as pd
    from test_results import assert_documented_dtypes

    out, _ = quick_demo
    assert_documented_dtypes(str(out / "results"))
    circuits = pd.read_parquet(out / "results" / "circuits")
    sweep = pd.read_parquet(out / "sweep" / "summary.parquet")
    joined = circuits.merge(sweep[["trial", "val_loss"]], on="trial", suffixes=("", "_sweep"))
    assert len(joined) == len(circuits) and set(joined["trial"]) == set(sweep["trial"])  # every row joins, no string work


def test_quick_demo_writes_the_frontier_plot_diagrams_and_a_report_that_links_them(quick_demo):
    out, _ = quick_demo
    figs = out / "figures"
    assert (figs / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ET.parse(figs / "frontier.svg").getroot().tag == SVG + "svg"
    circ = pd.read_parquet(out / "results" / "circuits")
    circ = circ[circ["control"].isna() & (circ["target"] == demo_lib.quick_plan().prune.target)]
    drawable = circ[circ["status"].isin(["ok", "not_verified", "target_not_reached"]) & (circ["n_nodes"] > 0)]
    svgs = sorted((figs / "circuits").glob("*.svg"))
    assert len(svgs) == len(drawable) > 0
    for path in svgs[:3]:
        root = ET.parse(path).getroot()
        model_id, task = root.get("data-model"), root.get("data-task")
        row = drawable[(drawable["model_id"] == model_id) & (drawable["task"] == task)].iloc[0]
        assert len(root.findall(f".//{SVG}g[@class='node']")) == row["n_nodes"]
        assert len(root.findall(f".//{SVG}path[@class='edge']")) == min(row["n_edges"], diagram.MAX_EDGES)
        assert (path.with_suffix(".html")).exists()
        # where the circuit starts and ends: the task's answer tokens, and input tokens of its prompts
        pairs = task_lib.get(task).pairs(32, task_lib.TEST_SEED, at_least=1)
        answers = {diagram._show(a) for p in pairs for a in (p.target, p.alt)}
        drawn = {g.get("data-role"): set() for g in root.iter(SVG + "g") if g.get("class") == "token"}
        for g in root.iter(SVG + "g"):
            if g.get("class") == "token":
                drawn[g.get("data-role")].add(g.get("data-token"))
        assert drawn.get("answer") and drawn["answer"] <= answers and len(drawn["answer"]) >= min(2, len(answers))
    report = (out / "report.html").read_text()
    links = re.findall(r'href="([^"#]+)"', report)
    assert links and all((out / link).exists() for link in links)
    assert len(links) >= len(drawable) + 2  # every diagram and both frontier files
    assert report.count('class="csp-circuit"') >= 1 and "<svg" in report
    assert "Faithfulness controls" in report and "nonsense_fixed" in report
    # the verdict block opens the report: how many pairs verified, and per model why the rest did not
    verdict = report[report.index("<h2>Verdict</h2>"): report.index("<h2>Models</h2>")]
    assert f"{int((circ['status'] == 'ok').sum())} of {len(circ)} (model, task) pairs have a verified circuit" in verdict
    assert verdict.count("<li>") >= len(demo_lib.quick_plan().models) and "Controls:" in verdict
    assert report.count("<small>full ") == len(circ)  # every grid cell shows the full model's loss


def test_quick_demo_follows_one_models_circuits_over_its_milestones(quick_demo):
    """Stage 3b: the model with the most verified circuits has its milestones pruned for (up
    to 3 of) the tasks it verifies, into a store of their own (the frontier's store holds final
    checkpoints only); the report's section tabulates every (task, target, step)."""
    out, stdout = quick_demo
    plan = demo_lib.quick_plan()
    main = pd.read_parquet(out / "results" / "circuits")
    assert set(main["step"]) == {plan.train.steps}  # milestones never reach the frontier's store
    ot = pd.read_parquet(out / "over_training" / "circuits")
    trials = pd.read_parquet(out / "sweep" / "summary.parquet")
    uri, tasks = demo_lib.over_training_pick(plan, results.circuits(str(out / "results")), trials)
    assert uri is not None and 1 <= len(tasks) <= plan.over_training
    assert ot["trial"].nunique() == 1 and set(ot["checkpoint_uri"].map(lambda u: u.rsplit("/", 1)[0])) == {uri.rsplit("/", 1)[0]}
    assert set(ot["step"]) == set(plan.train.milestones) and set(ot["task"].astype(str)) == set(tasks)
    assert len(ot) == len(plan.train.milestones) * len(tasks) * len(plan.prune.targets)  # each (step, task, target) once
    report = (out / "report.html").read_text()
    section = report[report.index("<h2>Circuits over training</h2>"):]
    assert section.count("<tr><td class=l>") >= len(ot) and (out / "figures" / "over-training.png").exists()
    assert 'src="figures/over-training.png"' in section and "circuits over training:" in stdout


def test_re_running_the_demo_repeats_no_finished_work(quick_demo):
    out, _ = quick_demo
    before = _files(out / "results") | _files(out / "sweep" / "runs") | _files(out / "over_training")
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "0 shards written" in r.stdout and "0 pairs pruned or judged" in r.stdout
    after = _files(out / "results") | _files(out / "sweep" / "runs") | _files(out / "over_training")
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed and set(after) == set(before)


def test_csp_viz_commands_draw_from_a_results_store(quick_demo, tmp_path):
    out, _ = quick_demo
    res = str(out / "results")
    circ = pd.read_parquet(out / "results" / "circuits")
    row = circ[(circ["n_nodes"] > 0) & circ["control"].isna()].iloc[0]
    trial = row["model_id"].rsplit("-", 1)[0]  # a unique prefix: the trial name
    runner = CliRunner()
    r = runner.invoke(app, ["viz", "circuit", res, "--model", trial, "--task", row["task"], "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    svg = tmp_path / f"{row['model_id']}--{row['task']}.svg"
    assert svg.exists()
    titles = [t.text for t in ET.parse(svg).getroot().iter(SVG + "title") if t.text and t.text.startswith("L")]
    assert any("[" in t.split("\n", 1)[-1] for t in titles)  # tooltips carry top-activating tokens
    r = runner.invoke(app, ["viz", "frontier", res, "--out", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "frontier.png").exists()
    for args, fragment in (
        (["--model", "nope", "--task", row["task"]], "no model 'nope'"),
        (["--model", trial, "--task", "nope"], "unknown task"),
    ):
        r = runner.invoke(app, ["viz", "circuit", res, *args])
        assert r.exit_code == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = runner.invoke(app, ["viz", "frontier", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no circuits stored" in r.stderr


def test_training_progress_counts_the_steps_each_run_has_checkpointed(tmp_path):
    from cluster import storage
    from jobs import sweep

    sw = storage.resolve(str(tmp_path / "sweep"))
    pts = [{"pfrac": 0.5, "ef": 1.0}, {"pfrac": 1.0, "ef": 1.0}]
    storage.write_json(sw.join("runs", "d64-p1_2", "checkpoints", "latest.json"), {"path": "step-00000300", "step": 300})
    seen = []
    with sweep.watch_steps(sw, pts, 900, lambda done, total: seen.append((done, total)), every=0.01):
        while not seen:
            time.sleep(0.005)
        storage.write_json(sw.join("runs", "d64-dense", "checkpoints", "latest.json"), {"path": "step-00000900", "step": 900})
        while seen[-1][0] < 1200:
            time.sleep(0.005)
    assert seen[0] == (300, 1800) and seen[-1] == (1200, 1800)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_frontier_claims_compare_circuit_sizes_on_common_tasks_only():
    """Two densities at one width whose verified circuits are for different tasks cannot be
    compared; on a task both verified, the sizes are compared there (and only there)."""
    import pandas as pd

    from jobs import claims

    summary = pd.DataFrame([
        {"model_id": "a", "pfrac": 1.0, "ef": 2.0, "seed": 0, "d_model": 128, "density": 0.25, "nonzeros": 100,
         "val_loss": 4.1, "geomean_edges": 22.0},
        {"model_id": "b", "pfrac": 0.5, "ef": 2.0, "seed": 0, "d_model": 128, "density": 0.125, "nonzeros": 50,
         "val_loss": 4.2, "geomean_edges": 694.0},
        *({"model_id": m, "pfrac": 1.0, "ef": 1.0, "seed": i, "d_model": 64, "density": 1.0, "nonzeros": 100,
           "val_loss": 4.3, "geomean_edges": 10.0} for i, m in enumerate(("s0", "s1"))),
    ])

    def circ(rows):  # plus one point at two seeds, 10 and 11 edges on else_elif: the noise scale
        rows = [*rows, ("s0", "else_elif", 10), ("s1", "else_elif", 11)]
        return pd.DataFrame([{"model_id": m, "task": t, "n_edges": e, "status": "ok", "control": None} for m, t, e in rows])

    apart = claims.frontier_claims(summary, circ([("a", "else_elif", 22), ("b", "indent_for", 694)]))
    assert any("d_model 128): its densities' verified circuits are for different tasks, so it cannot be judged" in c for c in apart)
    both = claims.frontier_claims(summary, circ([("a", "else_elif", 22), ("b", "indent_for", 694), ("b", "else_elif", 9)]))
    claim = next(c for c in both if c.startswith("Sparser at equal width (d_model 128"))
    assert "on else_elif" in claim and "1/8: 9.0, 1/4: 22.0" in claim and "reproduced: sparser → smaller circuits" in claim


def _shape(plan, point) -> tuple[int, float, int]:
    """(d_model, block density, nonzeros after the anneal) of one planned model, counted on
    the real model with the real weight top-k applied at its last step."""
    from sparsity.model import GPT
    from sparsity.topk import WeightSparsifier

    cfg = plan.run_config(point)
    model = GPT(cfg.model)
    sp = WeightSparsifier(model, cfg.sparsity, cfg.train.steps)
    sp.apply(cfg.train.steps - 1)
    return cfg.model.d_model, cfg.sparsity.l0frac, sum(sp.nonzeros().values())


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_demo_plans_have_two_densities_at_one_width_and_two_widths_at_equal_nonzeros(preset):
    """Both frontier directions can be read off the plan: ≥ 2 densities at one width, and ≥ 2
    widths whose models hold the same nonzeros (within 2%); one model is trained at a second
    seed, so the claims have a noise scale to be judged against."""
    plan = demo_lib.PRESETS[preset]()
    shapes = [_shape(plan, q) for q in plan.points() if not q.get("seed")]
    by_width: dict[int, set[float]] = {}
    for d, density, _ in shapes:
        by_width.setdefault(d, set()).add(density)
    assert max(len(v) for v in by_width.values()) >= 2
    pairs = [(a, b) for a in shapes for b in shapes if a[0] < b[0] and abs(a[2] - b[2]) <= 0.02 * b[2]]
    assert pairs, shapes
    assert any(q.get("seed") for q in plan.points())
    assert len({(q["pfrac"], q["ef"], q.get("seed", 0)) for q in plan.points()}) == len(plan.points())
    # slowest first (Tune starts trials in this order): widths never grow along the list, reseeded points included
    efs = [q["ef"] for q in plan.points()]
    assert efs == sorted(efs, reverse=True)


def test_the_cli_presets_are_the_plans_jobs_knows():
    from cli.demo import Preset

    assert {p.value for p in Preset} == set(demo_lib.PRESETS)


def test_frontier_claims_call_differences_within_the_seed_noise_neither_way():
    """A reversed order that is smaller than the difference between two seeds of one model is
    'within seed noise', not 'not reproduced'; beyond the noise it is 'not reproduced'."""
    import pandas as pd

    from jobs import claims

    def models(e_quarter: float):
        rows = [("a", 1.0, 2.0, 0, 128, 0.25, 4.1), ("b", 0.5, 2.0, 0, 128, 0.125, 4.2),
                ("c", 1.0, 1.0, 0, 64, 1.0, 4.3), ("d", 1.0, 1.0, 1, 64, 1.0, 4.31)]
        summary = pd.DataFrame([{"model_id": m, "pfrac": p, "ef": e, "seed": sd, "d_model": d, "density": dn, "nonzeros": 100,
                                 "val_loss": v, "geomean_edges": 1.0} for m, p, e, sd, d, dn, v in rows])
        edges = {"a": e_quarter, "b": 300, "c": 400, "d": 500}  # c and d: one model at two seeds, 100 edges apart
        circ = pd.DataFrame([{"model_id": m, "task": "indent_for", "n_edges": n, "status": "ok", "control": None} for m, n in edges.items()])
        return claims.frontier_claims(summary, circ)

    def sparser(claims):
        return next(c for c in claims if c.startswith("Sparser at equal width (d_model 128"))

    # c and d differ by ×1.25: the noise scale of circuit size is that factor
    assert "within seed noise (×1.25 between two seeds" in sparser(models(250))  # 1/4 smaller than 1/8 by ×1.2
    assert "not reproduced" in sparser(models(150))  # by ×2
    assert "reproduced: sparser → smaller" in sparser(models(450))  # larger by ×1.5


def _claims_of(edges: dict[str, float], densities: dict[str, float]) -> list[str]:
    """frontier_claims of d_model-128 models at ``densities`` (seed 0) plus one d_model-64 point
    at two seeds ("s0", "s1"), each with the verified indent_for circuit of ``edges`` edges."""
    import pandas as pd

    from jobs import claims

    rows = [{"model_id": m, "pfrac": d, "ef": 2.0, "seed": 0, "d_model": 128, "density": d, "nonzeros": 100,
             "val_loss": 4.0, "geomean_edges": 1.0} for m, d in densities.items()]
    rows += [{"model_id": m, "pfrac": 9.0, "ef": 1.0, "seed": i, "d_model": 64, "density": 1.0, "nonzeros": 100,
              "val_loss": 4.3, "geomean_edges": 1.0} for i, m in enumerate(("s0", "s1"))]
    circ = pd.DataFrame([{"model_id": m, "task": "indent_for", "n_edges": n, "status": "ok", "control": None}
                         for m, n in edges.items()])
    return claims.frontier_claims(pd.DataFrame(rows), circ)


def test_frontier_claims_judge_circuit_sizes_by_their_ratio_not_their_difference_in_edges():
    """Two seeds whose circuits have 1,000 and 1,300 edges differ by ×1.3; densities whose
    circuits have 40 and 200 edges differ by ×5, far beyond it, though by fewer edges (160 <
    300). Judged in edges the second would read as noise."""
    out = _claims_of({"a": 200, "b": 40, "s0": 1000, "s1": 1300}, {"a": 1.0, "b": 0.125})
    assert out[0].endswith("geomean edges ×1.30.")
    sparser = next(c for c in out if c.startswith("Sparser at equal width (d_model 128"))
    assert "reproduced: sparser → smaller circuits (×5.00 from densest to sparsest" in sparser


def test_without_a_noise_scale_for_circuit_size_the_size_claims_cannot_be_judged():
    """When no point's two seeds verify a common task there is nothing to judge a size
    difference against: however large it is, the claim says so instead of calling it
    reproduced (the default demo on an AMD EPYC: its d_model-64 seeds verified 0 and 1
    tasks, and sizes ×7.2 apart read 'reproduced … beyond the seed noise of ×1.00')."""
    import pandas as pd

    from jobs import claims

    out = _claims_of({"a": 1500, "b": 200, "s0": 1000}, {"a": 1.0, "b": 0.125})
    assert out[0].endswith("geomean edges: not both have a verified circuit for a common task.")
    sparser = next(c for c in out if c.startswith("Sparser at equal width (d_model 128"))
    assert "×7.50 from densest to sparsest" in sparser and sparser.endswith("cannot be judged.")
    assert "reproduced" not in sparser
    # the same for the circuit side of "wider at equal nonzeros": d_model 128 against 64 at one pfrac
    summary = pd.DataFrame([{"model_id": m, "pfrac": 1.0, "ef": ef, "seed": 0, "d_model": d, "density": 1 / ef, "nonzeros": 100,
                             "val_loss": v, "geomean_edges": 1.0} for m, ef, d, v in (("w", 2.0, 128, 4.0), ("n", 1.0, 64, 4.3))])
    circ = pd.DataFrame([{"model_id": m, "task": "indent_for", "n_edges": n, "status": "ok", "control": None}
                         for m, n in (("w", 100), ("n", 900))])
    wider = next(c for c in claims.frontier_claims(summary, circ) if c.startswith("Wider"))
    assert "(×0.11)" in wider and wider.endswith("so the circuit side cannot be judged.")


def test_a_monotone_trend_whose_steps_are_each_within_the_seed_noise_is_reproduced():
    """Four densities whose circuits shrink ×1.8 at each step, against a seed noise of ×2:
    each neighbouring step is within the noise, the ends differ ×5.8, and no sparser model
    is larger. A reversal beyond the noise between any two densities, neighbours or not, is
    'not reproduced'; a span within the noise is 'within seed noise'."""
    dens = {"a": 1.0, "b": 0.25, "c": 0.125, "d": 0.0625}
    noise = {"s0": 100, "s1": 200}

    def sparser(edges):
        return next(c for c in _claims_of({**edges, **noise}, dens) if c.startswith("Sparser at equal width (d_model 128"))

    assert "reproduced: sparser → smaller circuits (×5.83" in sparser({"a": 583.2, "b": 324, "c": 180, "d": 100})
    # the sparsest larger than the density-1/4 model by ×2.5 (neither is the other's neighbour)
    assert "not reproduced: a sparser model has larger circuits (×2.50)" in sparser({"a": 2000, "b": 100, "c": 150, "d": 250})
    assert "within seed noise (×2.00" in sparser({"a": 180, "b": 150, "c": 120, "d": 100})


def test_the_verdict_names_each_claims_outcome_and_why_models_have_no_circuit():
    """The report's verdict block: each frontier claim with its verdict word, and per model
    the count of each reason a task has no verified circuit, with the nearest miss."""
    from jobs import report

    summary = pd.DataFrame([{"model_id": "a-1", "pfrac": 1.0, "ef": 2.0, "seed": 0}, {"model_id": None, "pfrac": 0.5, "ef": 2.0, "seed": 0}])
    circ = pd.DataFrame([
        {"model_id": "a-1", "task": "else_elif", "status": "ok", "full_loss": 0.05},
        {"model_id": "a-1", "task": "single_double_quote", "status": "model_misses_target", "full_loss": 0.157},
        {"model_id": "a-1", "task": "fstring_brace", "status": "model_misses_target", "full_loss": 0.48},
        {"model_id": "a-1", "task": "if_ternary", "status": "chance", "full_loss": 4.1},
        {"model_id": "a-1", "task": "indent_for", "status": "not_verified", "full_loss": 0.09},
    ])
    claims = ["Seed noise (one point at two seeds): val loss ±0.035, geomean edges ×1.42.",
              "Sparser at equal width (d_model 128; …): within seed noise (×1.42 between two seeds …): cannot be told apart.",
              "Wider at equal nonzeros (~368,640): d_model 128 vs 64 — val loss -0.185, …: reproduced: the frontier moves outward.",
              "Sparser at equal width (d_model 64): fewer than two of its densities have verified circuits, so it cannot be judged.",
              "Wider … : not reproduced."]
    v = report.verdicts(summary, circ, claims)
    assert [c["verdict"] for c in v["claims"]] == ["noise scale", "within seed noise", "reproduced", "cannot be judged", "not reproduced"]
    first = v["models"][0]["text"]
    assert first.startswith("1 verified; 1 met the target on selection pairs but not on test pairs")
    assert "2 the full model does the task but misses the target (nearest: single_double_quote, 0.157)" in first
    assert "1 the full model is at chance" in first and v["models"][1]["text"] == "0 verified"
    assert (v["n_ok"], v["n_pairs"], v["controls"]) == (1, 5, None)
