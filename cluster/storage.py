"""Storage URIs: one place turns a local path, ``file://`` or ``s3://bucket/prefix`` into a
:class:`Location`, and reads/writes through it. The clients behind a location (S3 settings
from the AWS variables; s3fs, pyarrow and boto3 with short timeouts) live in
cluster/filesystems.py, the error family in cluster/storage_errors.py.

Every write is atomic: no reader ever sees a half-written file (temp file + rename
locally; one PUT on S3, where an object appears whole or not at all).

Every failure is a ``StorageError`` whose message is one line naming the URI, what went
wrong and what to check — never a secret — and arrives within ~10 s: connect/read
timeouts are short and retries bounded, so a dead endpoint cannot hang a run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from cluster.filesystems import S3Settings, local_fsspec, s3_fsspec, s3_pyarrow
from cluster.storage_errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CorruptFileError,
    MalformedURIError,
    StorageError,
    corrupt_parquet,
    is_corrupt_parquet,
    translate,
    translated,
)

WRITE_DEADLINE_S = 8.0  # a PUT's deadline of its own (write_bytes): this plus 1 s per MB uploaded

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    """A resolved storage location. ``path`` is the filesystem-internal path: an absolute
    local path, or ``bucket/key`` for S3."""

    scheme: str  # "file" or "s3"
    path: str
    s3: S3Settings | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def __str__(self) -> str:
        return self.uri

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.is_s3 else None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> Location:
        path = self.path.rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                path = f"{path}/{part}"
        return Location(self.scheme, path, self.s3)

    @property
    def parent(self) -> Location:
        return Location(self.scheme, self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.s3)

    @property
    def fs(self):
        """The fsspec filesystem (s3fs for S3, LocalFileSystem otherwise)."""
        return s3_fsspec(self.s3) if self.is_s3 else local_fsspec()

    @property
    def pa_fs(self):
        """The pyarrow filesystem for the same location (``path`` is valid in both)."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        return s3_pyarrow(self.s3)


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def resolve(uri: str | os.PathLike | Location) -> Location:
    """Parse a URI: a local path (relative ones become absolute), ``file://…`` or
    ``s3://bucket[/prefix]``. Raises MalformedURIError for anything else."""
    if isinstance(uri, Location):
        return uri
    raw = os.fspath(uri)
    if not isinstance(raw, str) or not raw.strip():
        raise MalformedURIError("empty storage URI: pass a local path or s3://bucket/prefix")
    if "://" not in raw:
        scheme = _SCHEME_RE.match(raw)
        if scheme and scheme.group(1).lower() in ("s3", "s3a", "file", "gs", "http", "https"):
            # s3:/bucket or s3:bucket is a typo, not a local directory named "s3:"
            fix = "file:///abs/path" if scheme.group(1).lower() == "file" else "s3://bucket/prefix"
            raise MalformedURIError(f"malformed URI {raw!r}: a scheme needs '://' — write {fix}, or ./{raw} for a local path")
        return Location("file", os.path.abspath(os.path.expanduser(raw)))
    parsed = urlparse(raw)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise MalformedURIError(f"malformed URI {raw!r}: file URIs take an absolute path, file:///abs/path")
        return Location("file", os.path.abspath(parsed.path or "/"))
    if scheme in ("s3", "s3a"):
        bucket = parsed.netloc
        if not bucket:
            raise MalformedURIError(f"malformed URI {raw!r}: no bucket; write s3://bucket/prefix")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise MalformedURIError(f"malformed URI {raw!r}: {bucket!r} is not a valid bucket name (3-63 chars: lowercase letters, digits, '.', '-')")
        if parsed.query or parsed.fragment:
            raise MalformedURIError(f"malformed URI {raw!r}: remove the '?…' or '#…' part")
        key = re.sub(r"/+", "/", parsed.path).strip("/")
        return Location("s3", f"{bucket}/{key}" if key else bucket, S3Settings.from_env())
    raise MalformedURIError(f"unsupported URI scheme {scheme!r} in {raw!r}: use a local path, file:// or s3://")


# ---------------------------------------------------------------------------- operations


def write_bytes(uri: str | Location, data: bytes) -> Location:
    """Write ``data`` atomically: readers see the old object or the whole new one."""
    loc = resolve(uri)
    with translated(loc, "write"):
        if loc.is_s3:
            # One PUT (multipart above 5 GiB): atomic on S3. aiobotocore can wait forever for
            # a PUT's response (read_timeout does not cover it), so the call gets a deadline
            # of its own: the usual 8 s plus 1 s per MB uploaded.
            loc.fs.pipe_file(loc.path, data, timeout=WRITE_DEADLINE_S + len(data) / 1e6)
        else:
            os.makedirs(os.path.dirname(loc.path) or "/", exist_ok=True)
            tmp = f"{loc.path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, loc.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return loc


