"""Token datasets: a corpus tokenized once into Parquet shards of fixed-length sequences,
and the manifest that says what a finished dataset holds.

Layout under the output URI (local path or s3://…)::

    manifest.json                   written last: its presence means the dataset is complete
    tokenizer/tokenizer.tiktoken    the tokenizer the shards were made with (+ tokenizer.json)
    train/shard-00000.parquet       one column ``tokens``: fixed_size_list<uint16>[n_ctx+1]
    val/shard-00000.parquet
    _completions/train/shard-00000.json   per-shard completion markers (datatrove-style)

The corpus and the tokenizer come from cluster/sources.py; a shard, its rows and its
marker are cluster/shards.py's. :func:`prepare` plans the shards, writes them in parallel
by Ray tasks, each an atomic write followed by its marker, so an interrupted run resumes
where it stopped and a finished one does nothing; then the manifest. A marker (and the
manifest) records its shard's byte size and sha256: a marker counts only while its shard
is there at that size, and :func:`verify` reads every shard back against them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cluster import shards, sources, storage
from cluster.sources import TOKENIZER_DIR, CorpusFile, DataError
from cluster.storage_errors import CorruptFileError, one_line
from sparsity import corpus as corpus_lib
from sparsity import tokenizer as tok_lib
from sparsity.errors import RUNTIME, CspError

MANIFEST = "manifest.json"
# ~4 MB of source per shard ≈ 1.3M tokens ≈ 2.6 MB of Parquet: small enough that the
# stdlib makes ~8 shards to spread over workers, large enough that per-task overhead is
# noise.
DEFAULT_SHARD_BYTES = 4_000_000
DEFAULT_N_CTX = 256  # the default context (ModelConfig.block_size)


def plan_shards(files: list[CorpusFile], val_fraction: float, shard_bytes: int) -> dict[str, list[list[CorpusFile]]]:
    """Deterministic assignment of files to shards: per split, in path order, a new shard
    whenever the running source size passes ``shard_bytes``."""
    plan: dict[str, list[list[CorpusFile]]] = {}
    for split, members in (("train", []), ("val", [])):
        members.extend(f for f in files if corpus_lib.split_of(f.rel, val_fraction) == split)
        groups: list[list[CorpusFile]] = []
        cur: list[CorpusFile] = []
        size = 0
        for f in members:
            cur.append(f)
            size += f.size
            if size >= shard_bytes:
                groups.append(cur)
                cur, size = [], 0
        if cur:
            groups.append(cur)
        plan[split] = groups
    return plan


def _spec_fingerprint(split: str, i: int, files: list[CorpusFile], n_ctx: int, tok_fp: str) -> str:
    h = hashlib.sha256(f"{shards.FORMAT_VERSION}|{split}|{i}|{n_ctx}|{tok_fp}\n".encode())
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
    files, corpus_fp = sources.list_corpus(corpus)
    tok, trained = _dataset_tokenizer(out_loc, corpus, corpus_fp, tokenizer, vocab_size, val_fraction)
    plan = plan_shards(files, val_fraction, shard_bytes)
    specs = _shard_specs(plan, out_loc, n_ctx, tok.fingerprint)
    plan_fp = hashlib.sha256("".join(s["plan"] for s in specs).encode()).hexdigest()

    present = storage.sizes(out_loc, suffix=".parquet")  # one listing: what is really there
    finished = _finished_manifest(out_loc, plan_fp, present)
    if finished is not None:
        if progress:
            progress(len(specs), len(specs))
        return PrepareResult(finished, 0, len(specs), False)

    results, todo = _resume(out_loc, specs, present)
    skipped = len(results)
    if progress:
        progress(skipped, len(specs))
    _run_shard_tasks(todo, tok, results, workers, progress, len(specs))
    if todo:  # the manifest goes only over shards this process can see, at their size
        _check_visible(out_loc, results)

    corpus_info = {"source": _describe_source(corpus), "fingerprint": corpus_fp, "files": len(files), "val_fraction": val_fraction}
    by_split = {split: [results[s["name"]] for s in specs if s["split"] == split] for split in plan}
    manifest = _manifest(n_ctx, plan_fp, tok, corpus_info, by_split)
    storage.write_json(out_loc.join(MANIFEST), manifest)
    return PrepareResult(manifest, len(todo), skipped, trained)


def _dataset_tokenizer(out_loc: storage.Location, corpus: str | None, corpus_fp: str, tokenizer: str | None, vocab_size: int,
                       val_fraction: float) -> tuple[tok_lib.BPETokenizer, bool]:
    """The tokenizer of the dataset at ``out_loc`` and whether it was trained now: the one
    given (saved into OUT/tokenizer, or the same as the one already there), else the one
    already in the output (trained on this corpus), else one trained now."""
    tok_loc = out_loc.join(TOKENIZER_DIR)
    if tokenizer is not None:
        tok = sources.load_tokenizer(tokenizer)
        if storage.exists(tok_loc.join(tok_lib.META_FILE)):
            existing = sources.load_tokenizer(tok_loc.uri)
            if existing.fingerprint != tok.fingerprint:
                raise DataError(f"{out_loc.uri} already holds shards of another tokenizer; choose a new --out or delete it")
        else:
            sources.save_tokenizer(tok, tok_loc)
        return tok, False
    if storage.exists(tok_loc.join(tok_lib.META_FILE)):
        tok = sources.load_tokenizer(tok_loc.uri)
        if tok.meta.get("corpus_fingerprint") != corpus_fp:
            raise DataError(f"{out_loc.uri} already holds a tokenizer trained on another corpus; choose a new --out, pass --tokenizer, or delete it")
        return tok, False
    tok, _ = sources.build_tokenizer(corpus, vocab_size=vocab_size, val_fraction=val_fraction)
    sources.save_tokenizer(tok, tok_loc)
    return tok, True


def _shard_specs(plan: dict[str, list[list[CorpusFile]]], out_loc: storage.Location, n_ctx: int, tok_fp: str) -> list[dict]:
    """One spec per planned shard: what :func:`shards.write_shard` is given."""
    specs = []
    for split, groups in plan.items():
        for i, group in enumerate(groups):
            specs.append(
                {
                    "out": out_loc.uri,
                    "name": shards.shard_name(split, i),
                    "split": split,
                    "n_ctx": n_ctx,
                    "files": [vars(f) for f in group],
                    "plan": _spec_fingerprint(split, i, group, n_ctx, tok_fp),
                }
            )
    return specs


def _finished_manifest(out_loc: storage.Location, plan_fp: str, present: dict[str, int]) -> dict | None:
    """The manifest of a dataset already finished with this plan and every shard in place;
    None when there is none. A dataset of another plan is refused."""
    manifest_loc = out_loc.join(MANIFEST)
    if not storage.exists(manifest_loc):
        return None
    old = storage.read_json(manifest_loc)
    if old.get("plan_fingerprint") != plan_fp:
        raise DataError(
            f"{out_loc.uri} already holds a dataset made from another corpus, tokenizer or --n-ctx; choose a new --out or delete it"
        )
    if all(shards.intact(out_loc, s, present) for split in old["splits"].values() for s in split["shards"]):
        return old
    # A shard of a finished dataset is gone or resized: withdraw the manifest (its
    # presence means complete) and rewrite what is missing.
    storage.remove(manifest_loc)
    return None


def _resume(out_loc: storage.Location, specs: list[dict], present: dict[str, int]) -> tuple[dict[str, dict], list[dict]]:
    """(done, todo): shards whose marker carries this plan, and whose file is there at the
    size the marker recorded, are done ({name: marker}); the others are to write."""
    results: dict[str, dict] = {}
    todo = []
    for s in specs:
        marker = shards.marker(out_loc, s["name"])
        done = storage.read_json(marker) if storage.exists(marker) else None
        if done is not None and done.get("plan") == s["plan"] and shards.intact(out_loc, done, present):
            results[s["name"]] = done
        else:
            todo.append(s)
    return results, todo


def _check_visible(out_loc: storage.Location, results: dict[str, dict]) -> None:
    """Every shard the Ray tasks wrote is at ``out_loc`` as this process sees it, at its size."""
    present = storage.sizes(out_loc, suffix=".parquet")
    lost = [r["path"] for r in results.values() if not shards.intact(out_loc, r, present)]
    if lost:
        raise DataError(
            f"{len(lost)} shard(s) written by Ray tasks are not at {out_loc.uri} ({', '.join(sorted(lost)[:3])}): "
            "the tasks wrote somewhere this process cannot see (a local --out on several nodes?); use s3:// or a shared filesystem",
            exit_code=RUNTIME,
        )


def _split_summary(written: list[dict]) -> dict:
    """A split's entry in the manifest, from its shards' markers."""
    skipped_files: dict[str, int] = {}
    for r in written:
        for k, v in r["skipped"].items():
            skipped_files[k] = skipped_files.get(k, 0) + v
    return {
        "shards": [{k: r[k] for k in SHARD_KEYS if k in r} for r in written],
        "sequences": sum(r["sequences"] for r in written),
        "tokens": sum(r["tokens"] for r in written),
        "dropped_tokens": sum(r["dropped_tokens"] for r in written),
        "documents": sum(r["documents"] for r in written),
        "skipped_files": skipped_files,
    }


def _manifest(n_ctx: int, plan_fp: str, tok: tok_lib.BPETokenizer, corpus_info: dict, by_split: dict[str, list[dict]]) -> dict:
    """The manifest of a finished dataset (``by_split``: each split's shard markers, in order)."""
    per_split = {split: _split_summary(written) for split, written in by_split.items()}
    warnings = [f"split {s!r} has no sequences; raise --val-fraction or use a larger corpus" for s, v in per_split.items() if v["sequences"] == 0]
    return {
        "format_version": shards.FORMAT_VERSION,
        "n_ctx": n_ctx,
        "seq_len": n_ctx + 1,
        "plan_fingerprint": plan_fp,
        "tokenizer": {
            "path": TOKENIZER_DIR,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.n_vocab,
            "eot_id": tok.eot_id,
        },
        "corpus": corpus_info,
        "splits": per_split,
        "warnings": warnings,
    }


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
    task = ray.remote(num_cpus=1, max_retries=2)(shards.write_shard)
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
    except CorruptFileError as e:  # damaged, like a corrupt shard: the dataset, not the command (exit 1)
        raise CorruptFileError(f"{m.uri} is damaged ({one_line(str(e).split(': ', 1)[-1], 120)}); delete it and re-run `csp data prepare --out {loc.uri}` "
                               "to rewrite it (finished shards are kept)") from None
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
        tok = sources.load_tokenizer(loc.join(tok_path).uri)
        if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
            problems.append({"path": tok_path, "problem": "tokenizer differs from the one the shards were made with (fingerprint)"})
    except CspError as e:
        problems.append({"path": tok_path, "problem": str(e)})
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    present = storage.sizes(loc, suffix=".parquet")
    for i, entry in enumerate(entries):
        found = shards.shard_problems(loc, entry, present, manifest["n_ctx"])
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


def load_rows(uri: str, split: str = "train", max_rows: int | None = None):
    """A split's token rows as one (n, n_ctx+1) uint16 array, in manifest order."""
    import numpy as np

    rows = []
    n = 0
    for shard in shard_uris(uri, split):
        arr = shards.read_shard(shard)
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


def sample_rows(uri: str, n: int, seed: int = 0, splits: tuple[str, ...] = ("train", "val")):
    """``n`` token rows drawn uniformly, without replacement, from every shard of ``splits``
    (the whole corpus by default), as an (n, n_ctx+1) uint16 array in corpus order; reads only
    the shards a drawn row lies in (the manifest's row counts place the draws)."""
    import numpy as np

    manifest, loc = read_manifest(uri), storage.resolve(uri)
    shard_list = [s for sp in splits for s in manifest["splits"].get(sp, {}).get("shards", [])]
    counts = np.array([s["sequences"] for s in shard_list], dtype=np.int64)
    if counts.sum() == 0:
        raise DataError(f"{loc.uri} has no sequences in {', '.join(splits)}; prepare a larger corpus")
    picks = np.sort(np.random.default_rng(seed).choice(int(counts.sum()), size=min(n, int(counts.sum())), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i, shard in enumerate(shard_list):
        mine = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
        if len(mine):
            out.append(shards.read_shard(loc.join(shard["path"]).uri)[mine])
    return np.concatenate(out)
