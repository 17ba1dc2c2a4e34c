import os
import socket
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import storage


def test_local_round_trip_is_atomic_and_leaves_no_temp_files(tmp_path):
    """Local write → read → exists → ls round-trips, overwrites whole, leaves no temp file."""
    uri = str(tmp_path / "a" / "b" / "x.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two, longer")
    assert storage.read_bytes(uri) == b"two, longer"
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))
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
    with pytest.raises(storage.StorageError, match="write .*x.json"):
        storage.write_json(uri, {"v": 2})
    assert storage.read_json(uri) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_relative_paths_resolve_to_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/x").uri == str(tmp_path / "runs" / "x")
    assert storage.resolve("s3://bucket/a//b/").uri == "s3://bucket/a/b"
    assert storage.resolve("s3://bucket/a").join("b", "c.txt").uri == "s3://bucket/a/b/c.txt"


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
    ],
)
def test_malformed_uris_fail_with_one_line(uri, fragment):
    """Malformed URIs raise MalformedURIError with a one-line message saying what to write."""
    with pytest.raises(storage.MalformedURIError, match=fragment) as e:
        storage.resolve(uri)
    assert "\n" not in str(e.value)


def test_s3_round_trip_through_s3fs_pyarrow_and_boto3(s3_prefix):
    """Bytes and Parquet written through storage read back via s3fs, pyarrow and boto3, and vice versa."""
    loc = storage.resolve(s3_prefix)
    storage.write_bytes(loc.join("raw/x.bin"), b"\x00payload")
    assert storage.read_bytes(loc.join("raw/x.bin")) == b"\x00payload"
    assert storage.exists(loc.join("raw/x.bin")) and not storage.exists(loc.join("raw/y.bin"))
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
    client = storage.boto3_client(loc)
    bucket, key = loc.join("raw/x.bin").path.split("/", 1)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"\x00payload"
    client.put_object(Bucket=bucket, Key=key.replace("x.bin", "z.bin"), Body=b"from boto3")
    assert storage.read_text(loc.join("raw/z.bin")) == "from boto3"


def _timed(fn):
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as e:
        fn()
    return e.value, time.monotonic() - t0


@pytest.fixture
def refused_port():
    """A port that refuses connections: bound (so nothing else can take it) but not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("op", ["read", "write", "exists", "ls", "parquet"])
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
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage.EndpointUnreachableError), err
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
        assert isinstance(err, storage.EndpointUnreachableError), err
        assert dt < 10
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        listener.close()


@pytest.mark.parametrize("op", ["read", "write", "exists", "ls"])
def test_missing_bucket_is_named(s3_server, op):
    """A bucket that does not exist → BucketNotFoundError naming the bucket (no auto-create)."""
    uri = "s3://no-such-bucket-csp/x"
    calls = {
        "read": lambda: storage.read_bytes(uri),
        "write": lambda: storage.write_bytes(uri, b"x"),
        "exists": lambda: storage.exists(uri),
        "ls": lambda: storage.ls(uri),
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage.BucketNotFoundError), err
    assert "no-such-bucket-csp" in str(err) and dt < 10


@pytest.mark.parametrize("op", ["read", "write", "ls", "parquet"])
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
    }
    err, dt = _timed(calls[op])
    assert isinstance(err, storage.AccessDeniedError), err
    assert wrong not in str(err) and s3_server.secret_key not in str(err)
    assert s3_server.access_key in str(err) and dt < 10
    assert wrong not in repr(storage.resolve(uri))


def test_missing_object_and_file_are_not_found(s3_prefix, tmp_path):
    with pytest.raises(storage.NotFoundError, match="no such object"):
        storage.read_bytes(s3_prefix + "/missing")
    with pytest.raises(storage.NotFoundError):
        storage.read_bytes(str(tmp_path / "missing"))
