import json
import os

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from cluster import data, shards, sources, storage, storage_errors
from sparsity import corpus

N_CTX = 64


def _expected_tokens(tok, files, split):
    """Recompute, from the tokenizer alone, every token a split must hold (docs + EOTs)."""
    texts = corpus.iter_texts([f for f in files if corpus.split_of(f.rel, 0.1) == split])
    return sum(len(tok.encode(t)) + 1 for t in texts)


def _prepare(out, corpus_dir, tokenizer_dir, **kw):
    kw.setdefault("n_ctx", N_CTX)
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("shard_bytes", 150_000)
    return data.prepare(str(corpus_dir), out, tokenizer=str(tokenizer_dir), **kw)


def test_shards_hold_exactly_the_corpus_tokens_and_read_with_pandas_and_pyarrow(ray_session, small_corpus, tokenizer_dir, stdlib_tokenizer, tmp_path):
    """Shards read by pandas and pyarrow.dataset hold every token of the split (stored + dropped tail)."""
    out = str(tmp_path / "ds")
    result = _prepare(out, small_corpus, tokenizer_dir)
    m = result.manifest
    assert result.shards_written == sum(len(s["shards"]) for s in m["splits"].values()) >= 3
    files = corpus.list_files(small_corpus)
    for split in ("train", "val"):
        s = m["splits"][split]
        df = pd.read_parquet(os.path.join(out, split))
        assert len(df) == s["sequences"] > 0
        assert len(pads.dataset(os.path.join(out, split), format="parquet").to_table()) == s["sequences"]
        rows = np.stack(df["tokens"].to_numpy())
        assert rows.shape == (s["sequences"], N_CTX + 1) and rows.dtype == np.uint16
        assert s["tokens"] == rows.size
        assert s["tokens"] + s["dropped_tokens"] == _expected_tokens(stdlib_tokenizer, files, split)
    skipped: dict = {}
    for s in m["splits"].values():
        for k, v in s["skipped_files"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"binary": 1, "not_utf8": 1}


def test_first_row_is_the_start_of_the_first_document(ray_session, small_corpus, tokenizer_dir, stdlib_tokenizer, tmp_path):
    """Row 0 of shard 0 is the first n_ctx+1 tokens of the first train file, EOT-joined."""
    out = str(tmp_path / "ds")
    _prepare(out, small_corpus, tokenizer_dir)
    first = data.shard_uris(out, "train")[0]
    row = storage.read_parquet(first).column("tokens")[0].as_py()
    train = [f for f in corpus.list_files(small_corpus) if corpus.split_of(f.rel, 0.1) == "train"]
    stream = []
    for t in corpus.iter_texts(train):
        stream += stdlib_tokenizer.encode(t) + [stdlib_tokenizer.eot_id]
        if len(stream) > N_CTX + 1:
            break
    assert row == stream[: N_CTX + 1]


def test_second_prepare_does_no_work_and_resume_redoes_only_missing_shards(ray_session, small_corpus, tokenizer_dir, tmp_path):
    """A finished dataset is left untouched; with one shard lost, a re-run writes just that one."""
    out = str(tmp_path / "ds")
    first = _prepare(out, small_corpus, tokenizer_dir)
    uris = data.shard_uris(out, "train")
    mtimes = {p: os.stat(p).st_mtime_ns for p in uris}
    again = _prepare(out, small_corpus, tokenizer_dir)
    assert again.shards_written == 0 and again.manifest == first.manifest
    assert {p: os.stat(p).st_mtime_ns for p in uris} == mtimes

    # Simulate an interrupted run: the manifest and one shard's marker never got written.
    os.unlink(os.path.join(out, data.MANIFEST))
    os.unlink(os.path.join(out, shards.COMPLETIONS, "train", "shard-00001.json"))
    resumed = _prepare(out, small_corpus, tokenizer_dir)
    assert resumed.shards_written == 1
    assert resumed.manifest == first.manifest
    assert os.stat(uris[0]).st_mtime_ns == mtimes[uris[0]]


