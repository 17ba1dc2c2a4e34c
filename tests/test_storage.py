import os
import socket
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import filesystems, storage, storage_errors


def test_local_round_trip_is_atomic_and_leaves_no_temp_files(tmp_path):
    """Local write → read → exists → ls round-trips, overwrites whole, leaves no temp file."""
    uri = str(tmp_path / "a" / "b" / "x.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two, longer")
    assert storage.read_bytes(uri) == b"two, longer"
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))
    assert storage.is_file(uri) and not storage.is_file(str(tmp_path / "nope")) and not storage.is_file(str(tmp_path / "a"))
    assert storage.ls(str(tmp_path)) == [uri]
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["x.bin"]
    assert storage.read_bytes("file://" + uri) == b"two, longer"


def test_failed_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails before its rename leaves the previous content and no temp file."""
    uri = str(tmp_path / "x.json")
    storage.write_json(uri, {"v": 1})

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(storage_errors.StorageError, match="write .*x.json"):
        storage.write_json(uri, {"v": 2})
    assert storage.read_json(uri) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_relative_paths_resolve_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/x").uri == str(tmp_path / "runs" / "x")
    assert storage.resolve("s3://bucket/a//b/").uri == "s3://bucket/a/b"
    assert storage.resolve("s3://bucket/a").join("b", "c.txt").uri == "s3://bucket/a/b/c.txt"


def test_a_colon_that_is_no_scheme_is_a_local_path():
    assert storage.resolve("runs:old").uri.endswith("/runs:old") and not storage.resolve("runs:old").is_s3


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("", "empty"),
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket"),
        ("s3://ab/x", "not a valid bucket"),
        ("gs://bucket/x", "unsupported URI scheme"),
        ("http://host/x", "unsupported URI scheme"),
        ("file://host/x", "file URIs take an absolute path"),
        ("s3:/bad", "a scheme needs '://' — write s3://bucket/prefix"),
        ("s3:bad", "a scheme needs '://'"),
        ("S3:/bucket/x", "a scheme needs '://'"),
        ("file:/abs", "write file:///abs/path"),
    ],
)
def test_malformed_uris_fail_with_one_line(uri, fragment):
    """Malformed URIs raise MalformedURIError with a one-line message saying what to write."""
    with pytest.raises(storage_errors.MalformedURIError, match=fragment) as e:
        storage.resolve(uri)
    assert "\n" not in str(e.value)


def test_s3_round_trip_through_s3fs_pyarrow_and_boto3(s3_prefix):
    """Bytes and Parquet written through storage read back via s3fs, pyarrow and boto3, and vice versa."""
    loc = storage.resolve(s3_prefix)
    storage.write_bytes(loc.join("raw/x.bin"), b"\x00payload")
    assert storage.read_bytes(loc.join("raw/x.bin")) == b"\x00payload"
    assert storage.exists(loc.join("raw/x.bin")) and not storage.exists(loc.join("raw/y.bin"))
    assert storage.is_file(loc.join("raw/x.bin")) and not storage.is_file(loc.join("raw/y.bin")) and not storage.is_file(loc.join("raw"))
    assert storage.ls(loc) == [loc.join("raw/x.bin").uri]

    # pyarrow's own S3 filesystem on the same location
    with loc.pa_fs.open_input_stream(loc.join("raw/x.bin").path) as f:
        assert f.read() == b"\x00payload"
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    storage.write_parquet(loc.join("t/part-0.parquet"), table)
    assert pq.read_table(loc.join("t").path, filesystem=loc.pa_fs).equals(table)
    df = pd.read_parquet(loc.join("t").uri, storage_options=storage.storage_options(loc))
    assert df["a"].tolist() == [1, 2, 3]

    # boto3 sees storage's object, and storage sees boto3's
    client = filesystems.boto3_client(loc)
    bucket, key = loc.join("raw/x.bin").path.split("/", 1)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"\x00payload"
    client.put_object(Bucket=bucket, Key=key.replace("x.bin", "z.bin"), Body=b"from boto3")
    assert storage.read_text(loc.join("raw/z.bin")) == "from boto3"


def _timed(fn):
    t0 = time.monotonic()
    with pytest.raises(storage_errors.StorageError) as e:
        fn()
    return e.value, time.monotonic() - t0


@pytest.fixture
def refused_port():
    """A port that refuses connections: bound (so nothing else can take it) but not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("op", ["read", "write", "exists", "ls", "parquet", "writable"])
