
import dataclasses
import json
import math
import os

import pandas as pd
import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from cli.main import app
from cluster import ray_train, runtime, storage
from jobs import sweep

runner = CliRunner()


# Two workers with identical weights at every step, disjoint batches, and a killed node's
# run resuming to the same final weights: tests/test_multinode.py, on a 3-node cluster.


def _sweep(ray_session, data, out):
    cfg = tiny_config(t__steps=8, t__ckpt_every=4, t__eval_every=4, t__batch_size=8, t__milestones=(2,))
    return sweep.run_sweep(data, out, sweep.parse_grid("pfrac=0.25,0.5;ef=1,2"), cfg.model, cfg.train, workers_per_trial=1,
                           density_lr=True)


@pytest.mark.slow
def test_a_2x2_sweep_on_s3_writes_its_summary_and_a_rerun_trains_nothing(ray_session, stdlib_data, s3_prefix, tmp_path):
    # On S3, the harder store; a sweep to a local path (and its re-run training nothing) is
    # what tests/test_demo.py runs, so the suite pays for one ~90 s sweep here, not two.
    out = s3_prefix
    df = _sweep(ray_session, stdlib_data, out)
    # readable names: width and density (pfrac 0.25 at ef 2 is d_model 128 at density 1/16)
    assert sorted(df["trial"]) == ["d128-p1_16", "d128-p1_8", "d64-p1_2", "d64-p1_4"]
    assert (df["density"] == df["pfrac"] / df["ef"] ** 2).all()
    assert (df["steps"] == 8).all() and df["val_loss"].notna().all()
    # every trial kept its milestone (step 2) beside the last 2 checkpoints, on S3, without its optimizer state
    assert all(list(m) == [2] for m in df["milestones"])
    assert storage.exists(f"{out}/runs/d64-p1_4/checkpoints/step-00000002/model.safetensors")
    assert not storage.exists(f"{out}/runs/d64-p1_4/checkpoints/step-00000002/train_state.pt")
    status = runner.invoke(app, ["sweep", "status", out])
    assert status.exit_code == 0 and "milestones" in status.stdout and "1: 2" in status.stdout, status.output
    # Each trial trains at csp's rule (Adam: LR_DENSE · 64/d_model / sqrt(density)), read back
    # from its run's config.
    from sparsity.config import LR_DENSE, RunConfig, density_lr

    for t in df.itertuples():
        cfg = RunConfig.from_dict(storage.read_json(f"{out}/runs/{t.trial}/run.json")["config"])
        assert cfg.train.lr == t.lr == density_lr(cfg.sparsity.l0frac, "adam", d_model=cfg.model.d_model)
        assert cfg.model.d_model == 64 * t.ef
        assert math.isclose(cfg.train.lr, LR_DENSE["adam"] / t.ef / math.sqrt(t.pfrac / t.ef ** 2), rel_tol=5e-3)  # 3 significant digits
    lrs = df.set_index("trial")["lr"]
    assert lrs["d64-p1_4"] > lrs["d64-p1_2"]  # sparser at one width: larger
    assert lrs["d128-p1_8"] < lrs["d64-p1_4"]  # density 1/8 at twice the width: 2^(1/2) × 1/2 of density 1/4's
    # pfrac/ef² keeps the nonzero count about constant as width grows
    by = df.set_index("trial")["nonzeros"]
    assert abs(by["d128-p1_16"] - by["d64-p1_4"]) < 0.2 * by["d64-p1_4"]
    # One-worker trials train in Tune's (reused) trial processes: each is the same run as
    # `csp train` of its config in a fresh process here, to the bit.
    import torch

    from cluster import checkpoints, local_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial (one CPU)
    try:
        for trial in ("d128-p1_16", "d64-p1_2"):
            run = f"{out}/runs/{trial}"
            cfg = RunConfig.from_dict(storage.read_json(f"{run}/run.json")["config"])
            again = os.path.join(str(tmp_path), trial)
            local_train.train_local(stdlib_data, again, cfg, device="cpu")
            assert checkpoints.load(again).meta["weights_sha256"] == checkpoints.load(run).meta["weights_sha256"]
        assert {"t_trial_start", "t_ready", "t_loop_end", "t_fit_end"} <= set(storage.read_json(f"{run}/timings.json"))
    finally:
        torch.set_num_threads(threads)
    metrics = pd.read_parquet(f"{out}/metrics", storage_options=storage.storage_options(out))
    assert set(metrics["trial"].astype(str)) == set(df["trial"]) and metrics["loss"].notna().any()
    before = {u for u in storage.ls(out) if "/checkpoints/step-" in u}
    again = _sweep(ray_session, stdlib_data, out)
    assert {u for u in storage.ls(out) if "/checkpoints/step-" in u} == before
    assert sorted(again["trial"]) == sorted(df["trial"])
    r = runner.invoke(app, ["sweep", "status", out])
    assert r.exit_code == 0 and "d128-p1_8" in r.stdout