def test_prepare_on_s3_reads_back_with_pandas(ray_session, small_corpus, tokenizer_dir, s3_prefix):
    """Ray tasks write shards to the SeaweedFS server; pandas reads them back via s3://."""
    result = _prepare(s3_prefix, small_corpus, tokenizer_dir)
    s = result.manifest["splits"]["train"]
    df = pd.read_parquet(f"{s3_prefix}/train", storage_options=storage.storage_options(s3_prefix))
    assert len(df) == s["sequences"] > 0
    loc = storage.resolve(s3_prefix)
    ds = pads.dataset(loc.join("train").path, filesystem=loc.pa_fs, format="parquet")
    assert ds.count_rows() == s["sequences"]
    assert sources.load_tokenizer(s3_prefix).fingerprint == result.manifest["tokenizer"]["fingerprint"]
    assert _prepare(s3_prefix, small_corpus, tokenizer_dir).shards_written == 0


def test_corpus_from_an_s3_prefix(ray_session, small_corpus, tokenizer_dir, s3_prefix, tmp_path):
    """A corpus of .py objects under an s3:// prefix tokenizes like the same files on disk."""
    for f in corpus.list_files(small_corpus / "json"):
        storage.write_bytes(f"{s3_prefix}/src/{f.rel}", open(f.path, "rb").read())
    remote = data.prepare(f"{s3_prefix}/src", f"{s3_prefix}/ds", tokenizer=str(tokenizer_dir), n_ctx=N_CTX, val_fraction=0.1)
    local = data.prepare(str(small_corpus / "json"), str(tmp_path / "ds"), tokenizer=str(tokenizer_dir), n_ctx=N_CTX, val_fraction=0.1)
    assert remote.manifest["splits"] == local.manifest["splits"]


def test_output_made_from_another_tokenizer_or_context_is_refused(ray_session, small_corpus, tokenizer_dir, tmp_path):
    """Re-using an output with a different n_ctx fails clearly instead of mixing datasets."""
    out = str(tmp_path / "ds")
    _prepare(out, small_corpus, tokenizer_dir)
    before = sorted(storage.ls(out))
    with pytest.raises(sources.DataError, match="another corpus, tokenizer or --n-ctx"):
        _prepare(out, small_corpus, tokenizer_dir, n_ctx=32)
    assert sorted(storage.ls(out)) == before


def test_bad_prepare_arguments(tmp_path, small_corpus):
    with pytest.raises(sources.DataError, match="--n-ctx 0"):
        data.prepare(str(small_corpus), str(tmp_path), n_ctx=0)
    with pytest.raises(sources.DataError, match="--val-fraction 1.5"):
        data.prepare(str(small_corpus), str(tmp_path), val_fraction=1.5)
    with pytest.raises(sources.DataError, match="no tokenizer"):
        data.prepare(str(small_corpus), str(tmp_path / "o"), tokenizer=str(tmp_path / "none"))
    assert not (tmp_path / "o").exists()


def _shard(out, name):
    return os.path.join(out, *name.split("/"))


def test_a_lost_or_truncated_shard_is_rewritten_even_with_its_marker_kept(ray_session, small_corpus, tokenizer_dir, tmp_path):
    """A marker counts only while its shard is there at the recorded size: a deleted or
    truncated shard is rewritten, identical to the original, and the manifest is whole."""
    out = str(tmp_path / "ds")
    first = _prepare(out, small_corpus, tokenizer_dir)
    total = first.shards_written
    names = ("train/shard-00001.parquet", "train/shard-00000.parquet")
    original = {n: open(_shard(out, n), "rb").read() for n in names}

    # The measured fault: a shard and the manifest gone, every marker kept.
    os.unlink(_shard(out, names[0]))
    os.unlink(os.path.join(out, data.MANIFEST))
    again = _prepare(out, small_corpus, tokenizer_dir)
    assert (again.shards_written, again.shards_skipped) == (1, total - 1)
    assert open(_shard(out, names[0]), "rb").read() == original[names[0]]
    assert again.manifest == first.manifest == storage.read_json(os.path.join(out, data.MANIFEST))

    # A finished dataset (manifest kept) that lost a shard, and one whose shard was truncated.
    os.unlink(_shard(out, names[1]))
    assert _prepare(out, small_corpus, tokenizer_dir).shards_written == 1
    os.truncate(_shard(out, names[0]), 100)
    assert _prepare(out, small_corpus, tokenizer_dir).shards_written == 1
    assert {n: open(_shard(out, n), "rb").read() for n in names} == original
    assert storage.read_json(os.path.join(out, data.MANIFEST)) == first.manifest


