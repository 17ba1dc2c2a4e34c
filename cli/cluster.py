"""csp cluster / csp submit / csp jobs: a local Ray head and the Ray Jobs API."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cli._app import Format, emit, group
from cluster import jobs_api

cluster_app = group("Start, stop and inspect a Ray cluster on this machine: a head and N-1 worker nodes, each its own raylet.")
jobs_app = group("Ray jobs on a cluster: list, status, logs, stop.")


@cluster_app.command()
def up(
    nodes: Annotated[int, typer.Option(help="Nodes: a head plus NODES-1 worker nodes (with several, the head declares no CPUs).")] = 1,
    cpus_per_node: Annotated[float | None, typer.Option(help="Logical CPUs each working node declares (default: cores + 1 on one node, max(2, cores) on each of several).")] = None,
    port: Annotated[int, typer.Option(help="GCS port (the address to pass to --address).")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="Dashboard / Jobs API port.")] = 8265,
) -> None:
    """Start a Ray cluster on this machine; every node inherits this shell's environment (export AWS_* first)."""
    from cluster import local

    c = local.up(nodes=nodes, cpus_per_node=cpus_per_node, port=port, dashboard_port=dashboard_port)
    for n in c.nodes:
        typer.echo(f"  {n.name:<6} pid {n.pid:<7} {n.cpus:g} CPUs  node {n.node_id[:12]}  temp {n.temp_dir}")
    typer.echo(f"Ray cluster of {nodes} node{'s' if nodes > 1 else ''} at {c.address}; Jobs API at {c.dashboard}")
    typer.echo(f"  csp sweep --address {c.address} --data s3://… --out s3://…")
    typer.echo(f"  csp submit --address {c.dashboard} -- csp sweep …")
    typer.echo(f"  csp cluster down{'' if port == 6379 else f' --port {port}'}")


@cluster_app.command()
def down(port: Annotated[int, typer.Option(help="GCS port of the cluster `csp cluster up` started.")] = 6379) -> None:
    """Stop the nodes `csp cluster up` started (by PID; no other Ray on this machine is touched)."""
    from cluster import local

    n = local.down(port)
    typer.echo(f"stopped {n} node{'s' if n != 1 else ''} of the cluster on port {port}")


@cluster_app.command()
def status(address: Annotated[str, typer.Option(help="GCS address HOST:PORT.")] = "127.0.0.1:6379") -> None:
    """Nodes and resources of a cluster."""
    typer.echo(jobs_api.status(address))


def submit(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --: e.g. -- csp sweep --data … --out s3://…")],
    address: Annotated[str, typer.Option(help="Jobs API address, http://HOST:8265.", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])] = "http://127.0.0.1:8265",
    working_dir: Annotated[str, typer.Option(help="Directory uploaded with the job (.venv, .git and run outputs excluded).")] = ".",
    wait: Annotated[bool, typer.Option(help="Wait for the job and print its logs.")] = False,
) -> None:
    """Submit a command as a Ray job; prints its id."""
    job_id = jobs_api.submit(address, command, working_dir)
    typer.echo(job_id)
    if wait:
        while (st := jobs_api.job_status(address, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(2)
        typer.echo(jobs_api.logs(address, job_id))
        if st != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("list")
def list_(
    address: Annotated[str, typer.Option(help="Jobs API address.", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])] = "http://127.0.0.1:8265",
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = "table",
) -> None:
    """Every job on the cluster."""
    jobs = jobs_api.list_jobs(address)
    emit(jobs, fmt, table="\n".join(f"{j['job_id']}  {j['status']:<10} {j['entrypoint']}" for j in jobs) or "(no jobs)")


@jobs_app.command("status")
def status_(job_id: str, address: Annotated[str, typer.Option(help="Jobs API address.", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])] = "http://127.0.0.1:8265") -> None:
    """A job's status."""
    typer.echo(jobs_api.job_status(address, job_id))


@jobs_app.command()
def logs(
    job_id: str,
    address: Annotated[str, typer.Option(help="Jobs API address.", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])] = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream the output until the job ends; exit 1 unless it succeeded.")] = False,
) -> None:
    """A job's output so far (or, with --follow, as it comes)."""
    if not follow:
        typer.echo(jobs_api.logs(address, job_id), nl=False)
        return
    for chunk in jobs_api.follow(address, job_id):
        typer.echo(chunk, nl=False)
    st = jobs_api.job_status(address, job_id)
    typer.echo(f"job {job_id}: {st}", err=True)
    if st != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command()
def stop(job_id: str, address: Annotated[str, typer.Option(help="Jobs API address.", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])] = "http://127.0.0.1:8265") -> None:
    """Stop a job."""
    typer.echo("stopped" if jobs_api.stop(address, job_id) else "already finished")
