"""The Ray Jobs API (`csp submit`, `csp jobs list/status/logs/stop`) and `csp cluster
status`; cluster/local.py starts and stops clusters on this machine.

Submitted jobs upload the working directory (minus .venv, .git and run outputs) and run
their command there; a leading ``csp`` becomes ``python -m cli.main`` so the command works
on any node that has the dependencies, whatever its PATH.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from cluster import runtime
from cluster.local import ray_cli, ray_env
from sparsity.errors import USAGE, CspRuntimeError

EXCLUDES = [".venv", ".venv/**", ".git", ".git/**", "csp-runs", "csp-runs/**", "csp-s3", "csp-s3/**", "**/__pycache__", "*.egg-info"]


class ClusterError(CspRuntimeError):
    pass


def status(address: str) -> str:
    runtime.check_reachable(address)
    p = subprocess.run([ray_cli(), "status", f"--address={address}"], env=ray_env(), capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ClusterError(f"ray status failed for {address}: {(p.stderr or p.stdout).strip()[:200]}")
    return p.stdout


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    runtime.check_reachable(address.replace("http://", "").replace("https://", ""))
    runtime.quiet_env()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection and version errors come in several types
        raise ClusterError(f"cannot use the Jobs API at {address} ({type(e).__name__}); is the dashboard up (`csp cluster up`)?") from None


def entrypoint(command: list[str]) -> str:
    if not command:
        raise ClusterError("nothing to submit: give the command after --, e.g. csp submit -- csp sweep …", exit_code=USAGE)
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
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})", exit_code=USAGE) from None


def logs(address: str, job_id: str) -> str:
    try:
        return _client(address).get_job_logs(job_id)
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})", exit_code=USAGE) from None


def follow(address: str, job_id: str):
    """The job's output as it comes, until the job ends (a generator of text chunks)."""
    import asyncio

    client = _client(address)
    job_status(address, job_id)  # an unknown id fails here, cleanly
    agen = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop(address: str, job_id: str) -> bool:
    try:
        return bool(_client(address).stop_job(job_id))
    except RuntimeError as e:
        raise ClusterError(f"no job {job_id!r} at {address} ({' '.join(str(e).split())[:120]})", exit_code=USAGE) from None