def test_unreachable_endpoint_fails_fast_and_clearly(s3_server, monkeypatch, op, refused_port):
    """Nothing listening at AWS_ENDPOINT_URL → EndpointUnreachableError in < 10 s, naming the URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{refused_port}")
    uri = "s3://csp-test/any/x.parquet"
    calls = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "ls": lambda: storage.ls("s3://csp-test/any"),
        "parquet": lambda: storage.read_parquet(uri),
        "writable": lambda: storage.check_writable("s3://csp-test/any"),
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage_errors.EndpointUnreachableError), err
    assert dt < 10 and uri.split("/x")[0] in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("op", ["read", "write", "parquet"])
def test_endpoint_that_never_answers_times_out_within_10s(s3_server, monkeypatch, op):
    """A server that accepts connections but never replies cannot hang a call: error in < 10 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        uri = "s3://csp-test/hang/x"
        calls = {
            "read": lambda: storage.read_bytes(uri),
            "write": lambda: storage.write_bytes(uri, b"x" * 1000),
            "parquet": lambda: storage.read_parquet(uri),
        }
        err, dt = _timed(calls[op])
        assert isinstance(err, storage_errors.EndpointUnreachableError), err
        assert dt < 10
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        listener.close()


@pytest.mark.parametrize("op", ["read", "write", "exists", "ls", "writable"])
def test_missing_bucket_is_named(s3_server, op):
    """A bucket that does not exist → BucketNotFoundError naming the bucket (no auto-create)."""
    uri = "s3://no-such-bucket-csp/x"
    calls = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "ls": lambda: storage.ls(uri),
        "writable": lambda: storage.check_writable(uri),
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage_errors.BucketNotFoundError), err
    assert "no-such-bucket-csp" in str(err) and dt < 10


@pytest.mark.parametrize("op", ["read", "write", "ls", "parquet", "writable"])
def test_refused_credentials_never_show_the_secret(s3_server, monkeypatch, op):
    """Wrong secret → AccessDeniedError naming the key id, never the secret."""
    wrong = "wrong-secret-" + "q" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    uri = "s3://csp-test/denied/x.parquet"
    calls = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"x"),
        "ls": lambda: storage.ls("s3://csp-test/denied"),
        "parquet": lambda: storage.read_parquet(uri),
        "writable": lambda: storage.check_writable("s3://csp-test/denied"),
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage_errors.AccessDeniedError), err
    assert wrong not in str(err) and s3_server.secret_key not in str(err)
    assert s3_server.access_key in str(err) and dt < 10
    assert wrong not in repr(storage.resolve(uri))


def test_no_credentials_is_a_runtime_error_saying_how_to_set_them(s3_server, monkeypatch):
    """No AWS keys anywhere → one line saying which variables to export, exit 1 (the
    environment failed a correct command), from the library and the CLI alike."""
    from typer.testing import CliRunner

    from cli.main import app

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    err, dt = _timed(lambda: storage.read_bytes("s3://csp-test/nocreds/x"))
    assert isinstance(err, storage_errors.NoCredentialsError) and err.exit_code == 1, err
    assert "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(err) and dt < 10
    r = CliRunner().invoke(app, ["results", "circuits", "s3://csp-test/nocreds"])
    assert r.exit_code == 1 and "no AWS credentials found" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_missing_object_and_file_are_not_found(s3_prefix, tmp_path):
    with pytest.raises(storage_errors.NotFoundError, match="no such object"):
        storage.read_bytes(s3_prefix + "/missing")
    with pytest.raises(storage_errors.NotFoundError):
        storage.read_bytes(str(tmp_path / "missing"))


