"""One owner per run directory (and per pair in a results store): a lease file.

    RUN/lease.json   {"owner", "host", "pid", "what", "started_at", "heartbeat_at", "interval_s"}

A writer takes the lease before its first write and renews it every ``interval_s`` from a
daemon thread; it releases it at exit. Every change is a compare-and-swap, so two writers
can never both believe they own it:

- S3: ``PutObject`` with ``If-None-Match: *`` to create and ``If-Match: <etag>`` to renew,
  take over or release (S3 and SeaweedFS refuse a stale write with 412 PreconditionFailed).
- Local or shared filesystem: read-compare-write under ``flock`` on the directory that
  holds the lease (no lock file is left behind).

A second writer is refused with one line naming the owner and the age of its heartbeat.
A lease is *stale* when its heartbeat is older than ``STALE_AFTER`` intervals; a stale
lease is taken over only when asked (``--take-over``), except when its owner ran on this
host and its process is gone (a killed run re-run on the same machine resumes by itself).
The same owner id may re-take its own lease (a retried Tune trial, a retried Ray task).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from cluster import filesystems, storage, storage_errors
from sparsity.errors import CspRuntimeError

LEASE_FILE = "lease.json"
INTERVAL_S = float(os.environ.get("CSP_LEASE_INTERVAL_S", "10"))  # heartbeat period
STALE_AFTER = 6  # heartbeats missed before a lease counts as stale


class LeaseHeld(CspRuntimeError):
    """Someone else owns it (exit 1: the input was fine, the state of the world is not)."""


class LeaseLost(CspRuntimeError):
    """Our lease was taken over while we ran: stop writing."""


def new_owner(prefix: str = "csp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _now() -> float:
    return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# ------------------------------------------------------------------ compare-and-swap backends


class _Backend:
    """read() → (record or None, token); swap(record, token) → bool (False: it changed)."""

    def __init__(self, loc: storage.Location):
        self.loc = loc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield


class _Local(_Backend):
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        d = os.path.dirname(self.loc.path) or "/"
        os.makedirs(d, exist_ok=True)
        fd = os.open(d, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def read(self):
        try:
            with open(self.loc.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None, None
        return _parse(raw), raw

    def swap(self, record: dict | None, token) -> bool:  # called under locked()
        _, now = self.read()
        if now != token:
            return False
        if record is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.loc.path)
        else:
            storage.write_bytes(self.loc, _dump(record))
        return True


class _S3(_Backend):
    def __init__(self, loc: storage.Location):
        super().__init__(loc)
        self.client = filesystems.boto3_client(loc)
        self.key = loc.path.split("/", 1)[1]

    def read(self):
        from botocore.exceptions import ClientError

        with storage_errors.translated(self.loc, "read"):
            try:
                r = self.client.get_object(Bucket=self.loc.bucket, Key=self.key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None, None
                raise
            return _parse(r["Body"].read()), r["ETag"]

    def swap(self, record: dict | None, token) -> bool:
        from botocore.exceptions import ClientError

        with storage_errors.translated(self.loc, "write"):
            try:
                if record is None:
                    _, etag = self.read()  # S3 has no conditional delete everywhere: re-check, then delete
                    if etag != token:
                        return False
                    self.client.delete_object(Bucket=self.loc.bucket, Key=self.key)
                    return True
                cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
                self.client.put_object(Bucket=self.loc.bucket, Key=self.key, Body=_dump(record), **cond)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return False
                raise


def _parse(raw: bytes) -> dict:
    try:
        rec = json.loads(raw)
        return rec if isinstance(rec, dict) and "owner" in rec else {"owner": "?", "heartbeat_at": 0}
    except ValueError:  # unreadable: treat as a lease nobody can renew
        return {"owner": "?", "heartbeat_at": 0}


def _dump(record: dict) -> bytes:
    return json.dumps(record, indent=1).encode()


def _backend(loc: storage.Location) -> _Backend:
    return _S3(loc) if loc.is_s3 else _Local(loc)


# ------------------------------------------------------------------ the lease


def describe(rec: dict, now: float | None = None) -> str:
    """'host pid 123 (csp train, owner csp-ab12…), heartbeat 4 s ago'."""
    age = (now or _now()) - float(rec.get("heartbeat_at") or 0)
    what = f"{rec.get('what')}, " if rec.get("what") else ""
    return (f"{rec.get('host', '?')} pid {rec.get('pid', '?')} ({what}owner {rec.get('owner', '?')}), "
            f"heartbeat {age:.0f} s ago")


def is_stale(rec: dict, now: float | None = None) -> bool:
    interval = float(rec.get("interval_s") or INTERVAL_S)
    return (now or _now()) - float(rec.get("heartbeat_at") or 0) > STALE_AFTER * interval


def owner_dead_here(rec: dict) -> bool:
    """Its owner ran on this host and that process no longer exists."""
    return rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and not _pid_alive(rec["pid"])


class Lease:
    """A held lease; renewing itself from a daemon thread once :meth:`start` is called."""

    def __init__(self, loc: storage.Location, record: dict, backend: _Backend):
        self.loc, self.record, self._b = loc, record, backend
        self.took_over: dict | None = None  # the record we replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why we no longer own it

    @property
    def owner(self) -> str:
        return self.record["owner"]

    def renew(self) -> bool:
        rec = {**self.record, "heartbeat_at": _now(), "pid": os.getpid()}
        with self._b.locked():
            cur, token = self._b.read()
            if cur is None or cur.get("owner") != self.owner:
                self.lost = f"{self.loc.uri} now belongs to {describe(cur) if cur else 'nobody (deleted)'}"
                return False
            if not self._b.swap(rec, token):
                self.lost = f"{self.loc.uri} changed under us"
                return False
            self.record = rec
        return True

    def check(self) -> None:
        """Raise LeaseLost when someone took the lease over: a writer must stop."""
        if self.lost:
            raise LeaseLost(f"lost ownership: {self.lost}; stopping without writing")

    def start(self) -> Lease:
        def beat() -> None:
            interval = float(self.record["interval_s"])
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - a storage hiccup: try again next beat
                    continue

        self._thread = threading.Thread(target=beat, name=f"csp-lease-{self.loc.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception), self._b.locked():
            cur, token = self._b.read()
            if cur is not None and cur.get("owner") == self.owner:
                self._b.swap(None, token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_owner(uri: str | storage.Location, owner: str) -> None:
    """Raise LeaseLost unless ``owner`` holds the lease at ``uri`` (a writer's check before
    it writes, from a process other than the one renewing the lease)."""
    loc = storage.resolve(uri)
    cur, _ = _backend(loc).read()
    if cur is None or cur.get("owner") != owner:
        raise LeaseLost(f"lost ownership of {loc.parent.uri}: it now belongs to {describe(cur) if cur else 'nobody'}; stopping without writing")


def try_acquire(uri: str | storage.Location, owner: str, what: str = "", take_over: bool = False,
                interval: float | None = None) -> tuple[Lease | None, dict | None]:
    """(lease, None) when we own it now, or (None, the owner's record) when someone else
    does. Takes over a stale lease when ``take_over``, or when its owner's process is gone
    from this host."""
    loc = storage.resolve(uri)
    b = _backend(loc)
    rec = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
           "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "heartbeat_at": _now(), "interval_s": float(interval or INTERVAL_S)}
    for _ in range(5):  # a lost race re-reads and decides again
        with b.locked():
            cur, token = b.read()
            replaced = None
            if cur is not None and cur.get("owner") != owner:
                if not ((take_over and is_stale(cur)) or owner_dead_here(cur)):
                    return None, cur
                replaced = cur
            if b.swap(rec, token):
                lease = Lease(loc, rec, b)
                lease.took_over = replaced
                return lease, None
    cur, _ = b.read()
    return None, cur


def acquire(uri: str | storage.Location, owner: str | None = None, what: str = "", take_over: bool = False,
            interval: float | None = None, flag: str = "--out") -> Lease:
    """Own ``uri`` (a lease file) or fail with one line naming who does."""
    loc = storage.resolve(uri)
    lease, cur = try_acquire(loc, owner or new_owner(), what, take_over, interval)
    if lease is not None:
        return lease
    assert cur is not None
    where = loc.parent.uri
    stale = STALE_AFTER * float(cur.get("interval_s") or INTERVAL_S)
    if is_stale(cur):
        hint = f"its heartbeat stopped over {stale:.0f} s ago: if that run is gone, re-run with --take-over"
    elif take_over:
        hint = f"--take-over applies only once its heartbeat is older than {stale:.0f} s; stop that run first"
    else:
        hint = f"wait for it to finish or choose another {flag}"
    raise LeaseHeld(f"{where} is in use by {describe(cur)}; {hint}")
