"""csp s3 serve: a real S3 server (SeaweedFS) on this machine, for S3 semantics without AWS."""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer

from cli._app import group
from cluster import s3server

app = group("Run a local S3 server (SeaweedFS `weed mini`) on 127.0.0.1.")


@app.command()
def serve(
    dir: Annotated[str, typer.Option(help="Where the server keeps its data.")] = "./csp-s3",
    port: Annotated[int, typer.Option(help="S3 port on 127.0.0.1.")] = 8333,
    bucket: Annotated[list[str], typer.Option(help="Bucket to create (repeatable).")] = ["csp"],  # noqa: B006
) -> None:
    """Serve S3 on 127.0.0.1:PORT until Ctrl+C, with the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"--port must be in [1, 65535], got {port}")
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise typer.BadParameter("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first: the server accepts only those credentials")
    from cluster import storage

    for b in bucket:  # a name S3 refuses would leave the server waiting for a bucket it never makes
        if "/" in b or not b:
            raise typer.BadParameter(f"--bucket {b!r} is not a bucket name (3-63 chars: lowercase letters, digits, '.', '-')")
        storage.resolve(f"s3://{b}")
    server = s3server.start(dir, key, secret, buckets=tuple(bucket), port=port)
    typer.echo(f"S3 at {server.endpoint_url}, buckets {', '.join(server.buckets)}, data in {server.data_dir}")
    typer.echo(f"  export AWS_ENDPOINT_URL={server.endpoint_url}   # plus your AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    typer.echo("Ctrl+C stops it.")
    try:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        server.process.wait()
        raise typer.Exit(server.process.returncode or 1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
