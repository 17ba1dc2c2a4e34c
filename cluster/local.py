"""A real multi-node Ray cluster on one machine (`csp cluster up --nodes N`, the tests).

Each node is one ``ray start --block`` process in its own process group, with its own
raylet, resources and temp dir, on this machine's address: node 0 is the head (GCS,
dashboard = Jobs API), nodes 1… join it. The cluster is described by a state file,
``{RAY_TMPDIR or /tmp}/csp-cluster-{PORT}/cluster.json``, which records every node's PID
and its temp dir (``{RAY_TMPDIR or /tmp}/c{i}``, handed to Ray as a short alias in /tmp when
that path is too long for Ray's sockets);
``down`` stops exactly those process groups (SIGTERM, then SIGKILL after a grace period),
never another Ray of the user. ``kill_node`` kills one node's raylet by PID, as a lost
machine would; ``add_node`` brings a worker node (back) in.

With several nodes the head declares no CPUs (as on a real cluster, where the head only
coordinates) and every worker node declares ``cpus_per_node``; with one node the head
does the work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.s3server import free_ports
from sparsity.errors import USAGE, CspRuntimeError

STATE_FILE = "cluster.json"
AGENT_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


class LocalClusterError(CspRuntimeError):
    pass


def ray_cli() -> str:
    """The `ray` next to this interpreter (the venv's), else the one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else "ray"


def ray_env() -> dict:
    """This environment for Ray's own processes: quiet defaults, this venv first on PATH."""
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def tmp_base() -> Path:
    """RAY_TMPDIR when set, else /tmp: where csp puts a cluster's state and its nodes' temp dirs."""
    return Path(os.environ.get("RAY_TMPDIR") or "/tmp")


def state_root(port: int) -> Path:
    """Where a cluster on GCS ``port`` keeps its state file and node logs."""
    return tmp_base() / f"csp-cluster-{port}"


# Ray puts a node's sockets at TEMP/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid>/sockets/<name>,
# and a Unix socket path holds at most 107 bytes. The head's longest socket is a dashboard
# module's (dash_MetricsHead, 16 characters, in Ray 2.60), a worker's the object store's
# (plasma_store, 12). Each node needs a temp dir of its own (Ray finds "the" cluster of a temp
# dir through a file in it, so two heads must not share one): RAY_TMPDIR/c<i> (else /tmp/c<i>).
# When that is too long for the sockets, Ray is handed a short alias of it instead, a symlink
# /tmp/csp<i> → RAY_TMPDIR/c<i> (Ray binds its sockets at the path it is given, and does not
# resolve links), so the node's files still live under RAY_TMPDIR whatever its length.
SOCKET_PATH_MAX = 107
_SESSION = len("/session_2026-12-06_13-02-20_123456_") + len("/sockets/")
_HEAD_SOCKET, _WORKER_SOCKET = len("dash_MetricsHead"), len("plasma_store")
ALIAS_ROOT = Path("/tmp")


def _pid_digits() -> int:
    try:
        return len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        return 7  # Linux's largest pid_max, 2^22


def socket_room(temp_dir: str, head: bool = True) -> int:
    """Bytes to spare in a node's longest socket path under ``temp_dir`` (negative: too long)."""
    tail = _SESSION + _pid_digits() + (_HEAD_SOCKET if head else _WORKER_SOCKET)
    return SOCKET_PATH_MAX - (len(os.fsencode(temp_dir)) + tail)


def _claim(make, names) -> Path:
    """The first of ``names`` that ``make`` creates (atomically: it fails on an existing one)."""
    for d in names:
        try:
            make(d)
            return d
        except FileExistsError:
            continue
    raise LocalClusterError(f"no free name for a node temp dir ({names[0]} … {names[-1]} all exist); clear them or set another RAY_TMPDIR")


def _node_temp_dir() -> tuple[Path, Path]:
    """A fresh temp dir for one node, RAY_TMPDIR/c0, c1, … (the first free name, taken
    atomically, so clusters sharing RAY_TMPDIR never share a node dir), and the path Ray is
    given for it: the dir itself, or, where that is too long for Ray's sockets, a short
    symlink to it in /tmp."""
    base = tmp_base()
    base.mkdir(parents=True, exist_ok=True)
    real = _claim(Path.mkdir, [base / f"c{i}" for i in range(10_000)])
    if socket_room(str(real), head=True) >= 0:
        return real, real
    try:
        alias = _claim(lambda d: os.symlink(real, d), [ALIAS_ROOT / f"csp{i}" for i in range(10_000)])
    except OSError as e:
        shutil.rmtree(real, ignore_errors=True)
        raise LocalClusterError(f"RAY_TMPDIR={base} is too long for Ray's sockets and no short alias could be made in "
                                f"{ALIAS_ROOT} ({e.strerror or e}); use a RAY_TMPDIR of at most "
                                f"{len(str(real)) + socket_room(str(real))} characters") from None
    return real, alias


def _remove_temp(n: Node) -> None:
    """Remove a node's temp dir (and its alias, when Ray was given one)."""
    for d in (n.real_dir, n.temp_dir):
        if d and Path(d).is_symlink():
            Path(d).unlink(missing_ok=True)
        elif d and Path(d).name.startswith("c"):
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class Node:
    name: str
    pid: int  # the `ray start --block` process; its process group holds the node's processes
    cpus: float
    temp_dir: str  # the path Ray was given: the node's dir, or a short alias of it
    log: str
    head: bool = False
    node_id: str | None = None
    real_dir: str | None = None  # the node's dir under RAY_TMPDIR, where temp_dir is an alias of it

    def alive(self) -> bool:
        return _alive(self.pid)

    def raylet_pid(self) -> int | None:
        """PID of this node's raylet (a child of its ``ray start``)."""
        for pid, cmd in _children(self.pid):
            if cmd and os.path.basename(cmd[0]) == "raylet":
                return pid
        return None


@dataclass
class LocalCluster:
    port: int
    dashboard_port: int
    root: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def save(self) -> None:
        path = Path(self.root) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": self.port, "dashboard_port": self.dashboard_port, "root": self.root,
                                   "nodes": [asdict(n) for n in self.nodes]}, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, port: int) -> LocalCluster:
        path = state_root(port) / STATE_FILE
        if not path.exists():
            raise LocalClusterError(f"no csp cluster on port {port} (no {path}); start one with `csp cluster up`", exit_code=USAGE)
        d = json.loads(path.read_text())
        return cls(port=d["port"], dashboard_port=d["dashboard_port"], root=d["root"], nodes=[Node(**n) for n in d["nodes"]])

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise LocalClusterError(f"node {node_id[:12]} is not one of this cluster's nodes")

    def workers(self, alive: bool = True) -> list[Node]:
        return [n for n in self.nodes if not n.head and (n.alive() or not alive)]

    def add_node(self, cpus: float, timeout: float = 90.0) -> Node:
        """Start one more worker node and wait until it has joined."""
        i = 1 + max((int(n.name[4:]) for n in self.nodes if n.name.startswith("node")), default=0)
        node = _start(self, f"node{i}", head=False, cpus=cpus, timeout=timeout)
        self.nodes.append(node)
        self.save()
        return node

    def kill_node(self, node: Node) -> int:
        """SIGKILL ``node``'s raylet (its ``ray start`` then ends the rest); returns the PID."""
        if node.head:
            raise LocalClusterError("refusing to kill the head: the cluster would go with it")
        pid = node.raylet_pid()
        if pid is None:
            raise LocalClusterError(f"{node.name} has no running raylet")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while node.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        _killpg(node.pid, signal.SIGKILL)
        return pid


