"""A local Ray head (`csp cluster up/down/status`) and the Ray Jobs API (`csp submit`,
`csp jobs list/status/logs/stop`).

Submitted jobs upload the working directory (minus .venv, .git and run outputs) and run
their command there; a leading ``csp`` becomes ``python -m cli.main`` so the command works
on any node that has the dependencies, whatever its PATH.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from cluster import runtime
from sparsity.errors import CspError

EXCLUDES = [".venv", ".venv/**", ".git", ".git/**", "csp-runs", "csp-runs/**", "csp-s3", "csp-s3/**", "**/__pycache__", "*.egg-info"]


class ClusterError(CspError):
    pass


def _ray_cli() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else "ray"


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def up(port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None, temp_dir: str | None = None) -> dict:
    """Start a Ray head on 127.0.0.1 with the dashboard (the Jobs API) on ``dashboard_port``."""
    args = [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
            f"--num-cpus={num_cpus or max(2, (os.cpu_count() or 1) + 1)}"]
    if temp_dir:
        args.append(f"--temp-dir={temp_dir}")
    # Every other port free too: a second Ray on the machine (a test session's, a user's
    # notebook) already holds the defaults, and the job agent would not start.
    from cluster.s3server import free_port

    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                 "ray-client-server-port", "node-manager-port", "object-manager-port"):
        args.append(f"--{flag}={free_port()}")
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        last = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"ray start failed ({last[0][:200]}); is a head already running? try `csp cluster down`")
    return {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}"}


def down(temp_dir: str | None = None) -> None:
    """Stop Ray on this machine (``ray stop``: every Ray of this user), or with ``temp_dir``
    only the head started with that --temp-dir."""
    if temp_dir:
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True, timeout=30)
        return
    subprocess.run([_ray_cli(), "stop", "--force"], env=_env(), capture_output=True, text=True, timeout=120)


def status(address: str) -> str:
    runtime._check_reachable(address)
    p = subprocess.run([_ray_cli(), "status", f"--address={address}"], env=_env(), capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ClusterError(f"ray status failed for {address}: {(p.stderr or p.stdout).strip()[:200]}")
    return p.stdout


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    runtime._check_reachable(address.replace("http://", "").replace("https://", ""))
    runtime._quiet_env()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection and version errors come in several types
        raise ClusterError(f"cannot use the Jobs API at {address} ({type(e).__name__}); is the dashboard up (`csp cluster up`)?") from None


def entrypoint(command: list[str]) -> str:
    if not command:
        raise ClusterError("nothing to submit: give the command after --, e.g. csp submit -- csp sweep …")
    if command[0] == "csp":
        command = ["python", "-m", "cli.main", *command[1:]]
    return shlex.join(command)


def submit(address: str, command: list[str], working_dir: str = ".") -> str:
    client = _client(address)
    env = runtime.worker_runtime_env()
    runtime_env = {"working_dir": os.path.abspath(working_dir), "excludes": EXCLUDES, **env}
    import time

    deadline = time.monotonic() + 90
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env)
        except RuntimeError as e:
            # A head that just started has no job agent for a few seconds: wait for it.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ClusterError(f"submitting to {address} failed: {' '.join(str(e).split())[:200]}") from None


def list_jobs(address: str) -> list[dict]:
    return [{"job_id": j.submission_id, "status": str(j.status), "entrypoint": j.entrypoint} for j in _client(address).list_jobs()]


def job_status(address: str, job_id: str) -> str:
    try:
        return str(_client(address).get_job_status(job_id))
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})") from None


def logs(address: str, job_id: str) -> str:
    try:
        return _client(address).get_job_logs(job_id)
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})") from None


def stop(address: str, job_id: str) -> bool:
    try:
        return bool(_client(address).stop_job(job_id))
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})") from None
