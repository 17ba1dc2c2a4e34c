"""Token shards: a corpus tokenized once into Parquet shards of fixed-length sequences.

Layout under the output URI (local path or s3://…)::

    manifest.json                   written last: its presence means the dataset is complete
    tokenizer/tokenizer.tiktoken    the tokenizer the shards were made with (+ tokenizer.json)
    train/shard-00000.parquet       one column ``tokens``: fixed_size_list<uint16>[n_ctx+1]
    val/shard-00000.parquet
    _completions/train/shard-00000.json   per-shard completion markers (datatrove-style)

Each row is ``n_ctx + 1`` consecutive tokens of documents joined by ``<|endoftext|>``
(inputs ``row[:-1]``, targets ``row[1:]``); the tail of a shard shorter than a row is
dropped and counted. Shards are written in parallel by Ray tasks, each an atomic write
followed by its marker, so an interrupted run resumes where it stopped and a finished
one does nothing. A marker (and the manifest) records its shard's byte size and sha256:
a marker counts only while its shard is there at that size, and :func:`verify` reads
every shard back against them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from cluster import storage
from sparsity import corpus as corpus_lib
from sparsity import tokenizer as tok_lib
from sparsity.errors import RUNTIME, CspError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
COMPLETIONS = "_completions"
FORMAT_VERSION = 1
# ~4 MB of source per shard ≈ 1.3M tokens ≈ 2.6 MB of Parquet: small enough that the
# stdlib makes ~8 shards to spread over workers, large enough that per-task overhead is
# noise.
DEFAULT_SHARD_BYTES = 4_000_000
DEFAULT_N_CTX = 256  # the default context (ModelConfig.block_size)


class DataError(CspError):
    pass


def shard_schema(n_ctx: int) -> pa.Schema:
    """The shard table: one row per training sequence of ``n_ctx + 1`` token ids."""
    return pa.schema([pa.field("tokens", pa.list_(pa.uint16(), n_ctx + 1), nullable=False)])


# ---------------------------------------------------------------------------- corpus sources


@dataclass(frozen=True)
class CorpusFile:
    """A corpus file wherever it lives: ``ref`` is a local path or a storage URI."""

    ref: str
    rel: str
    size: int


def list_corpus(source: str | None) -> tuple[list[CorpusFile], str]:
    """Files of a corpus source — None (the stdlib), a local directory / glob / file, or a
    storage URI prefix of .py files — and a fingerprint of their names and contents."""
    if source is not None and "://" in source and not source.startswith("file://"):
        loc = storage.resolve(source)
        uris = storage.ls(loc, suffix=".py")
        if not uris:
            raise DataError(f"corpus is empty: no .py objects under {loc.uri}; point --corpus at Python source")
        fs = loc.fs
        files, h = [], hashlib.sha256()
        for uri in uris:
            info = fs.info(uri[len("s3://"):])
            rel = uri[len(loc.uri):].lstrip("/")
            files.append(CorpusFile(uri, rel, int(info.get("size", 0))))
            h.update(f"{rel}\0{info.get('ETag', '')}\0{info.get('size', 0)}\n".encode())
        return files, h.hexdigest()
    local = storage.resolve(source).path if source and source.startswith("file://") else source
    found = corpus_lib.list_files(local)
    files = [CorpusFile(f.path, f.rel, os.path.getsize(f.path)) for f in found]
    return files, corpus_lib.fingerprint(found)


def read_corpus_file(f: CorpusFile, stats: corpus_lib.CorpusStats) -> str | None:
    """Text of one corpus file, or None (counted in ``stats``) when it must be skipped."""
    if "://" not in f.ref:
        return corpus_lib.read_source(f.ref, stats)
    try:
        data = storage.read_bytes(f.ref)
    except storage.StorageError:
        stats.skipped["unreadable"] += 1
        return None
    text, reason = corpus_lib.decode_source(data)
    if text is None:
        stats.skipped[reason] += 1
    else:
        stats.files += 1
        stats.bytes += len(data)
    return text


# ---------------------------------------------------------------------------- tokenizers


def load_tokenizer(uri: str) -> tok_lib.BPETokenizer:
    """A tokenizer from a directory/prefix holding its files, or from a dataset's
    ``tokenizer/`` sub-directory."""
    loc = storage.resolve(uri)
    for cand in (loc, loc.join(TOKENIZER_DIR)):
        if storage.exists(cand.join(tok_lib.META_FILE)):
            files = {name: storage.read_bytes(cand.join(name)) for name in (tok_lib.RANKS_FILE, tok_lib.META_FILE) if storage.exists(cand.join(name))}
            return tok_lib.from_files(files, where=cand.uri)
    raise DataError(f"no tokenizer at {loc.uri}: expected {tok_lib.META_FILE} there or in {TOKENIZER_DIR}/; build one with `csp tokenizer build`")


def save_tokenizer(tok: tok_lib.BPETokenizer, uri: str | storage.Location) -> None:
    loc = storage.resolve(uri)
    for name, data in tok.to_files().items():
        storage.write_bytes(loc.join(name), data)


def build_tokenizer(
    source: str | None = None, vocab_size: int = tok_lib.DEFAULT_VOCAB_SIZE, val_fraction: float = corpus_lib.DEFAULT_VAL_FRACTION
) -> tuple[tok_lib.BPETokenizer, corpus_lib.CorpusStats]:
    """Train the BPE on the train split of a corpus (val files never shape the vocabulary)."""
    files, fp = list_corpus(source)
    train = [f for f in files if corpus_lib.split_of(f.rel, val_fraction) == "train"] or files
    stats = corpus_lib.CorpusStats()
    texts = (t for f in train if (t := read_corpus_file(f, stats)) is not None)
    tok = tok_lib.train(texts, vocab_size=vocab_size, corpus_fingerprint=fp)
    if stats.files == 0:
        raise DataError(f"corpus {source or 'stdlib'!r} has no readable UTF-8 .py file ({dict(stats.skipped)})")
    return tok, stats


# ---------------------------------------------------------------------------- shards


def plan_shards(files: list[CorpusFile], val_fraction: float, shard_bytes: int) -> dict[str, list[list[CorpusFile]]]:
    """Deterministic assignment of files to shards: per split, in path order, a new shard
    whenever the running source size passes ``shard_bytes``."""
    plan: dict[str, list[list[CorpusFile]]] = {}
    for split, members in (("train", []), ("val", [])):
        members.extend(f for f in files if corpus_lib.split_of(f.rel, val_fraction) == split)
        shards: list[list[CorpusFile]] = []
        cur: list[CorpusFile] = []
        size = 0
        for f in members:
            cur.append(f)
            size += f.size
            if size >= shard_bytes:
                shards.append(cur)
                cur, size = [], 0
        if cur:
            shards.append(cur)
        plan[split] = shards
    return plan


def _shard_name(split: str, i: int) -> str:
    return f"{split}/shard-{i:05d}.parquet"


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
    storage.write_json(out.join(COMPLETIONS, spec["name"].replace(".parquet", ".json")), result)
    return result


def _spec_fingerprint(split: str, i: int, files: list[CorpusFile], n_ctx: int, tok_fp: str) -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}|{split}|{i}|{n_ctx}|{tok_fp}\n".encode())
    for f in files:
        h.update(f"{f.rel}\0{f.size}\n".encode())
    return h.hexdigest()


# What the manifest keeps of each shard's marker (``bytes`` and ``sha256`` are absent
# from datasets written before they were recorded).
SHARD_KEYS = ("path", "sequences", "tokens", "dropped_tokens", "documents", "source_bytes", "bytes", "sha256")


@dataclass
class PrepareResult:
    manifest: dict
    shards_written: int
    shards_skipped: int
    tokenizer_trained: bool


def check_prepare_args(n_ctx: int, val_fraction: float, shard_bytes: int) -> None:
    """The plan's numbers in range (the CLI checks them before Ray starts)."""
    if not 8 <= n_ctx <= 65536:
        raise DataError(f"--n-ctx {n_ctx} out of range: must be in [8, 65536]")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} out of range: must be in [0, 1)")
    if shard_bytes < 1:
        raise DataError(f"shard_bytes={shard_bytes} out of range: must be ≥ 1")