def up(nodes: int = 1, cpus_per_node: float | None = None, port: int = 6379, dashboard_port: int = 8265,
       head_cpus: float | None = None, timeout: float = 120.0) -> LocalCluster:
    """Start a head and ``nodes - 1`` worker nodes on this machine; returns the cluster."""
    if nodes < 1:
        raise LocalClusterError(f"--nodes must be ≥ 1, got {nodes}", exit_code=USAGE)
    if cpus_per_node is not None and not cpus_per_node > 0:
        raise LocalClusterError(f"--cpus-per-node must be > 0, got {cpus_per_node:g}: a node without CPUs runs no task", exit_code=USAGE)
    cores = os.cpu_count() or 1
    per_node = cpus_per_node if cpus_per_node is not None else (cores + 1 if nodes == 1 else max(2, cores))
    root = state_root(port)
    if (root / STATE_FILE).exists():
        old = LocalCluster.load(port)
        if any(n.alive() for n in old.nodes):
            raise LocalClusterError(f"a csp cluster already runs on port {port} ({old.address}); `csp cluster down --port {port}` first")
        shutil.rmtree(root, ignore_errors=True)
    _check_free(port, "--port")
    _check_free(dashboard_port, "--dashboard-port")
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(port=port, dashboard_port=dashboard_port, root=str(root))
    try:
        # One node: Ray detects this machine's GPUs; several nodes on one machine would each
        # claim all of them, so the local multi-node cluster is CPU-only.
        head = _start(cluster, "head", head=True, cpus=(per_node if nodes == 1 else 0) if head_cpus is None else head_cpus,
                      timeout=timeout, gpus=None if nodes == 1 else 0)
        cluster.nodes.append(head)
        cluster.save()
        for _ in range(nodes - 1):
            cluster.add_node(per_node, timeout=timeout)
    except BaseException:
        down(cluster)
        raise
    return cluster


