"""Ray Jobs on the multinode cluster (head + two worker nodes): `csp submit` a sweep and a
prune fan-out whose outputs go to S3, follow a job's logs, stop one; `--address` from a
fresh process; clean errors."""

import os
import shutil
import time
import uuid

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from cluster import jobs_api, storage

runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def head(multinode):
    return {"address": multinode.address, "dashboard": multinode.dashboard}


def _wait(address, job_id, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = jobs_api.job_status(address, job_id)
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {st} after {timeout}s")


@pytest.mark.slow
def test_submit_runs_a_sweep_and_a_fanout_on_s3_follows_logs_and_stops_a_job(head, s3_data, two_workers):
    """`csp submit` on the multinode cluster: a small sweep job then a prune fan-out job
    finish with their outputs on S3; `csp jobs logs --follow` streams a job to its end; a
    long job is stopped."""
    addr = head["dashboard"]
    base = f"{s3_data.rsplit('/', 1)[0]}/jobs-{uuid.uuid4().hex[:6]}"
    sweep_dir, res = f"{base}/sweep", f"{base}/res"
    small = ["--steps", "4", "--batch", "8", "--n-layer", "1", "--d-model", "32", "--n-head", "2"]
    r = runner.invoke(app, ["submit", "--address", addr, "--working-dir", REPO, "--", "csp", "sweep", "--data", s3_data,
                            "--out", sweep_dir, "--grid", "pfrac=0.5", "--lr", "0.007", *small])
    assert r.exit_code == 0, r.output
    job = r.stdout.strip().splitlines()[-1]
    r = runner.invoke(app, ["jobs", "logs", job, "--follow", "--address", addr])
    assert r.exit_code == 0, r.output + jobs_api.logs(addr, job)[-2000:]
    assert "pfrac=0.5 " in r.stdout and "wall_seconds" in r.stdout  # the summary table, streamed to the end
    assert f"job {job}: SUCCEEDED" in r.stderr
    assert storage.exists(f"{sweep_dir}/summary.parquet")
    trial = storage.read_parquet(f"{sweep_dir}/summary.parquet").to_pandas()["trial"].iloc[0]
    run = storage.read_json(f"{sweep_dir}/runs/{trial}/run.json")
    assert run["config"]["train"]["lr"] == 0.007  # an explicit --lr wins over the density rule
    r = runner.invoke(app, ["submit", "--address", addr, "--working-dir", REPO, "--", "csp", "prune", sweep_dir,
                            "--task", "var_swap", "--task", "if_equals", "--out", res, "--target", "0.15"])
    job2 = r.stdout.strip().splitlines()[-1]
    assert _wait(addr, job2) == "SUCCEEDED", jobs_api.logs(addr, job2)[-2000:]
    assert "2 pairs: 2 pruned" in jobs_api.logs(addr, job2)
    assert len(pd.read_parquet(f"{res}/circuits", storage_options=storage.storage_options(res))) == 2
    r = runner.invoke(app, ["submit", "--address", addr, "--working-dir", REPO, "--", "csp", "sweep", "--data", s3_data,
                            "--out", f"{base}/long", "--grid", "pfrac=0.5,0.25", "--steps", "100000", "--batch", "8"])
    job3 = r.stdout.strip().splitlines()[-1]
    deadline = time.time() + 120
    while jobs_api.job_status(addr, job3) != "RUNNING":
        assert time.time() < deadline, jobs_api.job_status(addr, job3)
        time.sleep(1)
    r = runner.invoke(app, ["jobs", "stop", job3, "--address", addr])
    assert r.exit_code == 0 and "stopped" in r.stdout
    assert _wait(addr, job3, timeout=120) == "STOPPED"
    r = runner.invoke(app, ["jobs", "list", "--address", addr])
    assert all(j in r.stdout for j in (job, job2, job3)) and "SUCCEEDED" in r.stdout and "STOPPED" in r.stdout


def test_jobs_commands_fail_clearly(head):
    r = runner.invoke(app, ["jobs", "status", "no-such-job", "--address", head["dashboard"]])
    assert r.exit_code == 2 and "no job 'no-such-job'" in r.stderr
    r = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--", "csp", "--help"])
    assert r.exit_code == 1 and "cannot reach Ray" in r.stderr  # the world failed a well-formed command


def test_a_command_given_address_runs_on_that_cluster(head, tmp_path):
    """`--address HOST:PORT` joins the running cluster, in a fresh process, as a user's
    shell would; a local path is accepted on the multinode cluster with --shared-fs (here
    every node is on this machine, so the path is shared)."""
    import json
    import subprocess
    import sys
    import sysconfig

    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(sysconfig.get_paths()["stdlib"], "json"), corpus)
    out = tmp_path / "data"
    csp = os.path.join(os.path.dirname(sys.executable), "csp")
    p = subprocess.run([csp, "data", "prepare", "--corpus", str(corpus), "--out", str(out), "--n-ctx", "64",
                        "--address", head["address"], "--shared-fs"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest and any(out.glob("train/*.parquet"))
    from ray.util.state import list_jobs

    drivers = [j for j in list_jobs(address=head["dashboard"]) if j.type == "DRIVER"]
    assert any("data prepare" in (j.entrypoint or "") for j in drivers), [j.entrypoint for j in drivers]
