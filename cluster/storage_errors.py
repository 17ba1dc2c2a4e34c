"""The storage error family, and the one place where whatever s3fs, pyarrow, botocore or the
OS raises becomes one of it.

Every failure of a storage operation (cluster/storage.py) is a ``StorageError`` whose
message is one line naming the URI, what went wrong and what to check — never a secret
(credentials are redacted from the backend's text).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sparsity.errors import RUNTIME, CspError, CspRuntimeError

if TYPE_CHECKING:
    from cluster.storage import Location


class StorageError(CspError):
    """A storage operation failed; the message names the URI and never a secret."""


class MalformedURIError(StorageError):
    pass


class EndpointUnreachableError(StorageError):
    exit_code = RUNTIME


class BucketNotFoundError(StorageError):
    pass


class AccessDeniedError(StorageError):
    exit_code = RUNTIME


class NotFoundError(StorageError):
    pass


class NoCredentialsError(StorageError):
    """S3 needs credentials and none were found (exit 1: the environment, not the command)."""

    exit_code = RUNTIME


class CorruptFileError(StorageError, CspRuntimeError):
    """A file is there but cannot be read back as what it claims to be (exit 1)."""


_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "ACCESS_DENIED", "INVALID_ACCESS_KEY")
# HTTP 403 as a status, not as digits inside a number: an endpoint on port 54403 that refuses
# connections was reported as "access denied"
_STATUS_403 = re.compile(r"(?<![\w.:/-])403(?!\d)")
_NO_CREDENTIALS = ("NoCredentialsError", "Unable to locate credentials", "PartialCredentialsError", "AWS_CREDENTIALS_NOT_FOUND")
_NO_BUCKET = ("NoSuchBucket", "bucket does not exist", "NO_SUCH_BUCKET")
_UNREACHABLE = (
    "Could not connect",
    "Connect timeout",
    "Connection refused",
    "Cannot connect",
    "NETWORK_CONNECTION",
    "Read timeout",
    "timed out",
    "Timeout",
    "connection",
    "Connection",
)


def translate(loc: Location, op: str, exc: BaseException) -> StorageError:
    """Map any exception from s3fs / pyarrow / botocore / the OS onto one StorageError."""
    if isinstance(exc, StorageError):
        return exc
    s3 = loc.s3
    text = " ".join(str(a) for a in getattr(exc, "args", ()) if a) or type(exc).__name__
    detail = type(exc).__name__ + ": " + text
    chain = detail
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 2000:
        chain += " | " + type(cause).__name__ + ": " + str(cause)
        cause = cause.__cause__ or cause.__context__
    if s3 is not None:
        chain = s3.redact(chain)
    where = f"{op} {loc.uri}"
    if loc.is_s3:
        assert s3 is not None
        if any(m in chain for m in _NO_CREDENTIALS):
            return NoCredentialsError(f"{where}: no AWS credentials found; export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                      "(or set AWS_PROFILE / use an instance role) and run it again")
        if any(m in chain for m in _NO_BUCKET):
            return BucketNotFoundError(f"{where}: bucket {loc.bucket!r} does not exist at {s3.endpoint_label}; create it or fix the URI")
        if isinstance(exc, PermissionError) or any(m in chain for m in _DENIED) or _STATUS_403.search(chain):
            return AccessDeniedError(
                f"{where}: access denied by {s3.endpoint_label}; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (key id {s3.key or 'unset'})"
            )
        if isinstance(exc, FileNotFoundError):
            return NotFoundError(f"{where}: no such object")
        if isinstance(exc, ConnectionError | TimeoutError) or any(m in chain for m in _UNREACHABLE):
            return EndpointUnreachableError(f"{where}: cannot reach S3 endpoint {s3.endpoint_label}; is the server up and AWS_ENDPOINT_URL right?")
        return StorageError(f"{where}: {one_line(chain)}")
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{where}: no such file or directory")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{where}: permission denied; check the path's permissions")
    return StorageError(f"{where}: {one_line(chain)}")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its white space folded, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def translated(loc: Location, op: str) -> Iterator[None]:
    """Turn any backend error raised in the block into one StorageError naming ``op`` and
    the location (credentials redacted)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # every backend error becomes one StorageError, once, here
        raise translate(loc, op, exc) from None


# What pyarrow says about a Parquet file whose bytes are wrong (footer, thrift headers,
# compressed pages, checksums, the embedded Arrow schema), as opposed to a missing file,
# a refused credential or an unreachable endpoint (those storage_errors.translate names).
_CORRUPT = (
    "magic bytes", "Parquet file size", "base64", "thrift", "Unexpected end of stream", "decompression failed",
    "flatbuffers", "schema message", "page header", "checksum", "Destination buffer", "know what type",
    "Negative size", "corrupt",
)


def is_corrupt_parquet(exc: BaseException) -> bool:
    """True when a pyarrow error says a Parquet file's bytes are damaged."""
    return any(m in str(exc) for m in _CORRUPT)


def corrupt_parquet(uri: str, exc: BaseException) -> CorruptFileError:
    """The one-line error for an unreadable Parquet file."""
    return CorruptFileError(
        f"{uri} is not a readable Parquet file (corrupt or truncated: {one_line(str(exc), 160)}); "
        "delete it and re-run the command that wrote it"
    )
