"""csp on a real 3-node Ray cluster on this machine (head + two worker nodes, each its own
raylet), with S3 (SeaweedFS) as the only store the nodes share.

Every command runs as a user runs it: `csp … --address 127.0.0.1:PORT` in a fresh process.
Nodes are killed by their raylet's PID, as a lost machine would be. The tests share one
dataset and one baseline run (module fixtures), so the module pays for few trainings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from cluster import checkpoints, storage

pytestmark = pytest.mark.slow

CSP = os.path.join(os.path.dirname(sys.executable), "csp")
TRAIN = ["--steps", "120", "--batch", "8", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--d-head", "16",
         "--pfrac", "0.125", "--lr", "0.03", "--ckpt-every", "20", "--eval-every", "0", "--seed", "3"]


def _env(**extra) -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **extra}


def csp(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([CSP, *args], capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _kill_mid_run(cluster, args: list[str], ready, victim, env: dict | None = None) -> None:
    """Run `csp ARGS` as a user would; once ``ready()`` holds, kill the node ``victim()``
    names (by its raylet's PID); the command must still succeed."""
    proc = subprocess.Popen([CSP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(**(env or {})))
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        cluster.kill_node(victim())
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output


def _placements(run: str) -> list[dict]:
    return [storage.read_json(u) for u in storage.ls(f"{run}/placement", suffix=".json")]


def _stored(res: str):
    import pandas as pd

    if not storage.exists(f"{res}/circuits") or not storage.ls(f"{res}/circuits", suffix=".parquet"):
        return pd.DataFrame()
    return pd.read_parquet(f"{res}/circuits", storage_options=storage.storage_options(res))


def _debug(run: str) -> dict[int, dict]:
    """Per rank, the record of its last (re)start: weight hashes and batch ids."""
    recs = [storage.read_json(u) for u in storage.ls(f"{run}/_debug", suffix=".json") if "/rank-" in u]
    return {r["rank"]: r for r in sorted(recs, key=lambda r: r["start"])}


@pytest.fixture(scope="module")
def baseline(two_workers_module, s3_data):
    """An uninterrupted 2-worker run on the cluster (with per-rank weight hashes)."""
    run = f"{s3_data.rsplit('/', 1)[0]}/run-full"
    before = _handed_to_ray()
    p = csp("train", "--data", s3_data, "--out", run, "--workers", "2", "--address", two_workers_module.address, *TRAIN,
            CSP_TRAIN_DEBUG="1")
    assert p.returncode == 0, p.stdout + p.stderr
    _LEFT_BEHIND[run] = _handed_to_ray() - before
    return run


_LEFT_BEHIND: dict[str, set[str]] = {}


def _handed_to_ray() -> set[str]:
    """The local checkpoint directories rank 0 hands ray.train.report at each save (all the
    nodes here share this machine's temp dir)."""
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "*", "csp_checkpoint.json")))


@pytest.fixture(scope="module")
def two_workers_module(multinode):
    while len(multinode.workers()) < 2:
        multinode.add_node(2)
    return multinode


