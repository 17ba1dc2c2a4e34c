"""Shared real parts for the suite: one SeaweedFS S3 server and one Ray per session.

The S3 server exports its AWS_* variables into this process before Ray starts, so Ray's
workers (which inherit the raylet's environment) reach the same server.
"""

from __future__ import annotations

import os
import secrets
import signal
import uuid

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Never let a developer's real AWS profile leak into the suite.
for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(var, None)

BUCKET = "csp-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on a free 127.0.0.1 port, with a bucket."""
    from cluster import s3server

    server = s3server.start(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key="csp-test-" + secrets.token_hex(4),
        secret_key=secrets.token_hex(20),
        buckets=(BUCKET,),
    )
    os.environ.update(server.env())
    yield server
    server.stop()
    assert server.process.returncode is not None


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3:// prefix in the test bucket, unique to one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One in-process Ray for the whole session (4 logical CPUs on a 2-core machine)."""
    import ray

    from cluster import runtime

    runtime.init(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def multinode(s3_server):
    """A real 3-node Ray cluster on this machine (`csp cluster up --nodes 3`'s code): a
    head with no CPUs and two worker nodes of 2 CPUs, each its own raylet and temp dir. The
    nodes inherit the S3 server's AWS_* variables. Stopped by PID at the end."""
    from cluster import local, s3server

    port, dash = s3server.free_ports(2)
    c = local.up(nodes=3, cpus_per_node=2, port=port, dashboard_port=dash)
    yield c
    local.down(c)
    assert not any(n.alive() for n in c.nodes)


@pytest.fixture
def two_workers(multinode):
    """The multinode cluster with two live worker nodes (a test that killed one gets it back)."""
    while len(multinode.workers()) < 2:
        multinode.add_node(2)
    yield multinode
    while len(multinode.workers()) < 2:
        multinode.add_node(2)


@pytest.fixture(scope="session")
def s3_data(multinode, small_corpus, tokenizer_dir):
    """`csp data prepare` on the multinode cluster, as a user runs it: corpus and tokenizer
    read from S3, shards written to S3 (the only store the nodes share)."""
    import subprocess
    import sys

    from cluster import storage

    prefix = f"s3://{BUCKET}/multinode-{uuid.uuid4().hex[:8]}"
    fs = storage.resolve(prefix).fs
    fs.put(str(small_corpus), f"{prefix[5:]}/corpus", recursive=True)
    fs.put(str(tokenizer_dir), f"{prefix[5:]}/tokenizer", recursive=True)
    csp = os.path.join(os.path.dirname(sys.executable), "csp")
    p = subprocess.run([csp, "data", "prepare", "--corpus", f"{prefix}/corpus", "--tokenizer", f"{prefix}/tokenizer",
                        "--out", f"{prefix}/data", "--n-ctx", "64", "--shard-mb", "0.1", "--address", multinode.address],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return f"{prefix}/data"


@pytest.fixture(scope="session")
def stdlib_files():
    from sparsity import corpus

    return corpus.list_files(None)


@pytest.fixture(scope="session")
def stdlib_tokenizer(stdlib_files):
    """The 2048-token BPE trained on the stdlib's train split (~1.5 s), once per session."""
    from cluster import sources

    tok, _ = sources.build_tokenizer(None)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(stdlib_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    stdlib_tokenizer.save(d)
    return d


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A small real corpus: the stdlib's json and email packages copied into a directory,
    plus one binary and one Latin-1 file that readers must skip."""
    import shutil

    from sparsity.corpus import default_corpus_root

    root = tmp_path_factory.mktemp("corpus")
    for pkg in ("json", "email"):
        shutil.copytree(default_corpus_root() / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "binary.py").write_bytes(b"\x00\x01\x02 not code")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return root


@pytest.fixture(scope="session")
def stdlib_data(ray_session, tokenizer_dir, tmp_path_factory):
    """The stdlib tokenized into n_ctx=64 shards (the tiny test models' context)."""
    from cluster import data

    out = tmp_path_factory.mktemp("stdlib-data")
    data.prepare(None, str(out), tokenizer=str(tokenizer_dir), n_ctx=64)
    return str(out)


@pytest.fixture(scope="session")
def stdlib_rows(stdlib_data):
    from cluster import data

    return data.load_rows(stdlib_data, "train"), data.load_rows(stdlib_data, "val", max_rows=256)


def tiny_config(**over):
    """A d64 × 2-layer, ctx-64 model (~25 ms/step on CPU) with a short annealing schedule."""
    from sparsity.config import ModelConfig, RunConfig, SparsityConfig, TrainConfig

    m = dict(block_size=64, n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256)
    s = dict(pfrac=0.125)
    t = dict(steps=40, batch_size=8, eval_every=0, ckpt_every=0, log_every=10, lr=3e-2)
    for k, v in over.items():
        section, key = k.split("__")
        {"m": m, "s": s, "t": t}[section][key] = v
    return RunConfig(model=ModelConfig(**m), sparsity=SparsityConfig(**s), train=TrainConfig(**t))


@pytest.fixture(scope="session")
def quick_demo(ray_session, tmp_path_factory):
    """`csp demo --quick` once per session: (output dir, its stdout)."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path_factory.mktemp("demo") / "csp-runs"
    before = signal.getsignal(signal.SIGINT)
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    # Tune's Ctrl-C handler must not outlive the sweep (cluster.runtime.tune_fit)
    assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)
    return out, r.stdout


@pytest.fixture(scope="session", autouse=True)
def every_ok_row_is_verified(tmp_path_factory):
    """A property over every circuits row the suite writes (checked at the end of the
    session): status ``ok`` only where the test-pair sufficiency meets the row's target."""
    yield
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.getbasetemp()
    bad, seen = [], 0
    for path in glob.glob(str(base / "**" / "circuits" / "task=*" / "*.parquet"), recursive=True):
        try:
            t = pq.read_table(path)
        except pa.ArrowInvalid:
            continue  # a stray non-Parquet file test_results plants to check the readers refuse it
        if not {"status", "sufficiency_loss", "target"} <= set(t.column_names):
            continue  # a hand-made file of an older schema (test_results), from before this invariant
        for r in t.select(["status", "sufficiency_loss", "target"]).to_pylist():
            seen += 1
            if r["status"] == "ok" and not (r["sufficiency_loss"] is not None and r["sufficiency_loss"] <= r["target"]):
                bad.append((path, r))
    assert not bad, f"{len(bad)} of {seen} stored ok rows miss their target on test pairs: {bad[:3]}"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write in, root included: mode 0o555, and as root also the
    immutable attribute (chattr +i, removed again afterwards), which root cannot bypass."""
    import shutil
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    immutable = False
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode:
            pytest.skip("running as root on a filesystem without chattr +i: no directory is read-only to root")
        immutable = True
    yield ro
    if immutable:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