def read_bytes(uri: str | Location) -> bytes:
    loc = resolve(uri)
    with translated(loc, "read"):
        if loc.is_s3:
            return loc.fs.cat_file(loc.path)
        with open(loc.path, "rb") as fh:
            return fh.read()


def write_text(uri: str | Location, text: str) -> Location:
    return write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str | Location) -> str:
    return read_bytes(uri).decode("utf-8")


def write_json(uri: str | Location, obj) -> Location:
    import json

    return write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(uri: str | Location):
    import json

    loc = resolve(uri)
    try:
        return json.loads(read_text(loc))
    except ValueError as e:
        raise CorruptFileError(f"read {loc.uri}: not valid JSON ({e})") from None


def exists(uri: str | Location) -> bool:
    """True when a file/object (or, locally, a directory) is at the location."""
    loc = resolve(uri)
    with translated(loc, "check"):
        if loc.is_s3:
            _check_bucket(loc)
            return bool(loc.fs.exists(loc.path))
        return os.path.exists(loc.path)


def is_file(uri: str | Location) -> bool:
    """True when a file/object is at the location: on S3 one HEAD request (``exists`` also
    lists, to find a "directory", when the object is missing)."""
    loc = resolve(uri)
    with translated(loc, "check"):
        if loc.is_s3:
            bucket, _, key = loc.path.partition("/")
            try:
                loc.fs.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return False
            return True
        return os.path.isfile(loc.path)


def probe(uri: str | Location) -> Location:
    """Check, before any long work starts, that an output location can be reached: for
    S3, that the endpoint answers, the credentials are accepted and the bucket exists (one
    HEAD request, within the usual 10 s); a local path needs nothing. Returns the location."""
    loc = resolve(uri)
    if loc.is_s3:
        _check_bucket(loc)
    return loc


def check_writable(uri: str | Location) -> Location:
    """Check, before any compute starts, that an output directory can be written: for S3,
    :func:`probe` and then a small probe object written under the prefix and deleted
    again; locally, that the path is not a file and its nearest existing ancestor is a
    directory this user may write (nothing is created). Returns the location."""
    loc = probe(uri)
    if loc.is_s3:
        marker = loc.join(f".csp-write-probe-{uuid.uuid4().hex}")
        with translated(loc, "write"):
            loc.fs.pipe_file(marker.path, b"csp write probe", timeout=WRITE_DEADLINE_S)
        with translated(loc, "delete"):
            loc.fs.rm(marker.path)
        return loc
    if os.path.exists(loc.path) and not os.path.isdir(loc.path):
        raise StorageError(f"cannot write to {loc.uri}: it is a file, not a directory; choose a directory for the output")
    ancestor = loc.path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise StorageError(f"cannot write to {loc.uri}: {ancestor} is a file, not a directory; choose another location")
    effective = os.access in os.supports_effective_ids  # the user we run as, under sudo/setuid too
    if not os.access(ancestor, os.W_OK | os.X_OK, effective_ids=effective):
        where = "" if ancestor == loc.path else f" ({ancestor}, its nearest existing directory)"
        raise AccessDeniedError(f"cannot write to {loc.uri}: permission denied{where}; choose another location or fix its permissions")
    return loc


def _check_bucket(loc: Location) -> None:
    """s3fs answers False for a missing bucket; surface it as BucketNotFoundError."""
    try:
        loc.fs.call_s3("head_bucket", Bucket=loc.bucket)
    except FileNotFoundError:  # HEAD has no body, so a missing bucket is a bare 404
        s3 = loc.s3
        assert s3 is not None
        raise BucketNotFoundError(f"check {loc.uri}: bucket {loc.bucket!r} does not exist at {s3.endpoint_label}; create it or fix the URI") from None
    except Exception as exc:
        raise translate(loc, "check", exc) from None


def ls(uri: str | Location, suffix: str = "", recursive: bool = True) -> list[str]:
    """URIs of the files under a prefix (recursive by default), sorted; [] if none."""
    loc = resolve(uri)
    if recursive:
        return sorted(sizes(loc, suffix))
    with translated(loc, "list"):
        if loc.is_s3:
            _check_bucket(loc)
            fs = loc.fs
            if not fs.exists(loc.path):
                return []
            return sorted(f"s3://{p}" for p in fs.ls(loc.path, detail=False) if fs.isfile(p) and p.endswith(suffix))
        if not os.path.isdir(loc.path):
            return []
        return sorted(os.path.join(loc.path, f) for f in os.listdir(loc.path)
                      if os.path.isfile(os.path.join(loc.path, f)) and f.endswith(suffix))


