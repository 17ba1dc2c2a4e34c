"""A dataset's sources wherever they are stored: the corpus and the tokenizer.

A corpus is None (this Python's stdlib), a local directory / glob / file, or a storage URI
prefix of .py files; :func:`list_corpus` lists it with a fingerprint of its names and
contents, :func:`read_corpus_file` reads one file of it (sparsity/corpus.py does the local
work, this module adds storage URIs). A tokenizer is a directory or prefix holding its
files, or a dataset's ``tokenizer/`` sub-directory; :func:`build_tokenizer` trains one on
a corpus's train split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cluster import storage
from cluster.storage_errors import StorageError
from sparsity import corpus as corpus_lib
from sparsity import tokenizer as tok_lib
from sparsity.errors import CspError

TOKENIZER_DIR = "tokenizer"  # DATASET/tokenizer/: the tokenizer a dataset's shards were made with


class DataError(CspError):
    """A dataset, its corpus or its tokenizer is missing, empty or not the one expected."""


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
    except StorageError:
        stats.skipped["unreadable"] += 1
        return None
    return corpus_lib.decode_counted(data, stats)


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
