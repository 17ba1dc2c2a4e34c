"""csp cluster / csp submit / csp jobs: a local Ray head and the Ray Jobs API."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cli._app import group
from cluster import jobs_api

cluster_app = group("Start, stop and inspect a local Ray head (ray start --head on 127.0.0.1).")
jobs_app = group("Ray jobs on a cluster: list, status, logs, stop.")


@cluster_app.command()
def up(
    port: Annotated[int, typer.Option(help="GCS port.")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="Dashboard / Jobs API port.")] = 8265,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs to declare (default: cores + 1, for a Train controller).")] = None,
) -> None:
    """Start a Ray head on 127.0.0.1."""
    info = jobs_api.up(port, dashboard_port, num_cpus)
    typer.echo(f"Ray head at {info['address']}; Jobs API at {info['dashboard']}")
    typer.echo(f"  csp submit --address {info['dashboard']} -- csp sweep …")


@cluster_app.command()
def down() -> None:
    """Stop the local Ray head (ray stop)."""
    jobs_api.down()
    typer.echo("Ray stopped")


@cluster_app.command()
def status(address: Annotated[str, typer.Option(help="GCS address HOST:PORT.")] = "127.0.0.1:6379") -> None:
    """Nodes and resources of a cluster."""
    typer.echo(jobs_api.status(address))


def submit(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --: e.g. -- csp sweep --data … --out s3://…")],
    address: Annotated[str, typer.Option(help="Jobs API address, http://HOST:8265.")] = "http://127.0.0.1:8265",
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
def list_(address: Annotated[str, typer.Option(help="Jobs API address.")] = "http://127.0.0.1:8265") -> None:
    """Every job on the cluster."""
    for j in jobs_api.list_jobs(address):
        typer.echo(f"{j['job_id']}  {j['status']:<10} {j['entrypoint']}")


@jobs_app.command("status")
def status_(job_id: str, address: Annotated[str, typer.Option(help="Jobs API address.")] = "http://127.0.0.1:8265") -> None:
    """A job's status."""
    typer.echo(jobs_api.job_status(address, job_id))


@jobs_app.command()
def logs(job_id: str, address: Annotated[str, typer.Option(help="Jobs API address.")] = "http://127.0.0.1:8265") -> None:
    """A job's output so far."""
    typer.echo(jobs_api.logs(address, job_id), nl=False)


@jobs_app.command()
def stop(job_id: str, address: Annotated[str, typer.Option(help="Jobs API address.")] = "http://127.0.0.1:8265") -> None:
    """Stop a job."""
    typer.echo("stopped" if jobs_api.stop(address, job_id) else "already finished")