def test_verify_passes_a_fresh_dataset_and_names_every_damaged_shard(ray_session, small_corpus, tokenizer_dir, tmp_path):
    """`csp data verify`: exit 0 on a fresh dataset; a shard overwritten in the middle, one
    truncated and one deleted are each named on a line of their own, exit 1."""
    from typer.testing import CliRunner

    from cli.main import app

    out = str(tmp_path / "ds")
    _prepare(out, small_corpus, tokenizer_dir)
    r = CliRunner().invoke(app, ["data", "verify", out])
    assert r.exit_code == 0, r.output
    sequences = sum(s["sequences"] for s in data.read_manifest(out)["splits"].values())
    assert r.stdout.strip().splitlines() == [f"ok: 4 shards, {sequences:,} sequences in {out} match the manifest"]

    overwritten, truncated, deleted = "train/shard-00000.parquet", "train/shard-00002.parquet", "val/shard-00000.parquet"
    size = os.path.getsize(_shard(out, overwritten))
    with open(_shard(out, overwritten), "r+b") as fh:  # same size, bytes flipped mid-file
        fh.seek(size // 2)
        fh.write(b"\xff" * 8)
    os.truncate(_shard(out, truncated), os.path.getsize(_shard(out, truncated)) // 2)
    os.unlink(_shard(out, deleted))

    r = CliRunner().invoke(app, ["data", "verify", out])
    assert r.exit_code == 1, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[-1] == f"3 problem(s) in {out} (4 shards checked)"
    by_shard = {line.split()[0]: line for line in lines[:3]}
    assert "sha256 differs" in by_shard[overwritten] and "not a readable Parquet file" in by_shard[overwritten]
    assert "truncated" in by_shard[truncated] and "not a readable Parquet file" in by_shard[truncated]
    assert by_shard[deleted].split()[1:] == ["missing"]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "3 damaged or missing file(s)" in err[0] and "Traceback" not in r.output

    r = CliRunner().invoke(app, ["data", "verify", out, "--format", "json"])
    assert r.exit_code == 1
    assert sorted(p["path"] for p in json.loads(r.stdout)["problems"]) == sorted([overwritten, truncated, deleted])

    # Training's own read of the damaged shard names it as corrupt, not "Invalid base64 input".
    with pytest.raises(storage_errors.CorruptFileError, match=f"{_shard(out, overwritten)} is not a readable Parquet file"):
        shards.read_shard(_shard(out, overwritten))


def test_shard_bytes_reach_arrow_in_a_buffer_that_holds_no_python_object():
    """`data verify` reads each shard from bytes already in memory. Arrow may drop its last
    reference to that source on a pool thread after the read returns; a source wrapping
    Python bytes then needs the GIL there, and at interpreter exit that aborted the process
    after the command had printed its answer (pyarrow 26, about one run in six on a loaded
    2-core machine). The bytes handed over must be Arrow's own copy, not a view that keeps
    the Python object alive (pa.py_buffer does, and would fail this test)."""
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"tokens": pa.array([[1, 2, 3], [4, 5, 6]], pa.list_(pa.uint16(), 3))})
    payload = storage.parquet_bytes(table)
    before = sys.getrefcount(payload)
    view = pa.py_buffer(payload)
    assert sys.getrefcount(payload) == before + 1  # the hazard this test exists to catch is visible this way
    del view
    owned = shards.arrow_owned(payload)
    assert sys.getrefcount(payload) == before and owned.to_pybytes() == payload
    assert pq.read_table(pa.BufferReader(owned)).equals(table)


