import json

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from cli.main import app
from cluster import checkpoints, local_train

runner = CliRunner()


def test_interrupted_local_run_resumes_to_the_same_weights(stdlib_data, tmp_path):
    """train_local stopped mid-run and re-run ends equal to an uninterrupted run, and a
    finished run does no work."""
    cfg = tiny_config(t__steps=24, t__ckpt_every=10, t__eval_every=10)
    full = local_train.train_local(stdlib_data, str(tmp_path / "full"), cfg, device="cpu")
    part = str(tmp_path / "part")
    local_train.train_local(stdlib_data, part, cfg, device="cpu", stop_after=15)
    assert checkpoints.latest_step(part) == 15
    resumed = local_train.train_local(stdlib_data, part, cfg, device="cpu")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert local_train.train_local(stdlib_data, part, cfg, device="cpu") is None
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 24


def test_a_run_directory_with_another_config_is_refused(stdlib_data, tmp_path):
    out = str(tmp_path / "run")
    local_train.train_local(stdlib_data, out, tiny_config(t__steps=2), device="cpu")
    with pytest.raises(local_train.RunError, match=r"another configuration \(sparsity\.pfrac=[0-9.]+, not 0\.5\); resume it with its own settings"):
        local_train.train_local(stdlib_data, out, tiny_config(t__steps=2, s__pfrac=0.5), device="cpu")