def down(cluster: LocalCluster | int, grace: float = 8.0) -> int:
    """Stop every node of ``cluster`` (or of the csp cluster on that GCS port) by PID;
    returns how many were running."""
    if isinstance(cluster, int):
        cluster = LocalCluster.load(cluster)
    running = [n for n in cluster.nodes if n.alive()]
    for n in reversed(cluster.nodes):  # workers first, then the head
        if n.alive():
            _signal(n.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(n.alive() for n in cluster.nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    for n in cluster.nodes:  # whatever is left in each node's process group (dashboard forks, workers)
        _killpg(n.pid, signal.SIGKILL)
    for n in cluster.nodes:  # each node's own temp dir (beside the state dir), and its alias
        _remove_temp(n)
    shutil.rmtree(cluster.root, ignore_errors=True)
    return len(running)


def _start(cluster: LocalCluster, name: str, head: bool, cpus: float, timeout: float, gpus: int | None = 0) -> Node:
    real, temp = _node_temp_dir()
    log = Path(cluster.root) / f"{name}.log"
    args = [ray_cli(), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", f"--num-cpus={cpus:g}"]
    if gpus is not None:
        args.append(f"--num-gpus={gpus}")
    # Every per-node port free and distinct: nodes on one machine would otherwise all want the defaults.
    ports = free_ports(len(AGENT_PORTS) + head, exclude=frozenset((cluster.port, cluster.dashboard_port)))
    if head:
        args += ["--head", f"--port={cluster.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_port}", f"--ray-client-server-port={ports.pop()}"]
    else:
        args += [f"--address={cluster.address}", "--node-ip-address=127.0.0.1"]
    args += [f"--{flag}={p}" for flag, p in zip(AGENT_PORTS, ports, strict=True)]
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=ray_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    node = Node(name=name, pid=proc.pid, cpus=cpus, temp_dir=str(temp), log=str(log), head=head,
                real_dir=str(real) if real != temp else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Ray runtime started" in text:
            node.node_id = _node_id(node)
            if node.node_id:
                return node
        if proc.poll() is not None:
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["no output"]
            _remove_temp(node)
            raise LocalClusterError(f"ray start for {name} failed ({_plain(last[0])[:200]}); see {log}")
        time.sleep(0.3)
    _killpg(proc.pid, signal.SIGKILL)
    _remove_temp(node)
    raise LocalClusterError(f"{name} did not start within {timeout:g}s; see {log}")


def _node_id(node: Node) -> str | None:
    pid = node.raylet_pid()
    if pid is None:
        return None
    for arg in _cmdline(pid):
        if arg.startswith("--node_id="):
            return arg.split("=", 1)[1]
    return None


def _check_free(port: int, flag: str) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise LocalClusterError(f"port {port} is in use (another Ray?); pick another {flag}")


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _children(pid: int) -> list[tuple[int, list[str]]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append((int(d.name), _cmdline(int(d.name))))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