def sizes(uri: str | Location, suffix: str = "") -> dict[str, int]:
    """``{uri: bytes}`` of every file under a prefix (recursive), in one listing; {} if none."""
    return {u: size for u, (size, _) in versions(uri, suffix).items()}


def versions(uri: str | Location, suffix: str = "") -> dict[str, tuple[int, str]]:
    """``{uri: (bytes, version)}`` of every file under a prefix (recursive), in one listing;
    the version changes whenever the file is written again (mtime in ns locally, the ETag on S3)."""
    loc = resolve(uri)
    with translated(loc, "list"):
        if loc.is_s3:
            _check_bucket(loc)
            fs = loc.fs
            if not fs.exists(loc.path):
                return {}
            return {f"s3://{p}": v for p, v in sorted(_s3_files(fs, loc).items()) if p.endswith(suffix)}
        out = {}
        for dirpath, _dirs, files in os.walk(loc.path):  # nothing when the directory is missing
            for f in files:
                if f.endswith(suffix) and ".tmp-" not in f:
                    with contextlib.suppress(FileNotFoundError):  # removed while we listed
                        st = os.stat(os.path.join(dirpath, f))
                        out[os.path.join(dirpath, f)] = (st.st_size, str(st.st_mtime_ns))
        return out


def _s3_version(info: dict) -> str:
    return str(info.get("ETag") or info.get("LastModified") or "")


def _s3_files(fs, loc: Location) -> dict[str, tuple[int, str]]:
    """``{path: (size, ETag)}`` of the objects under a prefix (a directory entry SeaweedFS
    keeps after a prefix's last object is deleted is no file)."""
    return {p: (int(info.get("size", 0)), _s3_version(info)) for p, info in fs.find(loc.path, detail=True).items()
            if info.get("type") != "directory"}


def remove(uri: str | Location, recursive: bool = False) -> None:
    """Delete a file/object (or a whole prefix with ``recursive``); missing is fine."""
    loc = resolve(uri)
    with translated(loc, "delete"):
        fs = loc.fs
        if fs.exists(loc.path):
            fs.rm(loc.path, recursive=recursive)


def parquet_bytes(table, **kwargs) -> bytes:
    """A pyarrow Table as Parquet file bytes. Pages carry a CRC by default, so a byte
    flipped in a data page fails the read instead of decoding to other values."""
    import pyarrow.parquet as pq

    kwargs.setdefault("write_page_checksum", True)
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def write_parquet(uri: str | Location, table, **kwargs) -> Location:
    """Serialize a pyarrow Table in memory, then write it in one atomic PUT/rename."""
    return write_bytes(uri, parquet_bytes(table, **kwargs))


def read_parquet(uri: str | Location, columns: list[str] | None = None):
    """A pyarrow Table from one Parquet file or a directory of them. A file that is there
    but unreadable (truncated, overwritten, a bad page checksum) raises CorruptFileError
    naming it."""
    import pyarrow.parquet as pq

    loc = resolve(uri)
    try:
        return pq.read_table(loc.path, filesystem=loc.pa_fs, columns=columns, page_checksum_verification=True)
    except Exception as exc:
        err = translate(loc, "read", exc)
        if type(err) is StorageError and is_corrupt_parquet(exc):
            raise corrupt_parquet(_corrupt_member(loc, exc), exc) from None
        raise err from None


def _corrupt_member(loc: Location, exc: BaseException) -> str:
    """The file to blame: named in pyarrow's message, else found by reading the files of a
    directory one by one, else the location itself."""
    m = re.search(r"Parquet input source '([^']+)'", str(exc))
    if m:
        return f"s3://{m.group(1)}" if loc.is_s3 else m.group(1)
    import pyarrow.parquet as pq

    try:
        members = [u for u in ls(loc) if not os.path.basename(u).startswith(("_", "."))]
        for member in members:
            try:
                pq.read_table(resolve(member).path, filesystem=loc.pa_fs, page_checksum_verification=True)
            except Exception:
                return member
    except Exception:  # diagnosing must not hide the original error
        pass
    return loc.uri


def storage_options(uri: str | Location) -> dict:
    """``storage_options`` for ``pandas.read_parquet(uri, storage_options=…)`` (S3 only)."""
    loc = resolve(uri)
    if not loc.is_s3:
        return {}
    s3 = loc.s3
    assert s3 is not None
    opts: dict = {"key": s3.key, "secret": s3.secret}
    if s3.token:
        opts["token"] = s3.token
    if s3.endpoint_url:
        opts["endpoint_url"] = s3.endpoint_url
    if s3.region:
        opts["client_kwargs"] = {"region_name": s3.region}
    return opts
