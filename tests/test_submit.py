import os
import shutil
import time
import uuid

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from cluster import jobs_api, s3server

runner = CliRunner()


@pytest.fixture(scope="module")
def head():
    """A real Ray head (`ray start --head`) on 127.0.0.1 with its own ports and temp dir."""
    tmp = f"/tmp/csp-ray-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit 107 chars
    info = jobs_api.up(port=s3server.free_port(), dashboard_port=s3server.free_port(), num_cpus=4, temp_dir=tmp)
    yield info
    jobs_api.down(temp_dir=tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _wait(address, job_id, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = jobs_api.job_status(address, job_id)
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {st} after {timeout}s")


@pytest.mark.slow
def test_submit_runs_a_sweep_and_a_fanout_and_logs_show_their_output(head, stdlib_data, tmp_path):
    """`csp submit` against a head on 127.0.0.1: a small sweep job then a prune fan-out job
    finish, and `csp jobs logs` shows what they printed."""
    addr = head["dashboard"]
    sweep_dir, res = str(tmp_path / "sweep"), str(tmp_path / "res")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = runner.invoke(app, ["submit", "--address", addr, "--working-dir", repo, "--", "csp", "sweep", "--data", stdlib_data,
                            "--out", sweep_dir, "--grid", "pfrac=0.5", "--steps", "4", "--batch", "8", "--n-layer", "1",
                            "--d-model", "32", "--n-head", "2"])
    assert r.exit_code == 0, r.output
    job = r.stdout.strip().splitlines()[-1]
    assert _wait(addr, job) == "SUCCEEDED", jobs_api.logs(addr, job)[-2000:]
    r = runner.invoke(app, ["jobs", "logs", job, "--address", addr])
    assert "pfrac=0.5 " in r.stdout and "wall_seconds" in r.stdout  # the summary table the job printed
    r = runner.invoke(app, ["submit", "--address", addr, "--working-dir", repo, "--", "csp", "prune", sweep_dir,
                            "--task", "var_swap", "--task", "if_equals", "--out", res])
    job2 = r.stdout.strip().splitlines()[-1]
    assert _wait(addr, job2) == "SUCCEEDED", jobs_api.logs(addr, job2)[-2000:]
    assert "2 pairs: 2 pruned" in jobs_api.logs(addr, job2)
    assert len(pd.read_parquet(f"{res}/circuits")) == 2
    r = runner.invoke(app, ["jobs", "list", "--address", addr])
    assert job in r.stdout and job2 in r.stdout and "SUCCEEDED" in r.stdout


def test_jobs_commands_fail_clearly(head):
    r = runner.invoke(app, ["jobs", "status", "no-such-job", "--address", head["dashboard"]])
    assert r.exit_code == 2 and "no job 'no-such-job'" in r.stderr
    r = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--", "csp", "--help"])
    assert r.exit_code == 2 and "cannot reach Ray" in r.stderr


def test_a_command_given_address_runs_on_that_cluster(head, tmp_path):
    """`--address HOST:PORT` joins the running head (here a separate `ray start --head`),
    in a fresh process, as a user's shell would."""
    import json
    import subprocess
    import sys
    import sysconfig

    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(sysconfig.get_paths()["stdlib"], "json"), corpus)
    out = tmp_path / "data"
    csp = os.path.join(os.path.dirname(sys.executable), "csp")
    p = subprocess.run([csp, "data", "prepare", "--corpus", str(corpus), "--out", str(out), "--n-ctx", "64",
                        "--address", head["address"]], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest and any(out.glob("train/*.parquet"))
    from ray.util.state import list_jobs

    drivers = [j for j in list_jobs(address=head["dashboard"]) if j.type == "DRIVER"]
    assert any("data prepare" in (j.entrypoint or "") for j in drivers), [j.entrypoint for j in drivers]