def test_a_corpus_directory_named_like_a_glob_is_read_as_that_directory(small_corpus, tmp_path):
    """`corpus [v1]` exists, so it is a directory, not a glob; globs below it work too."""
    import shutil

    named = tmp_path / "my corpus [v1]"
    shutil.copytree(small_corpus / "json", named)
    files, fp = sources.list_corpus(str(named))
    ref, ref_fp = sources.list_corpus(str(small_corpus / "json"))
    assert [f.rel for f in files] == [f.rel for f in ref] and fp == ref_fp and len(files) >= 5
    assert [f.rel for f in sources.list_corpus(f"{named}/*.py")[0]] == [f.rel for f in ref]
    assert corpus.list_files(str(named / "decoder.py"))[0].rel == "decoder.py"
    with pytest.raises(corpus.CorpusError, match="corpus not found"):
        corpus.list_files(str(named / "nope"))


def test_a_damaged_manifest_is_a_runtime_error_and_a_foreign_one_a_usage_error(tmp_path):
    """Like a corrupt shard, a manifest that is not JSON any more is damage (exit 1, saying how
    to rewrite it); valid JSON that is not a csp manifest means the wrong path (exit 2)."""
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"n_ctx": 64, "splits": {')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(storage_errors.CorruptFileError, match=r"manifest.json is damaged .*delete it and re-run `csp data prepare"):
        data.read_manifest(str(tmp_path / "broken"))
    for name, code, fragment in (("broken", 1, "is damaged"), ("other", 2, "is not a csp dataset manifest")):
        for cmd in (["data", "info"], ["data", "verify"]):
            r = CliRunner().invoke(app, [*cmd, str(tmp_path / name)])
            assert r.exit_code == code and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, (cmd, name, r.output)


def test_sample_rows_draws_from_every_part_of_the_corpus(stdlib_data):
    """The rows a diagram scans for top-activating tokens come from the whole corpus: every
    shard of train and val holding ≥ 5% of the rows is drawn from, each drawn row is a real
    row of its shard, and the draw is fixed by its seed."""
    import numpy as np

    from cluster import data, shards

    m = data.read_manifest(stdlib_data)
    parts = [(sp, s) for sp in ("train", "val") for s in m["splits"][sp]["shards"] if s["sequences"]]
    assert len(parts) >= 3
    per_shard = [shards.read_shard(f"{stdlib_data}/{s['path']}") for _, s in parts]
    total = sum(len(a) for a in per_shard)
    rows = data.sample_rows(stdlib_data, 300, seed=1)
    assert rows.shape == (300, per_shard[0].shape[1]) and rows.dtype == np.uint16
    where = {a.tobytes(): i for i, arr in enumerate(per_shard) for a in arr}
    hit = [where[r.tobytes()] for r in rows]  # KeyError: a row that is in no shard
    assert len({r.tobytes() for r in rows}) >= 295  # drawn without replacement (a few rows repeat in the corpus itself)
    for i, arr in enumerate(per_shard):
        if len(arr) >= 0.05 * total:
            assert i in hit, f"shard {parts[i][1]['path']} ({len(arr)} of {total} rows) was never drawn from"
    assert any(parts[i][0] == "val" for i in hit) or all(len(a) < 0.05 * total for (sp, _), a in zip(parts, per_shard, strict=True) if sp == "val")
    assert np.array_equal(rows, data.sample_rows(stdlib_data, 300, seed=1))
    assert not np.array_equal(rows, data.sample_rows(stdlib_data, 300, seed=2))
    assert len(data.sample_rows(stdlib_data, 10 * total)) == total  # more than the corpus holds: all of it, once