def test_a_local_path_is_refused_on_a_multinode_cluster(multinode, tmp_path):
    out = tmp_path / "data"
    p = csp("data", "prepare", "--out", str(out), "--address", multinode.address, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "local path" in p.stderr and "s3://" in p.stderr and "3 nodes" in p.stderr and "--shared-fs" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_two_workers_train_one_per_node_with_their_token_servers_beside_them(baseline, s3_data):
    placed = _placements(baseline)
    assert sorted(p["rank"] for p in placed) == [0, 1] and all(p["start_step"] == 0 for p in placed)
    assert placed[0]["node_id"] != placed[1]["node_id"]  # one worker per node
    assert all(p["token_server_node_id"] == p["node_id"] for p in placed)  # data served on the worker's own node
    assert all(p["backend"] == "gloo" for p in placed)
    assert all(p["torch_threads"] == int(p["cpus"]) == 1 for p in placed)  # one CPU each: one torch thread each
    ranks = _debug(baseline)
    assert ranks[0]["hashes"] == ranks[1]["hashes"] and len(ranks[0]["hashes"]) == 120  # identical weights every step
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    assert checkpoints.latest_step(baseline) == 120
    assert not _LEFT_BEHIND[baseline]  # Ray uploaded each save's pointer and the local copy went (6 temp dirs a run leaked before)


def test_a_node_killed_mid_training_resumes_on_the_rest_to_the_same_weights(baseline, two_workers, s3_data):
    cluster = two_workers
    run = f"{s3_data.rsplit('/', 1)[0]}/run-killed"
    seen: dict = {}

    def rank1_node():
        seen["step"] = checkpoints.latest_step(run)
        seen["victim"] = cluster.node(next(p for p in _placements(run) if p["rank"] == 1)["node_id"])
        return seen["victim"]

    _kill_mid_run(cluster, ["train", "--data", s3_data, "--out", run, "--workers", "2", "--address", cluster.address, *TRAIN],
                  ready=lambda: (checkpoints.latest_step(run) or 0) >= 20, victim=rank1_node, env={"CSP_TRAIN_DEBUG": "1"})
    killed_at, victim = seen["step"], seen["victim"]
    assert killed_at < 120  # the kill came mid-run
    restarts = [p for p in _placements(run) if p["start_step"] > 0]
    assert restarts and {p["rank"] for p in restarts} == {0, 1}  # the group restarted, both ranks
    assert all(p["node_id"] != victim.node_id for p in restarts)  # on the capacity left
    assert all(p["token_server_node_id"] == p["node_id"] for p in restarts)
    full, resumed = _debug(baseline), _debug(run)
    start = resumed[0]["start"]
    assert start >= 20 and start % 20 == 0
    assert resumed[0]["hashes"][-1] == resumed[1]["hashes"][-1] == full[0]["hashes"][-1]  # same final weights
    for r in (0, 1):
        assert resumed[r]["batches"] == full[r]["batches"][start:]  # no batch skipped or read twice
    assert checkpoints.latest_step(run) == 120


def test_a_fanout_spreads_over_nodes_and_a_killed_node_loses_no_pair(baseline, two_workers, s3_data):
    import pandas as pd

    cluster = two_workers
    res = f"{s3_data.rsplit('/', 1)[0]}/results-{uuid.uuid4().hex[:6]}"
    tasks = ["var_swap", "if_equals", "indent_for", "else_elif", "for_while", "with_as", "var_if", "class_init"]
    args = ["prune", baseline, "--out", res, "--address", cluster.address, "--prune-anyway", "--steps", "40", "--target", "0.15",
            *[x for t in tasks for x in ("--task", t)]]
    seen: dict = {}

    def a_worker_node():
        seen["stored"] = len(_stored(res))
        seen["victim"] = cluster.workers()[-1]  # each node has a pair in flight: the spread keeps both busy
        return seen["victim"]

    # Kill once both nodes have finished a pair.
    _kill_mid_run(cluster, args, ready=lambda: len(set(_stored(res).get("ray_node_id", []))) >= 2, victim=a_worker_node)
    stored_before, victim = seen["stored"], seen["victim"]
    assert stored_before < len(tasks)  # the kill came mid-fan-out
    df = pd.read_parquet(f"{res}/circuits", storage_options=storage.storage_options(res))
    assert sorted(df["task"].astype(str)) == sorted(tasks)  # every pair exactly once
    assert df["ray_node_id"].nunique() >= 2 and df["ray_node_id"].notna().all() and victim.node_id in set(df["ray_node_id"])
    again = csp(*args, timeout=300)
    assert again.returncode == 0 and f"{len(tasks)} already stored" in again.stdout and "0 pruned" in again.stdout, again.stdout
    assert len(pd.read_parquet(f"{res}/circuits", storage_options=storage.storage_options(res))) == len(tasks)


def test_cluster_up_and_down_from_the_cli_touch_only_their_own_nodes(ray_session, s3_server):
    """`csp cluster up --nodes 2` prints the address to pass to --address; a second `up` on
    the port is a clear error; `down` stops exactly its nodes by PID — the suite's own
    in-process Ray (and the session's multinode cluster, if any) lives on."""
    import socket

    from cluster import local, s3server

    port, dash = s3server.free_ports(2)
    p = csp("cluster", "up", "--nodes", "2", "--cpus-per-node", "1", "--port", str(port), "--dashboard-port", str(dash), timeout=120)
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"at 127.0.0.1:{port}" in p.stdout and f"http://127.0.0.1:{dash}" in p.stdout
        c = local.LocalCluster.load(port)
        assert [n.name for n in c.nodes] == ["head", "node1"] and all(n.alive() for n in c.nodes)
        assert len({n.node_id for n in c.nodes}) == 2 and c.nodes[0].cpus == 0 and c.nodes[1].cpus == 1
        again = csp("cluster", "up", "--port", str(port), timeout=60)
        assert again.returncode == 1 and "already runs" in again.stderr and "Traceback" not in again.stderr
        deadline = time.monotonic() + 30
        while True:  # `ray status` reads the autoscaler's view, which catches up within seconds
            st = csp("cluster", "status", "--address", f"127.0.0.1:{port}", timeout=60)
            if st.returncode != 0 or "/1.0 CPU" in st.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert st.returncode == 0 and "/1.0 CPU" in st.stdout, st.stdout  # the head declares none, node1 one
    finally:
        down = csp("cluster", "down", "--port", str(port), timeout=60)
    assert down.returncode == 0 and "stopped 2 nodes" in down.stdout, down.stdout + down.stderr
    assert not any(n.alive() for n in c.nodes)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the GCS is gone
    assert ray_session.cluster_resources().get("CPU") == 4  # the suite's own Ray lives on
    gone = csp("cluster", "down", "--port", str(port), timeout=60)
    assert gone.returncode == 2 and "no csp cluster on port" in gone.stderr


@pytest.mark.slow
def test_cluster_up_and_down_under_a_ray_tmpdir_too_long_for_rays_sockets(ray_session, s3_server, monkeypatch, tmp_path):
    """A RAY_TMPDIR longer than Ray's sockets allow (60 characters; the head's sockets fit
    under about 37 with 5-digit pids) still works: each node's files live in RAY_TMPDIR/c<i>,
    and Ray is handed a short symlink to it in /tmp; `cluster status` runs, and `down` removes
    both the dirs and the links; status and a Ray job run on it."""
    import shutil

    from cluster import local, s3server

    base = f"/tmp/csp-tmpdir-{os.getpid()}-"
    tmpdir = base + "x" * (60 - len(base))
    assert local.socket_room(tmpdir + "/c0", head=True) < 0  # Ray could not bind its sockets there
    monkeypatch.setenv("RAY_TMPDIR", tmpdir)  # for the csp commands below and LocalCluster.load
    port, dash = s3server.free_ports(2)
    try:
        p = csp("cluster", "up", "--nodes", "2", "--cpus-per-node", "1", "--port", str(port), "--dashboard-port", str(dash), timeout=120)
        try:
            assert p.returncode == 0, p.stdout + p.stderr
            c = local.LocalCluster.load(port)
            assert all(n.alive() for n in c.nodes) and len(c.nodes) == 2
            for n in c.nodes:
                assert os.path.dirname(n.real_dir) == tmpdir and os.path.islink(n.temp_dir)
                assert os.path.realpath(n.temp_dir) == n.real_dir and local.socket_room(n.temp_dir, head=True) >= 0
                assert any(name.startswith("session_") for name in os.listdir(n.real_dir))  # Ray's files went under RAY_TMPDIR
            for _ in range(20):  # the autoscaler's view lists the worker's CPU a few seconds after it joined
                st = csp("cluster", "status", "--address", c.address, timeout=60)
                if st.returncode != 0 or "0.0/1.0 CPU" in st.stdout:
                    break
                time.sleep(2)
            assert st.returncode == 0 and "0.0/1.0 CPU" in st.stdout, st.stdout + st.stderr
            job = csp("submit", "--address", c.dashboard, "--working-dir", str(tmp_path), "--wait", "--", "python", "-c", "print(6 * 7)",
                      timeout=120)  # the Jobs API: the head's dashboard and its module sockets
            assert job.returncode == 0 and "42" in job.stdout, job.stdout + job.stderr
        finally:
            down = csp("cluster", "down", "--port", str(port), timeout=60)
        assert down.returncode == 0 and "stopped 2 nodes" in down.stdout, down.stdout + down.stderr
        assert not any(os.path.lexists(n.temp_dir) or os.path.exists(n.real_dir) for n in c.nodes)  # dirs and links went with them
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
