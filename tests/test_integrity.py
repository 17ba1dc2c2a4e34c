"""Run integrity: one writer per run directory (a lease, locally and on S3), latest.json
that only moves forward, metrics merged by step, a fallback when latest.json names a
missing checkpoint, and fan-outs into one results store that split the pairs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from cli.main import app
from cluster import checkpoints, lease, local_train, storage
from sparsity import checkpoint_format as ckpt_lib

runner = CliRunner()
TINY = ["--d-model", "64", "--n-layer", "2", "--n-head", "4", "--d-head", "16", "--batch", "8", "--device", "cpu", "--pfrac", "0.25"]


def _train_cmd(data: str, out: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", "--data", data, "--out", out, "--steps", str(steps),
            "--ckpt-every", "20", "--eval-every", "40", *TINY, *extra]


def _wait_for(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _latest_steps_while(proc: subprocess.Popen, out: str) -> list[int]:
    """Poll latest.json until ``proc`` exits: every step it showed, in order."""
    seen = []
    while proc.poll() is None:
        try:
            s = checkpoints.latest_step(out)
        except Exception:  # noqa: BLE001 - a checkpoint being replaced; poll again
            s = None
        if s is not None and (not seen or seen[-1] != s):
            seen.append(s)
        time.sleep(0.2)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_on_a_live_run_is_refused_and_the_first_finishes_whole(where, stdlib_data, tmp_path, s3_prefix):
    out = str(tmp_path / "run") if where == "local" else f"{s3_prefix}/run"
    env = {**os.environ, "CSP_LEASE_INTERVAL_S": "1"}
    first = subprocess.Popen(_train_cmd(stdlib_data, out, 80), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: storage.exists(storage.resolve(out).join(checkpoints.LEASE_FILE)), 60, "the first run's lease")
        t0 = time.monotonic()
        r = runner.invoke(app, ["train", "--data", stdlib_data, "--out", out, "--steps", "80", "--ckpt-every", "20",
                                "--eval-every", "40", *TINY])
        took = time.monotonic() - t0
        assert r.exit_code == 1, r.output
        line = r.stderr.strip()
        assert "\n" not in line and "is in use by" in line and f"pid {first.pid}" in line and socket.gethostname() in line, line
        assert "heartbeat" in line and "Traceback" not in r.output
        assert took < 10, took
        steps = _latest_steps_while(first, out)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first.stderr
    assert steps == sorted(steps) and steps[-1] == 80, steps  # latest.json never moved back
    rows = [json.loads(x) for x in storage.read_text(storage.resolve(out).join(checkpoints.METRICS_FILE)).splitlines()]
    train_steps = [m["step"] for m in rows if "loss" in m and "val_loss" not in m]
    assert train_steps == list(range(10, 81, 10))  # every row, once, in order
    assert {m["step"] for m in rows if "val_loss" in m} >= {40, 80}
    assert not storage.exists(storage.resolve(out).join(checkpoints.LEASE_FILE))  # released at exit


@pytest.mark.slow
def test_a_killed_run_is_taken_over(stdlib_data, tmp_path):
    """Killed on this machine: the re-run takes over by itself (its process is gone). A lease
    from another machine whose heartbeat stopped needs --take-over; a live one never yields."""
    out = str(tmp_path / "run")
    env = {**os.environ, "CSP_LEASE_INTERVAL_S": "1"}
    first = subprocess.Popen(_train_cmd(stdlib_data, out, 80), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: checkpoints.latest_step(out) if os.path.exists(os.path.join(out, "checkpoints", "latest.json")) else None,
              90, "a first checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert os.path.exists(os.path.join(out, "lease.json"))  # left behind by the killed run
    r = subprocess.run(_train_cmd(stdlib_data, out, 80), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"taking over {out} from" in r.stderr and f"pid {first.pid}" in r.stderr
    assert checkpoints.latest_step(out) == 80

    # A lease of another machine: stale (heartbeat an hour ago) → refused without --take-over.
    run2 = str(tmp_path / "run2")
    ghost = {"owner": "csp-ghost", "host": "gpu-node-7", "pid": 4242, "what": "csp train", "started_at": "2026-11-27T00:00:00+00:00",
             "heartbeat_at": time.time() - 3600, "interval_s": 10.0}
    storage.write_json(os.path.join(run2, "lease.json"), ghost)
    cmd = ["train", "--data", stdlib_data, "--out", run2, "--steps", "10", *TINY]
    r = runner.invoke(app, cmd)
    assert r.exit_code == 1 and "gpu-node-7 pid 4242" in r.stderr and "--take-over" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(run2, "run.json"))  # nothing written
    r = runner.invoke(app, [*cmd, "--take-over"])
    assert r.exit_code == 0, r.output
    assert "taking over" in r.stderr and checkpoints.latest_step(run2) == 10
    # ... and a live one (fresh heartbeat) is not displaced, --take-over or not.
    run3 = str(tmp_path / "run3")
    storage.write_json(os.path.join(run3, "lease.json"), {**ghost, "heartbeat_at": time.time()})
    r = runner.invoke(app, ["train", "--data", stdlib_data, "--out", run3, "--steps", "10", *TINY, "--take-over"])
    assert r.exit_code == 1 and "applies only once its heartbeat is older" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lease_is_a_compare_and_swap(where, tmp_path, s3_prefix):
    loc = str(tmp_path / "lease.json") if where == "local" else f"{s3_prefix}/lease.json"
    a, held = lease.try_acquire(loc, "owner-a", "test")
    assert a is not None and held is None
    b, held = lease.try_acquire(loc, "owner-b", "test", take_over=True)  # fresh: take_over does not apply
    assert b is None and held["owner"] == "owner-a"
    again, _ = lease.try_acquire(loc, "owner-a", "test")  # the same owner re-takes it (a retried trial)
    assert again is not None
    assert a.renew()
    rec = storage.read_json(loc)
    storage.write_json(loc, {**rec, "heartbeat_at": time.time() - 3600})  # a stale heartbeat
    b, _ = lease.try_acquire(loc, "owner-b", "test", take_over=True)
    assert b is not None and b.took_over["owner"] == "owner-a"
    assert not a.renew() and "owner-b" in a.lost  # the old owner learns it lost the lease
    with pytest.raises(lease.LeaseLost):
        a.check()
    with pytest.raises(lease.LeaseLost):
        lease.check_owner(loc, "owner-a")
    a.release()  # not ours any more: left alone
    assert storage.read_json(loc)["owner"] == "owner-b"
    b.release()
    assert not storage.exists(loc)


def test_latest_json_only_moves_forward_and_metrics_merge_by_step(tmp_path):
    cfg, run = tiny_config(), str(tmp_path / "run")
    from sparsity.model import GPT

    model = GPT(cfg.model)
    checkpoints.save(run, ckpt_lib.to_files(model, cfg, 20), 20)
    with pytest.raises(ckpt_lib.CheckpointError, match="already at step 20, ahead of this writer's step 10"):
        checkpoints.save(run, ckpt_lib.to_files(model, cfg, 10), 10)
    assert checkpoints.latest_step(run) == 20 and not os.path.exists(os.path.join(run, "checkpoints", "step-00000010"))

    checkpoints.write_metrics(run, [{"step": s, "loss": 1.0} for s in range(1, 11)], 0)
    # A restarted writer resumed at 6 and knows only its own rows: the stored 1..6 stay.
    checkpoints.write_metrics(run, [{"step": s, "loss": 2.0} for s in range(7, 13)], 6)
    rows = checkpoints.read_metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 13))
    assert [m["loss"] for m in rows] == [1.0] * 6 + [2.0] * 6


def test_latest_json_naming_a_deleted_step_falls_back_to_the_newest_complete_one(stdlib_data, tmp_path, capfd):
    import shutil

    out = str(tmp_path / "run")
    cfg = tiny_config(t__steps=30, t__ckpt_every=10)
    local_train.train_local(stdlib_data, out, cfg, device="cpu")
    assert checkpoints.latest_step(out) == 30
    shutil.rmtree(os.path.join(out, "checkpoints", "step-00000030"))
    capfd.readouterr()
    ck = checkpoints.load(out)
    assert ck.step == 20
    err = capfd.readouterr().err
    assert "latest.json names step-00000030, which is missing or incomplete; using step-00000020" in err
    assert checkpoints.latest_step(out) == 20
    resumed = local_train.train_local(stdlib_data, out, cfg, device="cpu")  # resumes from 20, not from scratch
    assert resumed.step == 30 and checkpoints.latest_step(out) == 30
    shutil.rmtree(os.path.join(out, "checkpoints"))
    os.makedirs(os.path.join(out, "checkpoints", "step-00000010"))
    storage.write_json(os.path.join(out, "checkpoints", "latest.json"), {"step": 10, "path": "step-00000010"})
    with pytest.raises(ckpt_lib.CheckpointError, match="no other complete checkpoint"):
        checkpoints.load(out)