def test_csp_train_then_model_info_export_import(stdlib_data, tmp_path):
    """`csp train` writes a checkpoint; `csp model info` shows its nonzeros; export/import round-trip."""
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", stdlib_data, "--out", str(out), "--steps", "12", "--batch", "8",
                            "--pfrac", "0.25", "--eval-every", "6", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trained 12 steps" in r.stdout
    from sparsity.config import density_lr

    config = json.loads((out / "run.json").read_text())["config"]
    lr, width = config["train"]["lr"], config["model"]["d_model"]
    assert lr == density_lr(0.25, "adam", d_model=width) and f"lr {lr:.3g} = " in r.stdout and "density rule" in r.stdout
    assert f"64/d_model {width}" in r.stdout  # Adam's width factor is printed too
    r = runner.invoke(app, ["model", "info", str(out), "--format", "json"])
    info = json.loads(r.stdout)
    c_fc = info["matrices"]["transformer.h.0.mlp.c_fc.weight"]
    assert info["step"] == 12 and c_fc["nonzeros"] <= round(0.25 * c_fc["numel"])
    r = runner.invoke(app, ["model", "info", str(out)])
    assert r.exit_code == 0 and "transformer.h.1.attn.c_attn.weight" in r.stdout
    in_matrices = sum(m["nonzeros"] for m in info["matrices"].values())  # both nonzero counts say what they count
    assert f"nonzero {info['nonzero_params']:,} (every parameter; {in_matrices:,} in the sparsified matrices below" in r.stdout
    r = runner.invoke(app, ["model", "export", str(out), "--out", str(tmp_path / "ref")])
    assert r.exit_code == 0 and (tmp_path / "ref" / "final_model.pt").exists()
    r = runner.invoke(app, ["model", "import", str(tmp_path / "ref"), "--out", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    a = checkpoints.load(str(out)).build_model()
    b = checkpoints.load(str(tmp_path / "back")).build_model()
    idx = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


@pytest.mark.parametrize("args, fragment", [
    (["--pfrac", "0"], "--pfrac 0.0 out of range"),
    (["--afrac", "0"], "--afrac 0.0 out of range: must be in (0, 1]"),
    (["--afrac", "5"], "--afrac 5.0 out of range: must be in (0, 1]; 1 turns AbsTopK off"),  # not a silent "no activation sparsity"
    (["--batch", "7", "--workers", "2"], "--batch 7 must divide evenly over 2 workers"),
    (["--optimizer", "sgd"], "Invalid value for '--optimizer'"),
    (["--n-ctx", "512"], "exceeds the data's n_ctx=64"),
    (["--steps", "0"], "--steps 0 out of range"),
    (["--device", "cuda:3"], "CUDA is not available"),
    (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    (["--d-model", "0"], "--d-model 0 out of range"),
    (["--milestones", "x"], "--milestones 'x': give a count (6) or steps separated by commas"),
    (["--milestones", "0"], "--milestones 0 out of range: a count must be in 1..2"),
    (["--milestones", "1,9"], "--milestones '1,9' out of range: must be steps in 1..2"),
])
def test_csp_train_bad_flags_are_one_line_errors(stdlib_data, tmp_path, args, fragment):
    r = runner.invoke(app, ["train", "--data", stdlib_data, "--out", str(tmp_path / "run"), "--steps", "2", *args])
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_lr_rule_scales_adam_by_width_and_density_and_muon_by_density_only():
    """csp's rule (sparsity.config): lr_dense / sqrt(density), × 64/d_model for Adam — the
    best lrs measured at d64 dense, d128 dense and d128 at density 1/8 (benchmarks/lr_rule.py)."""
    from sparsity.config import LR_DENSE, density_lr

    assert density_lr(1.0, "adam", d_model=64) == LR_DENSE["adam"] == 0.03
    assert density_lr(1.0, "adam", d_model=128) == 0.015
    assert density_lr(0.125, "adam", d_model=128) == 0.0424
    assert density_lr(0.25, "muon", d_model=512) == density_lr(0.25, "muon", d_model=64) == 2 * LR_DENSE["muon"]
    cfg = tiny_config(m__d_model=128, m__n_head=8, m__d_mlp=512, s__pfrac=0.5).with_density_lr()
    assert cfg.train.lr == density_lr(cfg.sparsity.l0frac, "adam", d_model=128)
    assert cfg.lr_rule().startswith(f"lr {cfg.train.lr:.3g} = 0.03 × 64/d_model 128 / sqrt(density 0.5)")


def test_milestones_are_kept_without_optimizer_state_listed_and_survive_a_resume(stdlib_data, tmp_path):
    """`--milestones` keeps those steps' checkpoints beside the last 2 (weights and config:
    the optimizer state goes once a milestone is not among the last 2), prints their storage
    cost, and `model info` lists them; an interrupted run resumed keeps its early milestones."""
    out = tmp_path / "run"
    from sparsity.config import milestone_steps

    assert milestone_steps("3", 24) == (1, 5, 24) and milestone_steps("3,7,24", 24) == (3, 7, 24)  # a count (log-spaced), or steps
    r = runner.invoke(app, ["train", "--data", stdlib_data, "--out", str(out), "--steps", "24", "--batch", "4", "--ckpt-every", "10",
                            "--eval-every", "12", "--milestones", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "keeping 3 milestone checkpoints (steps 1, 5, 24) beside the last 2: ~" in r.stdout and " MB in all" in r.stdout
    ck = out / "checkpoints"
    assert checkpoints.steps(str(out)) == [1, 5, 20, 24]  # exactly the milestones and the last 2 (10 went when 20 came)
    for step, state in ((1, False), (5, False), (20, True), (24, True)):
        assert (ck / checkpoints.step_dir(step) / "train_state.pt").exists() is state, step
    early, last = checkpoints.load(str(ck / checkpoints.step_dir(5))), checkpoints.load(str(out))
    assert early.step == 5 and last.step == 24 and early.train_state is None
    assert not torch.equal(early.build_model().lm_head.weight, last.build_model().lm_head.weight)
    info = json.loads(runner.invoke(app, ["model", "info", str(out), "--format", "json"]).stdout)
    assert info["checkpoints"]["steps"] == [1, 5, 20, 24] and info["checkpoints"]["milestones"] == [1, 5, 24]
    assert info["checkpoints"]["bytes"] == sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
    text = runner.invoke(app, ["model", "info", str(out)]).stdout
    assert "checkpoints kept  steps 1 (milestone), 5 (milestone), 20, 24 (milestone);" in text
    # interrupted after the milestones, resumed: they are still there, and the run ends where an uninterrupted one does
    cfg = tiny_config(t__steps=24, t__ckpt_every=10, t__eval_every=12, t__milestones=(3, 7))
    part = str(tmp_path / "part")
    local_train.train_local(stdlib_data, part, cfg, device="cpu", stop_after=15)
    assert checkpoints.steps(part) == [3, 7, 10, 15]
    local_train.train_local(stdlib_data, part, cfg, device="cpu")
    assert checkpoints.steps(part) == [3, 7, 20, 24]
    full = local_train.train_local(stdlib_data, str(tmp_path / "full"), tiny_config(t__steps=24, t__ckpt_every=10, t__eval_every=12),
                                   device="cpu")
    assert torch.equal(full.model.lm_head.weight, checkpoints.load(part).build_model().lm_head.weight)  # milestones change no weight
