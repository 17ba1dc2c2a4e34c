import importlib
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from cluster import s3server, storage

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def _commands(group, prefix=()):
    import typer

    cmd = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, sub in cmd.commands.items():
        yield prefix + (name,)
        if hasattr(sub, "commands"):
            yield from _commands(sub, prefix + (name,))


def test_every_command_has_help():
    """`--help` works on every command and group and shows its docstring."""
    paths = list(_commands(app))
    assert ("data", "prepare") in paths and ("tokenizer", "build") in paths and ("s3", "serve") in paths
    for path in paths:
        r = _run(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert "Usage:" in r.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data", "prepare", "--out", "x", "--bogus"], "No such option: --bogus"),
        (["data", "prepare"], "Missing option '--out'"),
        (["data", "prepare", "--out", "x", "--n-ctx", "abc"], "Invalid value for '--n-ctx'"),
        (["data", "prepare", "--out", "s3://", "--corpus", "."], "no bucket"),
        (["data", "prepare", "--out", "gs://b/x"], "unsupported URI scheme"),
        (["data", "prepare", "--out", "OUT", "--shard-mb", "0"], "--shard-mb must be > 0"),
        (["data", "prepare", "--out", "OUT", "--corpus", "/no/such/dir"], "corpus not found"),
        (["data", "prepare", "--out", "OUT", "--corpus", "EMPTY"], "no .py files"),
        (["data", "prepare", "--out", "OUT", "--corpus", "EMPTY", "--n-ctx", "4"], "--n-ctx 4 out of range"),
        (["data", "prepare", "--out", "OUT", "--n-ctx", "0"], "--n-ctx 0 out of range"),
        (["s3", "serve", "--bucket", "Bad_Name"], "is not a valid bucket name"),
        (["data", "info", "/no/such/dataset"], "no dataset at /no/such/dataset"),
        (["data", "verify", "/no/such/dataset"], "no dataset at /no/such/dataset"),
        (["tokenizer", "build", "--out", "OUT", "--corpus", "/no/such/dir"], "corpus not found"),
        (["tokenizer", "build", "--out", "OUT", "--vocab-size", "100"], "--vocab-size 100 out of range"),
        (["tokenizer", "info", "/no/such/tok"], "no tokenizer at"),
        (["nope"], "No such command 'nope'"),
        (["results", "circuits", "/no/such/results"], "no results at /no/such/results"),
        (["results", "frontier", "EMPTY"], "it has no circuits/ table"),
        (["data", "info", "BADMANIFEST"], "is not a csp dataset manifest (missing corpus, tokenizer, splits)"),
        (["jobs", "list", "--address", "http://127.0.0.1:abc"], "bad Ray address"),
        (["cluster", "down", "--port", "1"], "no csp cluster on port 1"),
        (["cluster", "up", "--nodes", "0"], "--nodes must be ≥ 1"),
        (["data", "prepare", "--out", "OUT", "--val-fraction", "1.5"], "--val-fraction 1.5 out of range"),
        (["data", "prepare", "--out", "OUT", "--workers", "0"], "--workers must be ≥ 1"),
        (["data", "info", "DATA", "--format", "csv"], "Invalid value for '--format'"),
        (["train", "--data", "DATA", "--out", "OUT", "--pfrac", "0"], "--pfrac 0.0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--afrac", "5"], "--afrac 5.0 out of range: must be in (0, 1]; 1 turns AbsTopK off"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "afrac=0"], "--grid point afrac=0.0"),
        (["train", "--data", "DATA", "--out", "OUT", "--steps", "0"], "--steps 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
        (["train", "--data", "DATA", "--out", "OUT", "--optimizer", "sgd"], "Invalid value for '--optimizer': 'sgd' is not one of 'adam', 'muon'"),
        (["train", "--data", "DATA", "--out", "OUT", "--placement", "nowhere"], "Invalid value for '--placement'"),
        (["train", "--data", "DATA", "--out", "OUT", "--workers", "0"], "--workers must be ≥ 1"),
        (["train", "--data", "DATA", "--out", "OUT", "--cpus-per-worker", "0"], "--cpus-per-worker must be ≥ 1"),
        (["train", "--data", "DATA", "--out", "OUT", "--gpus", "--device", "cpu"], "--gpus trains on GPUs and --device cpu on the CPU"),
        (["prune", "/no/such/run", "--out", "s3:/bad"], "malformed URI 's3:/bad': a scheme needs '://'"),
        (["demo", "--out", "s3:bucket/x"], "a scheme needs '://'"),
        (["model", "export", "/no/such/run", "--out", "AFILE"], "it is a file, not a directory"),
        (["viz", "frontier", "EMPTY", "--out", "AFILE"], "it is a file, not a directory"),
        (["train", "--data", "DATA", "--out", "OUT", "--n-ctx", "512"], "exceeds the data's n_ctx=64"),
        (["train", "--data", "/no/such/data", "--out", "OUT"], "no dataset at /no/such/data"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "foo=1"], "unknown grid key 'foo'"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "pfrac=2"], "--grid point pfrac=2.0"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--workers-per-trial", "0"], "--workers-per-trial must be ≥ 1"),
        (["sweep", "status", "/no/such/sweep"], "no sweep summary at /no/such/sweep"),
        (["prune", "/no/such/run", "--out", "OUT"], "no checkpoint at /no/such/run"),
        (["prune", "/no/such/run", "/no/such/other", "--out", "OUT"], "no checkpoint at /no/such/run"),  # fan-out: before Ray
        (["prune", "/no/such/run", "--out", "OUT", "--target", "0"], "--target 0.0 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--steps", "0"], "--steps 0 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--ablation", "median"], "Invalid value for '--ablation'"),
        (["results", "controls", "/no/such/results"], "no results at /no/such/results"),
        (["results", "circuits", "EMPTY", "--format", "xml"], "Invalid value for '--format'"),
        (["viz", "frontier", "/no/such/results"], "no circuits stored under /no/such/results"),
        (["tasks", "show", "nope"], "unknown task 'nope'"),
        (["tasks", "show", "if_equals", "--n", "0"], "--n must be ≥ 1"),
        (["model", "info", "/no/such/run"], "no checkpoint at /no/such/run"),
        (["s3", "serve", "--port", "0"], "--port must be in [1, 65535]"),
        (["demo", "--out", "gs://b/x"], "unsupported URI scheme"),
        (["demo", "--out", "OUT", "--quick", "--preset", "paper"], "--quick and --preset paper ask for different runs"),
        (["demo", "--out", "OUT", "--preset", "full"], "Invalid value for '--preset'"),
        (["submit", "--address", "http://127.0.0.1:abc", "--", "csp", "--help"], "bad Ray address"),
        # a second pass over every command (issue 27): each a mistake a user makes, each one clear line
        (["data", "prepare", "--out", "OUT", "--n-ctx", "0"], "--n-ctx 0 out of range: must be in [8, 65536]"),
        (["data", "prepare", "--out", "OUT", "--tokenizer", "/no/such/tok"], "no tokenizer at /no/such/tok"),
        (["data", "info", ""], "empty storage URI"),
        (["data", "verify", "s3:/x"], "malformed URI 's3:/x'"),
        (["train", "--data", "DATA", "--out", "OUT", "--batch", "0"], "--batch 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--lr", "0"], "--lr 0.0 out of range: must be > 0"),
        (["train", "--data", "DATA", "--out", "OUT", "--lr", "-1"], "--lr -1.0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--ef", "0"], "--ef 0.0 out of range: must be > 0"),
        (["train", "--data", "DATA", "--out", "OUT", "--ef-mlp", "0"], "--ef-mlp 0.0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--n-layer", "0"], "--n-layer 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--d-model", "0"], "--d-model 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--n-head", "0"], "--n-head 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--d-head", "0"], "--d-head 0 out of range"),
        (["train", "--data", "DATA", "--out", "OUT", "--ckpt-every", "-1"], "--ckpt-every -1 out of range: must be an integer ≥ 0"),
        (["train", "--data", "DATA", "--out", "s3:x"], "malformed URI 's3:x'"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", ""], "empty grid"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "pfrac"], "bad grid axis 'pfrac'"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "pfrac=0.5;pfrac=0.25"], "grid key 'pfrac' appears twice"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "seed=a"], "are not all ints"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--steps", "0"], "--steps 0 out of range"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--batch", "0"], "--batch 0 out of range"),
        (["sweep", "--data", "DATA", "--out", "OUT", "--grid", "ef=0"], "--grid point ef=0.0"),
        (["prune", "/no/such/run", "--out", "OUT", "--k-coef", "-1"], "--k-coef -1.0 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--warmup-frac", "2"], "--warmup-frac 2.0 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--stop-window", "-1"], "--stop-window -1 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--stop-open-tol", "1.5"], "--stop-open-tol 1.5 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--grad-clip-rms", "0"], "--grad-clip-rms 0.0 out of range"),
        (["prune", "/no/such/run", "--out", "OUT", "--task", "nope"], "unknown task 'nope'"),
        (["results", "circuits", "EMPTY", "--target", "abc"], "Invalid value for '--target'"),
        (["results", "controls", "/no/such"], "no results at /no/such"),
        (["viz", "circuit", "/no/such", "--model", "x", "--task", "else_elif"], "no circuits stored under /no/such"),
        (["tasks", "eval", "/no/such/run"], "no checkpoint at /no/such/run"),
        (["tasks", "show", "else_elif", "--n", "-1"], "--n must be ≥ 1, got -1"),
        (["model", "info", "s3:/x"], "malformed URI 's3:/x'"),
        (["model", "import", "/no/such/ref", "--out", "OUT"], "missing beeg_config.json"),
        (["cluster", "up", "--nodes", "-1"], "--nodes must be ≥ 1, got -1"),
        (["cluster", "up", "--nodes", "2", "--cpus-per-node", "0"], "--cpus-per-node must be > 0"),
        (["s3", "serve", "--port", "70000"], "--port must be in [1, 65535], got 70000"),
        (["demo", "--preset", "bogus"], "Invalid value for '--preset'"),
        (["jobs", "status", "--address", "http://127.0.0.1:abc", "JOB"], "bad Ray address"),
        (["jobs", "logs", "--address", "http://127.0.0.1:abc", "JOB"], "bad Ray address"),
        (["jobs", "stop", "--address", "http://127.0.0.1:abc", "JOB"], "bad Ray address"),
        (["tokenizer", "build", "--out", "OUT", "--vocab-size", "0"], "--vocab-size 0 out of range"),
        (["tokenizer", "info", "s3:/x"], "malformed URI 's3:/x'"),
        (["sweep", "status", "s3:x"], "malformed URI 's3:x'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, fragment, tmp_path, ray_session, stdlib_data):
    """Bad input → exactly one line on stderr naming the problem, exit 2, no traceback, nothing written."""
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "AFILE").write_text("")
    (tmp_path / "BADMANIFEST").mkdir()
    (tmp_path / "BADMANIFEST" / "manifest.json").write_text('{"n_ctx": 64}')
    args = [a.replace("OUT", str(tmp_path / "out")).replace("EMPTY", str(tmp_path / "EMPTY"))
            .replace("BADMANIFEST", str(tmp_path / "BADMANIFEST")).replace("DATA", stdlib_data)
            .replace("AFILE", str(tmp_path / "AFILE")) for a in args]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.output and "Value error" not in r.output  # no library wording leaks through
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, env, fragment", [
    (["data", "info", "s3://csp-test/x"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:PORT"}, "cannot reach S3 endpoint http://127.0.0.1:PORT"),
    (["jobs", "list", "--address", "http://127.0.0.1:PORT"], {}, "cannot reach Ray"),
    (["data", "prepare", "--out", "s3://csp-test/x"], {"AWS_ENDPOINT_URL": "http://127.0.0.1:PORT"}, "cannot reach S3 endpoint"),  # before Ray
    (["jobs", "list"], {"RAY_ADDRESS": "http://127.0.0.1:PORT"}, "cannot reach Ray at '127.0.0.1:PORT'"),  # honoured, as `ray job` does
])
def test_a_world_that_fails_a_well_formed_command_exits_1(args, env, fragment, tmp_path, s3_server):
    """Exit 1, not 2, when nothing in the command was wrong: scripts can tell a typo from
    a service that is down. Still one line, no traceback, nothing written."""
    port = str(s3server.free_port())  # nothing listens there
    args = [a.replace("PORT", port).replace("OUT", str(tmp_path / "out")) for a in args]
    r = CliRunner().invoke(app, args, env={k: v.replace("PORT", port) for k, v in env.items()})
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment.replace("PORT", port) in lines[0], r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_version_and_short_help():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("csp ") and len(r.stdout.strip().splitlines()) == 1
    r = _run("-h")
    assert r.exit_code == 0 and "Usage:" in r.stdout and "--install-completion" in r.stdout
    r = _run("prune", "-h")
    assert r.exit_code == 0 and "--target" in r.stdout


