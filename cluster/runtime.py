"""Connecting to Ray: an existing cluster by address, or an in-process one with explicit
resources and quiet, CI-friendly defaults (no dashboard, no usage stats)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from sparsity.errors import USAGE, CspError, CspRuntimeError

T = TypeVar("T")


class RayConnectError(CspRuntimeError):
    pass


def tune_fit(fit: Callable[[Any], T]) -> T:
    """``fit(stopper)``: a Ray Tune run (the sweep, the pruning search) that Ctrl-C stops like
    the rest of a command. ``fit`` builds its ``Tuner`` with ``RunConfig(stop=stopper)``.

    The first Ctrl-C asks Tune to end the run (the stopper's ``stop_all``: Tune stops the
    trials and cleans up), then raises KeyboardInterrupt once ``fit`` returns; a second one
    raises it at once. What finished is kept: a re-run skips finished trials and trains the
    others on from their last checkpoint.

    Left to itself, Tune catches the first Ctrl-C, ends the trials and returns their results
    as if the run were over, so the caller went on (the demo pruned and reported on whichever
    models had finished) and exited 0; it also left its handler installed after the run. Here
    Tune's handler is off (``TUNE_DISABLE_SIGINT_HANDLER``), SIGINT's and SIGUSR1's handlers are
    put back, and a SIGINT that was ignored stays ignored."""
    from ray import tune

    class CtrlC(tune.Stopper):
        requested = False

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.requested

    stopper = CtrlC()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return fit(stopper)
    previous = signal.getsignal(signal.SIGINT)
    usr1 = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None  # Tune takes it too, for good

    def on_sigint(signum, frame):
        if stopper.requested:
            raise KeyboardInterrupt
        stopper.requested = True
        _stderr("stopping: Tune is ending the running trials (Ctrl-C again to stop at once)")

    env = os.environ.get(_TUNE_SIGINT)
    os.environ[_TUNE_SIGINT] = "1"
    if callable(previous):  # Python's handler (or a caller's); an ignored SIGINT stays ignored
        signal.signal(signal.SIGINT, on_sigint)
    try:
        result = fit(stopper)
    finally:
        if env is None:
            os.environ.pop(_TUNE_SIGINT, None)
        else:
            os.environ[_TUNE_SIGINT] = env
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)
        if usr1 is not None:
            signal.signal(signal.SIGUSR1, usr1)
    if stopper.requested:
        raise KeyboardInterrupt
    return result


_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


def train_fit(fit: Callable[[], T]) -> T:
    """``fit()``, a Ray Train ``TorchTrainer.fit``, that Ctrl-C stops with KeyboardInterrupt.

    Ray Train installs its own SIGINT handler for the run: it aborts the run's controller and
    then exits the process from inside ``fit`` (SystemExit, status 1 in practice) with nothing
    said, and it stays installed after the run. Here that exit becomes KeyboardInterrupt (the
    CLI's one line and exit 130; the run's checkpoints are kept, so the same command resumes)
    and the previous handler is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return fit()
    except SystemExit as e:  # only Ray Train's SIGINT handler exits from inside fit
        raise KeyboardInterrupt from e
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def quiet_env() -> None:
    # Usage stats would try the network; token auth turns on by itself once a token file
    # exists, and head and clients must agree — so pin both unless the user chose.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


class SharedStorageError(CspError):
    pass


