"""A 2048-token byte-level BPE for Python code, trained locally and loaded as tiktoken.

Training uses rustbpe (Rust, ~1.5 s on the 31 MB stdlib on 2 cores), which exports
tiktoken ranks directly; inference uses ``tiktoken.Encoding`` built from the ranks we read
ourselves (tiktoken's own loader caches by path, so a rebuilt file could come back stale).

On disk a tokenizer is two files in one directory:
  tokenizer.tiktoken  tiktoken's format: ``base64(token_bytes) rank`` per line, rank order
  tokenizer.json      pat_str, special tokens, vocab size, fingerprints, trainer version
Both are byte-identical for the same corpus: no timestamps, sorted keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from sparsity.errors import TokenizerError

# The reference tokenizer's split pattern (circuit_sparsity). Unlike GPT-4's it keeps
# contractions out and lets punctuation absorb trailing newlines and slashes, so a closing
# quote merges with what follows ('\n, ',) — the tasks rely on exactly this.
PAT_STR = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# 2048 as in the paper: small enough that every token of a circuit can be listed.
DEFAULT_VOCAB_SIZE = 2048
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BPETokenizer:
    """A trained tokenizer: the tiktoken Encoding plus what it was built from."""

    encoding: tiktoken.Encoding
    meta: dict

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def fingerprint(self) -> str:
        """sha256 of the ranks file: two tokenizers with equal fingerprints encode alike."""
        return self.meta["ranks_sha256"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def to_files(self) -> dict[str, bytes]:
        """``{file name: bytes}`` of the on-disk form."""
        ranks = _ranks_bytes(self.encoding._mergeable_ranks)
        meta = json.dumps(self.meta, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        return {RANKS_FILE: ranks, META_FILE: meta}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write both files into ``directory`` (created), each via temp file + rename."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            tmp = d / f".{name}.tmp-{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, d / name)
        return d


def _ranks_bytes(ranks: dict[bytes, int]) -> bytes:
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def train(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus_fingerprint: str = "",
    name: str = "csp-bpe",
) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` with :data:`PAT_STR`.

    Ids 0..vocab_size-2 are the 256 bytes and the learned merges; ``<|endoftext|>`` is the
    last id (2047 by default). Raises TokenizerError when the corpus is too small to learn
    that many merges.
    """
    import rustbpe  # Rust extension: imported here so loading a tokenizer never needs it

    if not 258 <= vocab_size <= 65536:
        raise TokenizerError(f"vocab_size={vocab_size} out of range: must be in [258, 65536] (256 bytes + ≥1 merge + <|endoftext|>; ids stored as uint16)")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size=vocab_size - 1, pattern=PAT_STR)
    ranks = dict(trainer.get_mergeable_ranks())
    if len(ranks) != vocab_size - 1:
        raise TokenizerError(
            f"corpus too small: learned {len(ranks)} tokens but vocab_size={vocab_size} needs {vocab_size - 1}; use a larger corpus or a smaller vocab_size"
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "pat_str": PAT_STR,
        "special_tokens": {EOT: vocab_size - 1},
        "vocab_size": vocab_size,
        "corpus_fingerprint": corpus_fingerprint,
        "trainer": f"rustbpe {_version('rustbpe')}",
        "ranks_sha256": hashlib.sha256(_ranks_bytes(ranks)).hexdigest(),
    }
    return _build(ranks, meta)


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _build(ranks: dict[bytes, int], meta: dict) -> BPETokenizer:
    enc = tiktoken.Encoding(
        name=meta["name"],
        pat_str=meta["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=dict(meta["special_tokens"]),
    )
    if enc.n_vocab != meta["vocab_size"]:
        raise TokenizerError(f"tokenizer has {enc.n_vocab} ids but its metadata says vocab_size={meta['vocab_size']}; rebuild it")
    return BPETokenizer(enc, meta)


def from_files(files: dict[str, bytes], where: str = "tokenizer") -> BPETokenizer:
    """Rebuild a tokenizer from the bytes of its two files; ``where`` names it in errors."""
    try:
        ranks_data, meta_data = files[RANKS_FILE], files[META_FILE]
    except KeyError as e:
        raise TokenizerError(f"{where}: missing {e.args[0]}; build one with `csp tokenizer build`") from None
    try:
        meta = json.loads(meta_data)
        required = {"pat_str", "special_tokens", "vocab_size", "ranks_sha256", "name"}
        if not isinstance(meta, dict) or not required <= meta.keys():
            raise ValueError(f"needs keys {sorted(required)}")
    except ValueError as e:
        raise TokenizerError(f"{where}/{META_FILE} is not valid tokenizer metadata ({e}); rebuild it with `csp tokenizer build`") from None
    if hashlib.sha256(ranks_data).hexdigest() != meta["ranks_sha256"]:
        raise TokenizerError(f"{where}/{RANKS_FILE} does not match the sha256 in {META_FILE} (truncated or edited); rebuild it")
    ranks: dict[bytes, int] = {}
    try:
        for line in ranks_data.splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        raise TokenizerError(f"{where}/{RANKS_FILE} is malformed; rebuild it with `csp tokenizer build`") from None
    return _build(ranks, meta)


def load(directory: str | os.PathLike) -> BPETokenizer:
    """Load a tokenizer saved by :meth:`BPETokenizer.save` from a local directory."""
    d = Path(directory)
    files = {}
    for name in (RANKS_FILE, META_FILE):
        p = d / name
        if p.is_file():
            files[name] = p.read_bytes()
    if not files:
        raise TokenizerError(f"no tokenizer at {os.fspath(directory)!r}: expected {RANKS_FILE} and {META_FILE}; build one with `csp tokenizer build`")
    return from_files(files, where=os.fspath(directory))