def test_help_imports_neither_torch_nor_ray():
    """`csp --help` stays fast: the heavy libraries load inside the commands that use them."""
    import subprocess
    import sys

    code = "import sys; from cli.main import app; print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


@pytest.mark.parametrize("args", [["tasks", "list"], ["tasks", "show", "if_ternary", "--n", "1"]])
def test_commands_that_need_no_model_import_neither_torch_nor_ray(args):
    """Listing and showing tasks answer without loading torch or Ray (the task pairs and
    their controls are plain Python; only tokenized batches need torch)."""
    import subprocess
    import sys

    code = ("import sys; from cli.main import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() and p.stderr.strip().splitlines()[-1] == "[]", p.stdout + p.stderr


def test_commands_that_read_stored_results_import_neither_torch_nor_ray(quick_demo):
    """`results circuits|frontier|controls`, `sweep status`, `data info` and `data verify`
    answer from Parquet and JSON: on a real demo store none of them loads torch or Ray."""
    import subprocess
    import sys

    out, _ = quick_demo
    for args in (["results", "circuits", f"{out}/results"], ["results", "frontier", f"{out}/results"],
                 ["results", "controls", f"{out}/results"], ["sweep", "status", f"{out}/sweep"],
                 ["data", "info", f"{out}/data"], ["data", "verify", f"{out}/data"]):
        code = ("import sys; from cli.main import app\n"
                f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
                "print(sorted(m for m in ('torch', 'ray') if m in sys.modules), file=sys.stderr)")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() and p.stderr.strip().splitlines()[-1] == "[]", (args, p.stdout + p.stderr)


def test_every_json_output_is_strict_json_on_a_store_with_missing_values(quick_demo):
    """Every command with --format json, on a real demo store (whose rows have missing
    values: no circuit, no control), prints JSON a strict parser accepts: null, never NaN."""
    import json

    out, _ = quick_demo
    runs = sorted((out / "sweep" / "runs").iterdir())
    for args in (["results", "circuits", f"{out}/results", "--all"], ["results", "frontier", f"{out}/results"],
                 ["results", "controls", f"{out}/results"], ["sweep", "status", f"{out}/sweep"], ["tasks", "list"],
                 ["data", "info", f"{out}/data"], ["data", "verify", f"{out}/data"], ["model", "info", str(runs[0])]):
        r = _run(*args, "--format", "json")
        assert r.exit_code == 0, (args, r.output)
        doc = json.loads(r.stdout, parse_constant=lambda c, where=args: pytest.fail(f"{where}: non-JSON constant {c}"))
        assert doc, args
    r = _run("results", "circuits", f"{out}/results", "--all", "--format", "json")
    assert any(v is None for row in json.loads(r.stdout) for v in row.values())  # the store does have missing values


def test_tokenizer_build_then_info(small_corpus, tmp_path):
    out = tmp_path / "tok"
    r = _run("tokenizer", "build", "--corpus", str(small_corpus), "--out", str(out), "--vocab-size", "600")
    assert r.exit_code == 0, r.output
    assert "2 skipped" in r.stdout
    r = _run("tokenizer", "info", str(out), "--text", "x = 'a'\n")
    assert r.exit_code == 0 and "vocab_size  600" in r.stdout and "tokens:" in r.stdout


@pytest.mark.slow
def test_data_prepare_on_the_stdlib_trains_the_tokenizer_and_writes_shards(ray_session, tmp_path):
    """`csp data prepare` with no corpus goes from the stdlib to a tokenizer and shards in one command."""
    out = tmp_path / "runs" / "data"
    r = _run("data", "prepare", "--out", str(out), "--n-ctx", "128")
    assert r.exit_code == 0, r.output
    assert "trained tokenizer" in r.stdout
    m = storage.read_json(str(out / "manifest.json"))
    assert m["tokenizer"]["vocab_size"] == 2048 and m["corpus"]["files"] > 1000
    assert len(pd.read_parquet(out / "val")) == m["splits"]["val"]["sequences"] > 0
    assert m["splits"]["train"]["tokens"] > 5_000_000
    r = _run("data", "prepare", "--out", str(out), "--n-ctx", "128")
    assert r.exit_code == 0 and "wrote 0 shards" in r.stdout
    r = _run("data", "info", str(out))
    assert r.exit_code == 0 and "train" in r.stdout and f"{m['splits']['train']['sequences']:,}" in r.stdout


def _weed_leftovers() -> set[str]:
    """What a stopped `weed mini` may leave outside its data dir: its gRPC unix sockets (in
    /tmp, whatever TMPDIR says) and its log files (in the temp dir, unless told otherwise)."""
    import glob
    import tempfile

    dirs = {s3server.GRPC_SOCKET_DIR, tempfile.gettempdir()}
    return {p for d in dirs for pat in ("seaweedfs-*-grpc-*.sock", "weed.*") for p in glob.glob(f"{d}/{pat}")}


def test_s3_serve_runs_a_real_server_until_interrupted(tmp_path):
    """`csp s3 serve` starts SeaweedFS on the given port, enforces the keys, and stops on
    SIGINT, leaving nothing behind outside its data dir."""
    port = s3server.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="serve-key", AWS_SECRET_ACCESS_KEY="serve-secret-123")
    before = _weed_leftovers()
    # Ctrl-C reaches the server as at a terminal even where this suite runs as a background
    # job, whose children inherit SIGINT ignored (nohup, `make test &`)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "s3", "serve", "--dir", str(tmp_path / "s3"), "--port", str(port), "--bucket", "demo"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        assert f"S3 at http://127.0.0.1:{port}" in line, line
        import boto3

        ok = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="serve-key", aws_secret_access_key="serve-secret-123", region_name="us-east-1")
        assert [b["Name"] for b in ok.list_buckets()["Buckets"]] == ["demo"]
        bad = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="serve-key", aws_secret_access_key="nope", region_name="us-east-1")
        with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
            bad.list_buckets()
        assert any(p.endswith(".sock") for p in _weed_leftovers() - before)  # its sockets, there while it runs
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # stop it (and its server) rather than leave both running
            proc.terminate()
            proc.wait(30)
            raise
    out = proc.stdout.read()
    assert "serve-secret-123" not in out
    assert _weed_leftovers() <= before  # sockets removed, logs in the data dir
    assert list((tmp_path / "s3").glob("weed.*.log.INFO.*"))
    time.sleep(0.2)
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=1)