def init(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = True,
         storage: dict[str, str | None] | None = None, shared_fs: bool = False, state_api: bool = False) -> None:
    """Start or join Ray once per process; a second call only re-checks ``storage``.

    ``storage`` names the URIs the command's nodes read or write (``{"--out": uri, …}``):
    on a cluster of more than one node each must be on S3, or ``shared_fs`` must say the
    local paths are a filesystem every node mounts (see ``check_shared_storage``).
    ``state_api`` gives an in-process Ray its dashboard (on a free 127.0.0.1 port): Ray
    Train's placement-group cleaner watches its controller through the State API, and
    without it warns every few seconds and cannot clean up; ~2 s more start-up.

    ``address`` None starts an in-process Ray with ``num_cpus`` logical CPUs (default: the
    machine's cores). Export AWS_ENDPOINT_URL before calling: workers inherit the
    environment of the raylet started here. ``log_to_driver=False`` keeps workers' output
    (Ray Train's per-report lines, raylet warnings) off this console; errors still surface
    through the exceptions they raise.
    """
    import ray

    if ray.is_initialized():
        check_shared_storage(storage or {}, shared_fs)
        return
    quiet_env()
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True, "log_to_driver": log_to_driver}
    if address:
        kwargs["runtime_env"] = worker_runtime_env()
    elif os.environ.get("RAY_ADDRESS"):  # inside a Ray job: join its cluster, keep the job's runtime env
        address = os.environ["RAY_ADDRESS"]
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())[:200]
            raise RayConnectError(f"cannot connect to Ray at {address!r} ({msg}); start one with `csp cluster up` or drop --address") from None
        try:
            check_shared_storage(storage or {}, shared_fs)
        except SharedStorageError:
            ray.shutdown()
            raise
        return
    if state_api:
        from cluster.s3server import free_port

        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=free_port())
    ray.init(
        address="local",  # a new in-process Ray even when `csp cluster up` runs one on this machine
        num_cpus=num_cpus or os.cpu_count() or 1,
        num_gpus=num_gpus,
        include_dashboard=state_api,
        **kwargs,
    )


def alive_nodes() -> list[dict]:
    """The connected cluster's live nodes (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_storage(storage: dict[str, str | None], shared_fs: bool = False) -> None:
    """Refuse a local path on a cluster of several nodes: each node would read or write
    its own disk (a checkpoint written on one node is missing on the next). S3 is shared;
    so is a path every node mounts, which ``shared_fs`` (``--shared-fs``, or
    CSP_SHARED_FS=1 in the environment) vouches for."""
    from cluster import storage as storage_lib

    if shared_fs or os.environ.get("CSP_SHARED_FS", "").lower() in ("1", "true", "yes"):
        return
    local = [(flag, uri) for flag, uri in storage.items() if uri is not None and not storage_lib.resolve(uri).is_s3]
    if not local:
        return
    n = len(alive_nodes())
    if n > 1:
        flag, uri = local[0]
        raise SharedStorageError(f"{flag} {uri} is a local path but the Ray cluster has {n} nodes, which do not share this "
                                 "machine's disk; use s3://BUCKET/PREFIX (every node reads and writes it), or --shared-fs "
                                 "if the path is on a filesystem every node mounts")


def worker_runtime_env() -> dict:
    """What workers on a cluster need from this environment: where S3 is and the Ray
    settings — never credentials (give the nodes their own, e.g. an IAM role)."""
    keep = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "RAY_AUTH_MODE", "CSP_SHARED_FS")
    return {"env_vars": {k: os.environ[k] for k in keep if os.environ.get(k)}}


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Ray retries an unreachable GCS for minutes; a plain TCP connect fails in seconds."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    target = address if "://" in address else f"ray://{address}"
    parsed = urlparse(target)
    try:
        port = parsed.port
    except ValueError:  # a port that is not a number
        port = None
    if not parsed.hostname or not port:
        raise RayConnectError(f"bad Ray address {address!r}: write HOST:PORT (e.g. 127.0.0.1:6379) or ray://HOST:10001", exit_code=USAGE)
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as e:
        raise RayConnectError(f"cannot reach Ray at {address!r} ({e.strerror or e}); start one with `csp cluster up` or pass the address of a running one") from None


def cluster_cpus() -> float:
    """Logical CPUs the connected cluster declares."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    """GPUs the connected cluster declares."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def bounded_map(submit: Callable[[T], Any], items: Iterable[T], limit: int) -> Iterator[tuple[T, Any]]:
    """Submit ``items`` (``submit(item)`` returns an ObjectRef) with at most ``limit``
    pending at once, in the given order; yield ``(item, ref)`` as each finishes, in
    completion order. ``ray.get(ref)`` is the caller's: it decides what a failure means.
    Back-pressure keeps the object store and the scheduler's queue small however many
    items there are."""
    import ray

    pending, inflight = iter(items), {}
    limit = max(1, int(limit))
    while True:
        for item in pending:
            inflight[submit(item)] = item
            if len(inflight) >= limit:
                break
        if not inflight:
            return
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            yield inflight.pop(ref), ref
