"""The clients behind a storage location (cluster/storage.py): where S3 is and who we are
there, and the fsspec (s3fs), pyarrow and boto3 clients built from that.

S3 settings come from the standard AWS variables, read at call time the way boto3 reads
them: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION. pyarrow ignores AWS_ENDPOINT_URL by
itself, so the endpoint is passed to it explicitly.

Every client gets the same short connect/read timeouts and bounded retries, so a dead
endpoint fails a call within ~10 s instead of hanging a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from cluster.storage import Location

# Connect fast-fails a dead endpoint; read bounds a server that accepts and never answers.
# Two attempts ride out one dropped connection. Worst case ≈ 2 × (3 + 3) s < 10 s.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 3.0
MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are there. ``repr`` never shows the secret or token."""

    endpoint_url: str | None
    region: str | None
    key: str | None
    secret: str | None = field(repr=False)
    token: str | None = field(repr=False, default=None)

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret=env.get("AWS_SECRET_ACCESS_KEY") or None,
            token=env.get("AWS_SESSION_TOKEN") or None,
        )

    @property
    def endpoint_label(self) -> str:
        return self.endpoint_url or "AWS S3 (set AWS_ENDPOINT_URL for another server)"

    def redact(self, text: str) -> str:
        for s in (self.secret, self.token):
            if s:
                text = text.replace(s, "***")
        return text


def local_fsspec():
    """The local fsspec filesystem (parent directories made on write)."""
    import fsspec

    return fsspec.filesystem("file", auto_mkdir=True)


def s3_fsspec(s3: S3Settings):
    """An s3fs filesystem with the short timeouts and bounded retries."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=s3.key,
        secret=s3.secret,
        token=s3.token,
        endpoint_url=s3.endpoint_url,
        client_kwargs={"region_name": s3.region} if s3.region else {},
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            # s3fs retries a timed-out call once more on its own: 2 attempts in all.
            "retries": {"max_attempts": MAX_ATTEMPTS - 1, "mode": "standard"},
        },
        # A listing cached by one call would hide objects written by another process.
        use_listings_cache=False,
    )
    # s3fs wraps botocore (which already retries) in up to two nested retry loops of its
    # own (default 5 each): 5 × 5 × 2 read timeouts would hang a dead endpoint for minutes.
    fs.retries = 1
    return fs


def s3_pyarrow(s3: S3Settings):
    """A pyarrow S3 filesystem with the same endpoint, credentials and timeouts."""
    import pyarrow.fs as pafs

    kwargs = {}
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(
        access_key=s3.key,
        secret_key=s3.secret,
        session_token=s3.token,
        region=s3.region or "us-east-1",
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        **kwargs,
    )


def boto3_client(loc: Location | None = None):
    """A boto3 S3 client with the same settings and timeouts (for tools that want boto3)."""
    import boto3
    from botocore.config import Config

    s3 = loc.s3 if loc is not None and loc.s3 is not None else S3Settings.from_env()
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region or "us-east-1",
        aws_access_key_id=s3.key,
        aws_secret_access_key=s3.secret,
        aws_session_token=s3.token,
        config=Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        ),
    )