@pytest.mark.parametrize("grid, fragment", [
    ("foo=1", "unknown grid key 'foo'"),
    ("pfrac=", "grid key 'pfrac' has no values"),
    ("pfrac=2", "--grid point pfrac=2.0: pfrac=2.0 out of range"),
    ("pfrac=a", "are not all floats"),
    ("", "empty grid"),
])
def test_bad_grids_fail_before_anything_runs(stdlib_data, tmp_path, grid, fragment):
    r = runner.invoke(app, ["sweep", "--data", stdlib_data, "--out", str(tmp_path / "s"), "--grid", grid])
    assert r.exit_code == 2 and fragment in r.stderr, r.output
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_asha_stops_a_trial_with_a_100x_learning_rate_and_the_summary_and_fanout_know(ray_session, stdlib_data, tmp_path):
    """`--scheduler asha` on five trials, the last at 100× the lr rule's rate: ASHA stops that
    one part-way (its row records the step), the best trial is a sane one, a re-run trains
    nothing, and the fan-out leaves the stopped trial out unless asked. (ASHA is
    asynchronous: the first trial to reach a rung always goes on. With 4 CPUs the fifth trial
    starts when another has finished, so it meets its rungs after others have.)"""
    from jobs import fanout

    out = str(tmp_path / "s")
    args = ["sweep", "--data", stdlib_data, "--out", out, "--grid", "lr=0.03,0.01,0.02,0.015,3", "--steps", "40", "--batch", "4",
            "--scheduler", "asha", "--grace-period", "10"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    df = sweep.read_summary(out).set_index("trial")
    bad = df[df["lr"] == 3].iloc[0]
    assert 10 <= bad["stopped_at"] < 40, df[["lr", "stopped_at", "val_loss"]]
    finished = df[df["stopped_at"].isna()]
    assert len(finished) >= 1 and (finished["steps"] == 40).all() and finished["val_loss"].min() < bad["val_loss"]
    assert "stopped_at" in r.stdout
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and sweep.read_summary(out).set_index("trial")["wall_seconds"].equals(df["wall_seconds"])  # nothing retrained
    assert len(fanout.expand_checkpoints([out])) == len(finished)  # the stopped trial is not pruned ...
    assert len(fanout.expand_checkpoints([out], include_stopped=True)) >= len(finished)  # ... unless asked (when it checkpointed)
    for bad_args, fragment in ((["--scheduler", "hyperband"], "the one scheduler is asha"),
                               (["--scheduler", "asha", "--grace-period", "40"], "--grace-period 40 must be in 1..39"),
                               (["--scheduler", "asha", "--reduction-factor", "1"], "--reduction-factor 1 must be ≥ 2")):
        bad_run = runner.invoke(app, ["sweep", "--data", stdlib_data, "--out", str(tmp_path / "t"), "--steps", "40", *bad_args])
        assert bad_run.exit_code == 2 and fragment in bad_run.stderr and len(bad_run.stderr.strip().splitlines()) == 1, bad_run.output
        assert not (tmp_path / "t").exists()


def test_unreachable_address_is_a_clear_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(runtime.RayConnectError, match="cannot reach Ray"):
            runtime.check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    finally:
        s.close()
    with pytest.raises(runtime.RayConnectError, match="bad Ray address"):
        runtime.check_reachable("nohost")


def test_more_workers_than_cpus_is_refused(ray_session, stdlib_data, tmp_path):
    with pytest.raises(ray_train.RunError, match="need 8 CPUs"):
        ray_train.train_distributed(stdlib_data, str(tmp_path / "r"), tiny_config(t__batch_size=8), workers=8)
    with pytest.raises(ray_train.RunError, match=r"2 workers need 6 CPUs \(3 per worker\)"):
        ray_train.train_distributed(stdlib_data, str(tmp_path / "r"), tiny_config(t__batch_size=8), workers=2, cpus_per_worker=3)
    assert not os.path.exists(tmp_path / "r")

def test_gpus_select_nccl_and_a_cluster_without_gpus_refuses_them(ray_session, stdlib_data, tmp_path):
    """The CUDA branch, as far as it runs without a GPU: --gpus picks NCCL (gloo otherwise),
    and asking for GPUs the cluster lacks is a clear error before anything is written."""
    assert ray_train.torch_backend(True) == "nccl" and ray_train.torch_backend(False) == "gloo"
    with pytest.raises(ray_train.RunError, match="needs 2 GPUs; the cluster has 0"):
        ray_train.train_distributed(stdlib_data, str(tmp_path / "r"), tiny_config(t__batch_size=8), workers=2, use_gpu=True)
    with pytest.raises(ray_train.RunError, match="strict_spread needs 2 nodes"):
        ray_train.train_distributed(stdlib_data, str(tmp_path / "r"), tiny_config(t__batch_size=8), workers=2, placement="strict_spread")
    assert not os.path.exists(tmp_path / "r")


def test_worker_runtime_env_never_carries_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "top-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = runtime.worker_runtime_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "top-secret-value" not in str(env) and "AWS_SECRET_ACCESS_KEY" not in env


def test_bounded_map_keeps_at_most_limit_in_flight_and_returns_every_item(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    class Gauge:
        def __init__(self):
            self.now = self.peak = 0

        def enter(self):
            self.now += 1
            self.peak = max(self.peak, self.now)

        def leave(self):
            self.now -= 1

        def get_peak(self):
            return self.peak

    g = Gauge.remote()

    @ray.remote(num_cpus=0)
    def work(i, gauge):
        import time

        ray.get(gauge.enter.remote())
        time.sleep(0.05)
        ray.get(gauge.leave.remote())
        if i == 3:
            raise ValueError("item 3")
        return i * i

    got, failed = {}, []
    for i, ref in runtime.bounded_map(lambda i: work.remote(i, g), range(10), limit=3):
        try:
            got[i] = ray.get(ref)
        except ray.exceptions.RayTaskError:
            failed.append(i)
    assert got == {i: i * i for i in range(10) if i != 3} and failed == [3]
    assert 1 <= ray.get(g.get_peak.remote()) <= 3
    assert list(runtime.bounded_map(lambda i: work.remote(i, g), [], limit=3)) == []


def test_resuming_a_sweep_with_other_settings_is_refused_before_any_work(tmp_path):
    """A sweep directory holds one sweep: the same trial names under another training or
    sparsity config would be skipped as done while meaning something else, so a resume with
    other settings fails, naming the first setting that differs; the stored sweep is untouched."""
    cfg = tiny_config(t__steps=8)
    out = storage.resolve(str(tmp_path / "s"))
    record = {"grid": {}, "extra_points": [], "base": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
              "sparsity": {"anneal_end": 0.25}}
    storage.write_json(out.join("sweep.json"), record)
    pts = [{"pfrac": 0.5, "ef": 1.0}]
    longer = dataclasses.replace(cfg.train, steps=16)
    with pytest.raises(sweep.SweepError, match=r"train\.steps=8, not 16"):
        sweep.run_sweep(str(tmp_path / "data"), out.uri, None, cfg.model, longer, extra_points=pts, sparsity={"anneal_end": 0.25})
    with pytest.raises(sweep.SweepError, match=r"sparsity\.anneal_end=0\.25, not None"):
        sweep.run_sweep(str(tmp_path / "data"), out.uri, None, cfg.model, cfg.train, extra_points=pts)
    assert storage.read_json(out.join("sweep.json")) == json.loads(json.dumps(record))  # untouched (tuples read back as lists)


def test_trial_names_say_width_density_and_the_axes_a_point_sets():
    """Trial names are read, not decoded: d<width>-<density>, then afrac, lr and seed when the
    point sets them; two points that are the same run are refused naming both."""
    cfg = tiny_config()
    base, train = cfg.model, cfg.train

    def name(p):
        return sweep.trial_name(p, sweep.trial_config(base, train, p))

    assert name({"pfrac": 4.0, "ef": 2.0}) == "d128-dense"
    assert name({"pfrac": 0.5, "ef": 2.0, "seed": 1}) == "d128-p1_8-s1"
    assert name({"pfrac": 1.0, "ef": 1.0, "lr": 0.03, "seed": 1}) == "d64-dense-lr0.03-s1"
    assert name({"pfrac": 0.3, "afrac": 1.0}) == "d64-p0.3-aoff"
    assert name({"pfrac": 0.25, "afrac": 0.5}) == "d64-p1_4-a0.5"
    assert name({"pfrac": 0.5, "ef": 1.0, "afrac": 0.25}) == "d64-p1_2-a0.25"  # an axis the point sets is named, default or not
    pts = [{"pfrac": 0.5, "ef": 1.0, "seed": 0}, {"pfrac": 0.5, "ef": 1.0, "seed": 0}]
    with pytest.raises(sweep.SweepError, match=r"grid points .*seed': 0.* and .*seed': 0.* are the same run \(d64-p1_2-s0\)"):
        sweep.trial_names("/nonexistent-sweep", pts, [sweep.trial_config(base, train, p) for p in pts])


def test_a_sweep_from_before_readable_names_resumes_under_its_own_trial_names(tmp_path):
    """A sweep written with the earlier names (pfrac=0.5_ef=2) keeps them: its finished trials
    are found, not retrained under a new name; a point it never ran gets the new name."""
    cfg = tiny_config()
    out = storage.resolve(str(tmp_path / "old"))
    done = {"pfrac": 0.5, "ef": 2.0}
    storage.write_json(out.join("trials", "pfrac=0.5_ef=2.json"), {"trial": "pfrac=0.5_ef=2"})
    pts = [done, {"pfrac": 0.25, "ef": 1.0}]
    assert sweep.trial_names(out.uri, pts, [sweep.trial_config(cfg.model, cfg.train, p) for p in pts]) == ["pfrac=0.5_ef=2", "d64-p1_4"]


@pytest.mark.slow
def test_the_asha_benchmark_runs_both_sweeps_and_prints_json(stdlib_data):
    """`benchmarks/sweep_asha.py --smoke`: the same grid with and without ASHA, one JSON object."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/sweep_asha.py", "--smoke", "--data", stdlib_data, "--cpus", "2"], cwd=root,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["full"]["trials"] == out["asha"]["trials"] == 3 and out["full"]["stopped"] == 0
    assert out["wall_ratio"] > 0 and isinstance(out["same_best"], bool)


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_raises_and_keeps_what_finished_and_a_rerun_resumes(ray_session, stdlib_data, tmp_path):
    """Ctrl-C during a sweep stops it (KeyboardInterrupt, not a short result taken for a
    finished one: Tune on its own ends the trials and returns, and the demo went on to prune
    the models that happened to be done); the unfinished trial is not recorded as done, its
    checkpoint stays, and the same call again trains it to the end from there."""
    import signal
    import threading
    import time

    cfg = tiny_config(t__steps=400, t__ckpt_every=20, t__eval_every=200, t__batch_size=8)
    out = str(tmp_path / "sweep")
    ckpt = storage.resolve(out).join("runs", "d64-p1_4", "checkpoints", "latest.json")
    late: list[int] = []
    before = signal.signal(signal.SIGINT, lambda *_: late.append(1))  # a signal after the sweep: recorded, not a session abort
    sent = threading.Event()

    def ctrl_c():
        deadline = time.monotonic() + 120
        while not storage.exists(ckpt) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    def run():
        return sweep.run_sweep(stdlib_data, out, sweep.parse_grid("pfrac=0.25"), cfg.model, cfg.train, workers_per_trial=1)

    try:
        t = threading.Thread(target=ctrl_c, daemon=True)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            run()
        t.join(10)
        assert sent.is_set() and not late
        assert storage.exists(ckpt)
        assert not storage.exists(f"{out}/trials/d64-p1_4.json") and not storage.exists(f"{out}/summary.parquet")
        df = run()
    finally:
        signal.signal(signal.SIGINT, before)
    assert not late
    assert df["trial"].tolist() == ["d64-p1_4"] and int(df["steps"].iloc[0]) == 400 and df["val_loss"].notna().all()
    rows = [json.loads(line) for line in open(tmp_path / "sweep" / "runs" / "d64-p1_4" / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice


@pytest.mark.slow
def test_ctrl_c_in_distributed_training_raises_keyboard_interrupt_and_keeps_the_checkpoints(ray_session, stdlib_data, tmp_path):
    """Ray Train's own SIGINT handler aborts the run and exits from inside fit (silently,
    status 1); csp turns that into KeyboardInterrupt (the CLI's 'interrupted' line, exit 130),
    keeps the checkpoints written so far, and puts the previous SIGINT handler back."""
    import signal
    import threading
    import time

    cfg = tiny_config(t__steps=4000, t__ckpt_every=20, t__batch_size=8)
    out = str(tmp_path / "run")
    ckpt = storage.resolve(out).join("checkpoints", "latest.json")
    late: list[int] = []
    handler = lambda *_: late.append(1)  # noqa: E731  (a signal after the run: recorded, not a session abort)
    before = signal.signal(signal.SIGINT, handler)

    def ctrl_c():
        deadline = time.monotonic() + 120
        while not storage.exists(ckpt) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    try:
        t = threading.Thread(target=ctrl_c, daemon=True)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            ray_train.train_distributed(stdlib_data, out, cfg, workers=2)
        t.join(10)
        assert signal.getsignal(signal.SIGINT) is handler and not late
    finally:
        signal.signal(signal.SIGINT, before)
    assert storage.read_json(ckpt)["step"] < 4000