def _interrupt(*_, **__):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "args, target, hint",
    [
        (["demo", "--out", "OUT"], "jobs.demo.run", "csp demo keeps what it finished"),
        (["data", "prepare", "--out", "OUT"], "cluster.runtime.init", "csp data prepare keeps what it finished"),
        (["tasks", "show", "if_equals"], "sparsity.tasks.get", None),
    ],
)
def test_ctrl_c_exits_130_with_one_line_saying_what_to_do_next(args, target, hint, monkeypatch, tmp_path):
    """Ctrl-C in a command leaves one line, no traceback, exit 130; a command that resumes says to re-run it."""
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _interrupt)
    r = _run(*(str(tmp_path / "out") if a == "OUT" else a for a in args))
    assert r.exit_code == 130, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("csp: interrupted"), r.stderr
    assert "Traceback" not in r.output
    if hint is None:
        assert "resume" not in lines[0]
    else:
        assert "run the same command again to resume" in lines[0] and hint in lines[0]


def test_s3_serve_without_credentials_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    r = _run("s3", "serve")
    assert r.exit_code == 2 and "set AWS_ACCESS_KEY_ID" in r.stderr


def test_listing_and_info_commands_share_one_format_option(stdlib_data):
    import csv
    import io
    import json

    r = _run("tasks", "list", "--format", "json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 20 and {"task", "probes"} <= set(json.loads(r.stdout)[0])
    r = _run("tasks", "list", "--format", "csv")
    assert r.exit_code == 0 and len(list(csv.DictReader(io.StringIO(r.stdout)))) == 20
    r = _run("data", "info", stdlib_data, "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_ctx"] == 64
    r = _run("data", "info", stdlib_data, "--format", "csv")
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.stderr  # a nested record has no csv form


def test_tables_print_one_marker_for_every_missing_value(quick_demo):
    """A table shows each missing value as `—`, whatever its column's type (a float's NaN, a
    nullable integer's <NA>, an object's None), on a demo store whose rows have them."""
    import re

    out, _ = quick_demo
    for args in (["results", "circuits", f"{out}/results", "--all"], ["results", "controls", f"{out}/results"],
                 ["results", "over-training", f"{out}/over_training"], ["sweep", "status", f"{out}/sweep"]):
        r = _run(*args)
        assert r.exit_code == 0, (args, r.output)
        cells = re.split(r"\s+", r.stdout)
        assert not {"None", "<NA>", "NaN", "nan", "NaT"} & set(cells), (args, r.stdout[:2000])
    assert "—" in _run("results", "circuits", f"{out}/results", "--all").stdout  # the store has missing values to show
