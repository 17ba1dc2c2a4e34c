"""The token shard format: one Parquet file of fixed-length sequences and its completion
marker, as cluster/data.py lays them out under a dataset.

    train/shard-00000.parquet              one column ``tokens``: fixed_size_list<uint16>[n_ctx+1]
    _completions/train/shard-00000.json    its completion marker (datatrove-style)

Each row is ``n_ctx + 1`` consecutive tokens of documents joined by ``<|endoftext|>``
(inputs ``row[:-1]``, targets ``row[1:]``); the tail of a shard shorter than a row is
dropped and counted. :func:`write_shard` (the body of one Ray task) writes a shard
atomically, then its marker; a marker (and the manifest's entry) records the shard's byte
size and sha256, so a marker counts only while its shard is there at that size
(:func:`intact`), and :func:`shard_problems` reads a shard back against them.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from cluster import storage
from cluster.sources import CorpusFile, read_corpus_file
from cluster.storage_errors import StorageError
from sparsity import corpus as corpus_lib
from sparsity import tokenizer as tok_lib

COMPLETIONS = "_completions"
FORMAT_VERSION = 1


def shard_schema(n_ctx: int) -> pa.Schema:
    """The shard table: one row per training sequence of ``n_ctx + 1`` token ids."""
    return pa.schema([pa.field("tokens", pa.list_(pa.uint16(), n_ctx + 1), nullable=False)])


def shard_name(split: str, i: int) -> str:
    return f"{split}/shard-{i:05d}.parquet"


def marker(out_loc: storage.Location, name: str) -> storage.Location:
    """Where the completion marker of shard ``name`` (``train/shard-00000.parquet``) goes."""
    return out_loc.join(COMPLETIONS, name.replace(".parquet", ".json"))


_TOKENIZER_CACHE: dict[str, tok_lib.BPETokenizer] = {}


def write_shard(spec: dict, tok_files: dict[str, bytes]) -> dict:
    """Tokenize one shard's files and write its Parquet file, then its completion marker.

    A plain function of a dict (the Ray task body): what it returns goes into the manifest.
    """
    fp = hashlib.sha256(tok_files[tok_lib.RANKS_FILE]).hexdigest()
    tok = _TOKENIZER_CACHE.get(fp)
    if tok is None:
        tok = _TOKENIZER_CACHE[fp] = tok_lib.from_files(tok_files)
    n_ctx = spec["n_ctx"]
    seq_len = n_ctx + 1
    stats = corpus_lib.CorpusStats()
    texts = [t for f in spec["files"] if (t := read_corpus_file(CorpusFile(**f), stats)) is not None]
    import numpy as np

    ids = tok.encode_batch(texts, num_threads=1)
    lengths = [len(x) + 1 for x in ids]  # + <|endoftext|> after every document
    total = sum(lengths)
    flat = np.empty(total, dtype=np.uint16)
    pos = 0
    for x in ids:
        flat[pos : pos + len(x)] = x
        pos += len(x)
        flat[pos] = tok.eot_id
        pos += 1
    n_seq = total // seq_len
    body = flat[: n_seq * seq_len]
    values = pa.array(body, type=pa.uint16())
    column = pa.FixedSizeListArray.from_arrays(values, seq_len)
    meta = {b"csp.n_ctx": str(n_ctx).encode(), b"csp.tokenizer": fp.encode()}
    table = pa.Table.from_arrays([column], schema=shard_schema(n_ctx).with_metadata(meta))
    out = storage.resolve(spec["out"])
    payload = storage.parquet_bytes(table, compression="zstd")
    storage.write_bytes(out.join(spec["name"]), payload)
    result = {
        "path": spec["name"],
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "sequences": int(n_seq),
        "tokens": int(n_seq * seq_len),
        "dropped_tokens": int(total - n_seq * seq_len),
        "documents": len(texts),
        "source_bytes": stats.bytes,
        "skipped": dict(stats.skipped),
        "plan": spec["plan"],
    }
    storage.write_json(marker(out, spec["name"]), result)
    return result


def intact(out_loc: storage.Location, record: dict, present: dict[str, int]) -> bool:
    """A shard recorded by a marker or the manifest is there, at the size it was written
    (records from before sizes were kept: there at all)."""
    size = present.get(out_loc.join(record["path"]).uri)
    return size is not None and record.get("bytes", size) == size


def arrow_owned(payload: bytes):
    """``payload`` copied into a buffer Arrow allocated. A Parquet read may drop its last
    reference to the source on one of Arrow's pool threads, after the read returned; if the
    source wraps a Python object, that thread must take the GIL to release it, and a thread
    doing so while the interpreter exits is killed mid-destructor: the process aborts
    ("terminate called without an active exception") after the command has finished. An
    Arrow-owned buffer is released without Python."""
    sink = pa.BufferOutputStream()
    sink.write(payload)
    return sink.getvalue()


def shard_problems(loc: storage.Location, entry: dict, present: dict[str, int], n_ctx: int) -> list[str]:
    """What is wrong with one shard of a manifest ([] when nothing is)."""
    import pyarrow.parquet as pq

    shard = loc.join(entry["path"])
    size = present.get(shard.uri)
    if size is None:
        return ["missing"]
    expected = entry
    if "bytes" not in entry:  # a manifest from before sizes were recorded: its marker may have them
        done = marker(loc, entry["path"])
        try:
            expected = storage.read_json(done) if storage.exists(done) else entry
        except StorageError:
            pass
    found = []
    want = expected.get("bytes")
    if want is not None and size != want:
        found.append(f"{'truncated' if size < want else 'resized'}: {size:,} bytes, {want:,} when written")
    try:
        payload = storage.read_bytes(shard)
    except StorageError as e:
        return [*found, str(e)]
    if not found and expected.get("sha256") not in (None, hashlib.sha256(payload).hexdigest()):
        found.append("content changed since it was written (sha256 differs)")
    try:
        table = pq.read_table(pa.BufferReader(arrow_owned(payload)), page_checksum_verification=True)
    except Exception as e:  # whatever pyarrow raises for damaged bytes
        found.append(f"not a readable Parquet file (corrupt or truncated: {' '.join(str(e).split())[:160]})")
        return found
    schema = shard_schema(n_ctx)
    if not table.schema.remove_metadata().equals(schema):
        found.append(f"schema {table.schema.remove_metadata()} is not the shard schema {schema}")
    elif table.num_rows != entry["sequences"]:
        found.append(f"{table.num_rows:,} rows, the manifest says {entry['sequences']:,}")
    return found


def read_shard(shard_uri: str):
    """One shard's token rows as an (n, n_ctx+1) uint16 array (n may be 0)."""
    col = storage.read_parquet(shard_uri, columns=["tokens"]).column("tokens").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
