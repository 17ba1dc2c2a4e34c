"""Python source corpora: list files, read them safely, split train/val by path hash.

The embedded default is the running interpreter's standard library (about 1,800 files,
31 MB on CPython 3.11): real code that ships with every Python, so nothing is downloaded.
Reading from a storage URI (s3://…) lives in cluster/; this module is local-only so a
notebook can use it without Ray or S3.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sparsity.errors import CorpusError

# ~2% of files go to validation: enough held-out code (~600k tokens on the stdlib) for a
# stable val loss, small enough not to starve training.
DEFAULT_VAL_FRACTION = 0.02

# Third-party packages installed into the interpreter are not the stdlib and differ per
# machine; excluding them keeps the default corpus identical wherever CPython 3.11 runs.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: ``path`` to open it, ``rel`` (relative to the corpus root) to name it.

    ``rel`` drives the split and the fingerprint, so the same corpus splits the same way on
    every machine whatever its install prefix.
    """

    path: str
    rel: str


@dataclass
class CorpusStats:
    """What reading a corpus did: files and bytes read, and files skipped by reason."""

    files: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def merge(self, other: CorpusStats) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.skipped.update(other.skipped)

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "skipped": dict(sorted(self.skipped.items()))}


def default_corpus_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def list_files(source: str | os.PathLike | None = None) -> list[SourceFile]:
    """Every ``.py`` file of ``source``, sorted by relative path.

    ``source`` is a directory (searched recursively), a glob pattern (``**`` allowed), a
    single file, or None for the standard library. A path that exists is taken literally
    (a directory named ``corpus [v1]`` is that directory); only one that does not is a
    glob. Raises CorpusError when the source does not exist or holds no Python file.
    """
    if source is None:
        root = default_corpus_root()
        paths = _walk(root)
    else:
        src = os.fspath(source)
        fixed, rest = _glob_split(src) if _is_glob(src) else (src, "")
        if os.path.isdir(src):
            root = Path(src)
            paths = _walk(root)
        elif os.path.isfile(src):
            root = Path(src).parent
            paths = [Path(src)]
        elif rest:
            root = Path(fixed)
            pattern = os.path.join(glob.escape(fixed), rest)  # the literal part may hold [ ] * ? too
            paths = [Path(p) for p in glob.glob(pattern, recursive=True) if p.endswith(".py") and os.path.isfile(p)]
        else:
            raise CorpusError(f"corpus not found: {src!r} is neither a directory, a file nor a glob; pass an existing path")
    files = [SourceFile(str(p.resolve()), p.resolve().relative_to(root.resolve()).as_posix()) for p in paths]
    if not files:
        raise CorpusError(f"corpus is empty: no .py files under {os.fspath(source or root)!r}; point --corpus at Python source")
    return sorted(files, key=lambda f: f.rel)


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        out.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return out


def _glob_split(pattern: str) -> tuple[str, str]:
    """``(root, rest)``: the longest leading directory of a glob pattern taken literally —
    parts with no wildcard, or naming a directory that exists as written — and the
    pattern below it ("" when nothing is left to match)."""
    parts = Path(pattern).parts
    n = 0
    while n < len(parts) and (not _is_glob(parts[n]) or os.path.isdir(os.path.join(*parts[: n + 1]))):
        n += 1
    return (os.path.join(*parts[:n]) if n else "."), (os.path.join(*parts[n:]) if n < len(parts) else "")


def decode_source(data: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for UTF-8 source, ``(None, reason)`` for what a corpus must skip."""
    if b"\x00" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not_utf8"


def read_source(path: str, stats: CorpusStats | None = None) -> str | None:
    """The text of one file, or None (counted in ``stats``) when unreadable or not UTF-8 text."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        if stats is not None:
            stats.skipped["unreadable"] += 1
        return None
    return decode_counted(data, stats)


def decode_counted(data: bytes, stats: CorpusStats | None = None) -> str | None:
    """:func:`decode_source`'s text, the file counted in ``stats`` as read (files, bytes) or
    skipped (by reason)."""
    text, reason = decode_source(data)
    if stats is not None:
        if text is None:
            stats.skipped[reason] += 1
        else:
            stats.files += 1
            stats.bytes += len(data)
    return text


def iter_texts(files: Iterable[SourceFile], stats: CorpusStats | None = None) -> Iterator[str]:
    """Texts of the readable files, in order; skipped files are counted, never raised."""
    for f in files:
        text = read_source(f.path, stats)
        if text is not None:
            yield text


def split_of(rel: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for a file, a pure function of its relative path.

    The first 8 bytes of sha256(rel) as a fraction in [0, 1): stable across machines,
    Python versions and hash seeds (unlike ``hash()``).
    """
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def split_files(files: Iterable[SourceFile], val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, list[SourceFile]]:
    """``{"train": [...], "val": [...]}`` by :func:`split_of`."""
    out: dict[str, list[SourceFile]] = {"train": [], "val": []}
    for f in files:
        out[split_of(f.rel, val_fraction)].append(f)
    return out


def fingerprint(files: Iterable[SourceFile]) -> str:
    """sha256 over (relative path, content) of every file: changes when any file does."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.rel.encode("utf-8") + b"\0")
        try:
            with open(f.path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        except OSError:
            h.update(b"unreadable")
    return h.hexdigest()