def _damage(path, kind):
    """Break a Parquet file the ways disks and people do: the footer overwritten (pyarrow's
    "Invalid base64 input"), a data page overwritten (caught by the page CRC), truncated."""
    data = open(path, "rb").read()
    n, footer = len(data), int.from_bytes(data[-8:-4], "little")
    at = {"footer": n - 8 - footer // 2, "page": 200, "truncated": None}[kind]
    data = data[: n // 2] if at is None else data[:at] + b"\xff" * 16 + data[at + 16 :]
    open(path, "wb").write(data)


@pytest.mark.parametrize("kind", ["footer", "page", "truncated"])
def test_a_damaged_parquet_file_is_named_as_corrupt(tmp_path, kind):
    """Reading a damaged Parquet file, alone or inside a directory, raises one line that
    names that file and says it is corrupt (exit 1), whatever pyarrow said."""
    table = pa.table({"a": list(range(5000)), "b": [f"row {i}" for i in range(5000)]})
    good, bad = tmp_path / "t" / "part-0.parquet", tmp_path / "t" / "part-1.parquet"
    storage.write_parquet(str(good), table)
    storage.write_parquet(str(bad), table)
    _damage(bad, kind)
    for uri in (str(bad), str(tmp_path / "t")):
        with pytest.raises(storage_errors.CorruptFileError) as e:
            storage.read_parquet(uri)
        msg = str(e.value)
        assert msg.startswith(f"{bad} is not a readable Parquet file (corrupt or truncated") and "\n" not in msg
        assert e.value.exit_code == 1
    assert storage.read_parquet(str(good)).equals(table)


def test_a_damaged_parquet_object_on_s3_is_named_as_corrupt(s3_prefix, tmp_path):
    path = tmp_path / "x.parquet"
    storage.write_parquet(str(path), pa.table({"a": list(range(1000))}))
    _damage(path, "footer")
    uri = f"{s3_prefix}/x.parquet"
    storage.write_bytes(uri, path.read_bytes())
    with pytest.raises(storage_errors.CorruptFileError, match=f"^{uri} is not a readable Parquet file"):
        storage.read_parquet(uri)


def test_check_writable_creates_nothing_and_refuses_files(tmp_path):
    """A new nested directory under a writable one passes without being created; an
    existing file, or a path below one, is refused naming it (exit 2: the path is wrong)."""
    new = tmp_path / "a" / "b" / "out"
    assert storage.check_writable(str(new)).uri == str(new) and not (tmp_path / "a").exists()
    (tmp_path / "f.txt").write_text("x")
    for uri in (tmp_path / "f.txt", tmp_path / "f.txt" / "sub"):
        with pytest.raises(storage_errors.StorageError, match=f"cannot write to {uri}: .*not a directory") as e:
            storage.check_writable(str(uri))
        assert e.value.exit_code == 2


def test_check_writable_refuses_a_read_only_directory(read_only_dir):
    ro = read_only_dir
    with pytest.raises(storage_errors.AccessDeniedError, match=f"cannot write to {ro}/out: permission denied") as e:
        storage.check_writable(str(ro / "out"))
    assert e.value.exit_code == 1


def test_check_writable_on_s3_leaves_no_probe_behind(s3_prefix):
    assert storage.check_writable(s3_prefix).uri == s3_prefix
    assert storage.ls(s3_prefix) == []


def _cli_out_cases(tmp_path, ro):
    """A read-only --out and an --out below a file."""
    (tmp_path / "f.txt").write_text("x")
    return [(str(tmp_path / "f.txt" / "out"), 2, "is a file, not a directory"), (str(ro / "out"), 1, "permission denied")]


@pytest.mark.parametrize("command", [["data", "prepare", "--n-ctx", "64"], ["prune", "/no/such/run"],
                                     ["train", "--data", "/no/such/data"], ["sweep", "--data", "/no/such/data"],
                                     ["demo"]])
def test_an_unwritable_out_fails_before_any_compute(tmp_path, read_only_dir, monkeypatch, command):
    """`data prepare`, `prune`, `train`, `sweep` and `demo` refuse an --out they cannot write
    in one line naming it, before Ray starts or a tokenizer is trained (before they even look
    at their inputs)."""
    from typer.testing import CliRunner

    from cli.main import app
    from cluster import runtime, sources

    started = []
    monkeypatch.setattr(runtime, "init", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(sources, "build_tokenizer", lambda *a, **k: started.append("tokenizer"))
    for out, code, fragment in _cli_out_cases(tmp_path, read_only_dir):
        r = CliRunner().invoke(app, [*command, "--out", out])
        assert r.exit_code == code, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot write to {out}" in lines[0] and fragment in lines[0], r.stderr
    assert started == [] and os.listdir(read_only_dir) == []


def test_a_port_number_with_403_in_it_is_not_an_access_denied(monkeypatch):
    """The error translation reads HTTP 403 as a status, not as digits inside a port: a refused
    connection to port 54403 is 'cannot reach', and a real 403 is still 'access denied'."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:54403")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    loc = storage.resolve("s3://csp-test/any")
    refused = OSError('Could not connect to the endpoint URL: "http://127.0.0.1:54403/csp-test?list-type=2"')
    assert isinstance(storage_errors.translate(loc, "ls", refused), storage_errors.EndpointUnreachableError)
    status = OSError("An error occurred (403) when calling the ListObjectsV2 operation: ")
    assert isinstance(storage_errors.translate(loc, "ls", status), storage_errors.AccessDeniedError)