def prepare(
    corpus: str | None,
    out: str,
    tokenizer: str | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    val_fraction: float = corpus_lib.DEFAULT_VAL_FRACTION,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    vocab_size: int = tok_lib.DEFAULT_VOCAB_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Corpus → (tokenizer) → Parquet token shards + manifest at ``out``.

    Trains the tokenizer into ``out/tokenizer`` when none is given. Idempotent: shards
    with a completion marker from the same plan, whose file is there at the size the
    marker recorded, are skipped, and a complete dataset with the same plan and every
    shard in place does no work at all; a lost or truncated shard is written again. Ray must be initialised (cluster.runtime.init);
    ``workers`` bounds the shard tasks in flight (default: the cluster's CPUs).
    """
    check_prepare_args(n_ctx, val_fraction, shard_bytes)
    out_loc = storage.resolve(out)
    files, corpus_fp = list_corpus(corpus)

    # The tokenizer: given, already in the output, or trained now.
    tok_loc = out_loc.join(TOKENIZER_DIR)
    trained = False
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if storage.exists(tok_loc.join(tok_lib.META_FILE)):
            existing = load_tokenizer(tok_loc.uri)
            if existing.fingerprint != tok.fingerprint:
                raise DataError(f"{out_loc.uri} already holds shards of another tokenizer; choose a new --out or delete it")
        else:
            save_tokenizer(tok, tok_loc)
    elif storage.exists(tok_loc.join(tok_lib.META_FILE)):
        tok = load_tokenizer(tok_loc.uri)
        if tok.meta.get("corpus_fingerprint") != corpus_fp:
            raise DataError(f"{out_loc.uri} already holds a tokenizer trained on another corpus; choose a new --out, pass --tokenizer, or delete it")
    else:
        tok, _ = build_tokenizer(corpus, vocab_size=vocab_size, val_fraction=val_fraction)
        save_tokenizer(tok, tok_loc)
        trained = True

    plan = plan_shards(files, val_fraction, shard_bytes)
    specs = []
    for split, shards in plan.items():
        for i, group in enumerate(shards):
            specs.append(
                {
                    "out": out_loc.uri,
                    "name": _shard_name(split, i),
                    "split": split,
                    "n_ctx": n_ctx,
                    "files": [vars(f) for f in group],
                    "plan": _spec_fingerprint(split, i, group, n_ctx, tok.fingerprint),
                }
            )
    plan_fp = hashlib.sha256("".join(s["plan"] for s in specs).encode()).hexdigest()

    manifest_loc = out_loc.join(MANIFEST)
    present = storage.sizes(out_loc, suffix=".parquet")  # one listing: what is really there
    if storage.exists(manifest_loc):
        old = storage.read_json(manifest_loc)
        if old.get("plan_fingerprint") != plan_fp:
            raise DataError(
                f"{out_loc.uri} already holds a dataset made from another corpus, tokenizer or --n-ctx; choose a new --out or delete it"
            )
        if all(_intact(out_loc, s, present) for split in old["splits"].values() for s in split["shards"]):
            if progress:
                progress(len(specs), len(specs))
            return PrepareResult(old, 0, len(specs), False)
        # A shard of a finished dataset is gone or resized: withdraw the manifest (its
        # presence means complete) and rewrite what is missing below.
        storage.remove(manifest_loc)

    # Resume: shards whose marker carries this plan, and whose file is there at the size
    # the marker recorded, are done.
    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        marker = out_loc.join(COMPLETIONS, s["name"].replace(".parquet", ".json"))
        done = storage.read_json(marker) if storage.exists(marker) else None
        if done is not None and done.get("plan") == s["plan"] and _intact(out_loc, done, present):
            results[s["name"]] = done
        else:
            todo.append(s)
    skipped = len(results)
    if progress:
        progress(skipped, len(specs))
    _run_shard_tasks(todo, tok, results, workers, progress, len(specs))
    if todo:  # the manifest goes only over shards this process can see, at their size
        present = storage.sizes(out_loc, suffix=".parquet")
        lost = [r["path"] for r in results.values() if not _intact(out_loc, r, present)]
        if lost:
            raise DataError(
                f"{len(lost)} shard(s) written by Ray tasks are not at {out_loc.uri} ({', '.join(sorted(lost)[:3])}): "
                "the tasks wrote somewhere this process cannot see (a local --out on several nodes?); use s3:// or a shared filesystem",
                exit_code=RUNTIME,
            )

    per_split = {}
    for split in plan:
        shards = [results[s["name"]] for s in specs if s["split"] == split]
        skipped_files: dict[str, int] = {}
        for r in shards:
            for k, v in r["skipped"].items():
                skipped_files[k] = skipped_files.get(k, 0) + v
        per_split[split] = {
            "shards": [{k: r[k] for k in SHARD_KEYS if k in r} for r in shards],
            "sequences": sum(r["sequences"] for r in shards),
            "tokens": sum(r["tokens"] for r in shards),
            "dropped_tokens": sum(r["dropped_tokens"] for r in shards),
            "documents": sum(r["documents"] for r in shards),
            "skipped_files": skipped_files,
        }
    warnings = [f"split {s!r} has no sequences; raise --val-fraction or use a larger corpus" for s, v in per_split.items() if v["sequences"] == 0]
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_ctx": n_ctx,
        "seq_len": n_ctx + 1,
        "plan_fingerprint": plan_fp,
        "tokenizer": {
            "path": TOKENIZER_DIR,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.n_vocab,
            "eot_id": tok.eot_id,
        },
        "corpus": {
            "source": _describe_source(corpus),
            "fingerprint": corpus_fp,
            "files": len(files),
            "val_fraction": val_fraction,
        },
        "splits": per_split,
        "warnings": warnings,
    }
    storage.write_json(manifest_loc, manifest)
    return PrepareResult(manifest, len(todo), skipped, trained)


def _intact(out_loc: storage.Location, record: dict, present: dict[str, int]) -> bool:
    """A shard recorded by a marker or the manifest is there, at the size it was written
    (records from before sizes were kept: there at all)."""
    size = present.get(out_loc.join(record["path"]).uri)
    return size is not None and record.get("bytes", size) == size


def _describe_source(corpus: str | None) -> str:
    if corpus is None:
        return f"stdlib ({corpus_lib.default_corpus_root().name})"
    return corpus


def _run_shard_tasks(todo: list[dict], tok, results: dict, workers: int | None, progress, total: int) -> None:
    """Fan the shard specs out as Ray tasks, at most ``workers`` in flight."""
    if not todo:
        return
    import ray

    from cluster import runtime

    if not ray.is_initialized():
        runtime.init()
    limit = max(1, int(workers or runtime.cluster_cpus() or 1))
    tok_ref = ray.put(tok.to_files())  # shipped once, shared by every task
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    for spec, ref in runtime.bounded_map(lambda spec: task.remote(spec, tok_ref), todo, limit):
        try:
            results[spec["name"]] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, CspError) else None
            raise cause or DataError(f"writing {spec['name']} failed: {type(e.cause).__name__}: {e.cause}") from None
        if progress:
            progress(len(results), total)


MANIFEST_KEYS = ("corpus", "tokenizer", "n_ctx", "splits")


def read_manifest(uri: str) -> dict:
    """The manifest of a finished dataset; a clear error when there is none."""
    loc = storage.resolve(uri)
    m = loc.join(MANIFEST)
    if not storage.exists(m):
        raise DataError(f"no dataset at {loc.uri}: {MANIFEST} is missing (run `csp data prepare --out {loc.uri}`, or let an interrupted one finish)")
    try:
        manifest = storage.read_json(m)
    except ValueError:
        manifest = None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DataError(f"{m.uri} is not a csp dataset manifest (missing {', '.join(missing)}); re-run `csp data prepare --out {loc.uri}`")
    return manifest


def shard_uris(uri: str, split: str = "train") -> list[str]:
    """URIs of a split's shards, in manifest order."""
    loc = storage.resolve(uri)
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in {loc.uri}; it has {sorted(manifest['splits'])}")
    return [loc.join(s["path"]).uri for s in manifest["splits"][split]["shards"]]


def verify(uri: str, progress: Callable[[int, int], None] | None = None) -> dict:
    """Read a finished dataset back against its manifest: the tokenizer's fingerprint, and
    every shard present, of the byte size and sha256 recorded when it was written, with a
    readable Parquet footer and pages, the shard schema and the manifest's row count.

    Returns ``{"uri", "shards", "sequences", "problems": [{"path", "problem"}]}``, one
    problem per damaged file (several findings of one file joined by "; ").
    """
    loc = storage.resolve(uri)
    manifest = read_manifest(uri)
    problems = []
    tok_path = manifest["tokenizer"].get("path", TOKENIZER_DIR)
    try:
        tok = load_tokenizer(loc.join(tok_path).uri)
        if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
            problems.append({"path": tok_path, "problem": "tokenizer differs from the one the shards were made with (fingerprint)"})
    except CspError as e:
        problems.append({"path": tok_path, "problem": str(e)})
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    present = storage.sizes(loc, suffix=".parquet")
    for i, entry in enumerate(entries):
        found = _shard_problems(loc, entry, present, manifest["n_ctx"])
        if found:
            problems.append({"path": entry["path"], "problem": "; ".join(found)})
        if progress:
            progress(i + 1, len(entries))
    return {
        "uri": loc.uri,
        "shards": len(entries),
        "sequences": sum(e["sequences"] for e in entries),
        "problems": problems,
    }


def _shard_problems(loc: storage.Location, entry: dict, present: dict[str, int], n_ctx: int) -> list[str]:
    """What is wrong with one shard of a manifest ([] when nothing is)."""
    import pyarrow.parquet as pq

    shard = loc.join(entry["path"])
    size = present.get(shard.uri)
    if size is None:
        return ["missing"]
    expected = entry
    if "bytes" not in entry:  # a manifest from before sizes were recorded: its marker may have them
        marker = loc.join(COMPLETIONS, entry["path"].replace(".parquet", ".json"))
        try:
            expected = storage.read_json(marker) if storage.exists(marker) else entry
        except storage.StorageError:
            pass
    found = []
    want = expected.get("bytes")
    if want is not None and size != want:
        found.append(f"{'truncated' if size < want else 'resized'}: {size:,} bytes, {want:,} when written")
    try:
        payload = storage.read_bytes(shard)
    except storage.StorageError as e:
        return [*found, str(e)]
    if not found and expected.get("sha256") not in (None, hashlib.sha256(payload).hexdigest()):
        found.append("content changed since it was written (sha256 differs)")
    try:
        table = pq.read_table(pa.BufferReader(payload), page_checksum_verification=True)
    except Exception as e:  # whatever pyarrow raises for damaged bytes
        found.append(f"not a readable Parquet file (corrupt or truncated: {' '.join(str(e).split())[:160]})")
        return found
    schema = shard_schema(n_ctx)
    if not table.schema.remove_metadata().equals(schema):
        found.append(f"schema {table.schema.remove_metadata()} is not the shard schema {schema}")
    elif table.num_rows != entry["sequences"]:
        found.append(f"{table.num_rows:,} rows, the manifest says {entry['sequences']:,}")
    return found


def verify_summary(report: dict) -> str:
    """One line per problem, then a summary line."""
    width = max((len(p["path"]) for p in report["problems"]), default=0)
    lines = [f"{p['path']:<{width}}  {p['problem']}" for p in report["problems"]]
    if report["problems"]:
        lines.append(f"{len(report['problems'])} problem(s) in {report['uri']} ({report['shards']} shards checked)")
    else:
        lines.append(f"ok: {report['shards']} shards, {report['sequences']:,} sequences in {report['uri']} match the manifest")
    return "\n".join(lines)


def manifest_summary(manifest: dict) -> str:
    """A few readable lines about a dataset."""
    lines = [
        f"corpus     {manifest['corpus']['source']}  ({manifest['corpus']['files']} files, val_fraction {manifest['corpus']['val_fraction']})",
        f"tokenizer  vocab {manifest['tokenizer']['vocab_size']}, eot {manifest['tokenizer']['eot_id']}, sha256 {manifest['tokenizer']['fingerprint'][:12]}",
        f"sequences  n_ctx {manifest['n_ctx']} (+1 target token per row)",
    ]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:<10} {len(s['shards'])} shards, {s['sequences']:,} sequences, {s['tokens']:,} tokens, {s['documents']:,} files")
    lines += [f"warning    {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def read_shard(shard_uri: str):
    """One shard's token rows as an (n, n_ctx+1) uint16 array (n may be 0)."""
    col = storage.read_parquet(shard_uri, columns=["tokens"]).column("tokens").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def load_rows(uri: str, split: str = "train", max_rows: int | None = None):
    """A split's token rows as one (n, n_ctx+1) uint16 array, in manifest order."""
    import numpy as np

    rows = []
    n = 0
    for shard in shard_uris(uri, split):
        arr = read_shard(shard)
        if len(arr) == 0:
            continue
        rows.append(arr)
        n += len(arr)
        if max_rows is not None and n >= max_rows:
            break
    if not rows:
        raise DataError(f"split {split!r} of {storage.resolve(uri).uri} has no sequences; use a larger corpus or raise --val-fraction")
    out = np.concatenate(rows)
    return out[:max_rows] if max_rows is not None else out
