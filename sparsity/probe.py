"""Capability measured from outside the training corpus: quote closing on real code.

The tasks (sparsity/tasks) are templates written for this project; a model can learn their
surface and still not have the skill. This probe asks the same question as
``single_double_quote`` — close a string with the quote that opened it — on lines cut from
real Python that is *not* in the corpus: by default the third-party packages installed
beside the running interpreter (site-packages), where the default corpus is the standard
library. Each probe datapoint is a contrast pair, scored like a task:

    clean:   <up to ~max_tokens of the file's preceding lines><line up to its closing quote>
    corrupt: the same text with the string's *opening* quote flipped (' ↔ ")
    answers: ``'\\n`` / ``"\\n`` (single tokens of the csp BPE)

A line qualifies when it ends with a one-line string literal closed right before the
newline (``x = 'abc'``, ``return "name"``, ``f(a, 'key'``), whose body holds no quote or
backslash and ends with a letter or digit (so the closing quote starts its own token), the
code before it holds no quote or ``#``, and the line is not inside a triple-quoted string.
Files are visited in an order fixed by a hash of their relative path and the seed, at most
``per_file`` lines from each, so the probe is spread over many packages and is the same on
every machine with the same packages installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch

from sparsity.tasks.base import Pair, Task
from sparsity.tasks.tensors import encode_pairs, pair_accuracy, pair_loss

NAME = "outside_quote"
_LINE = re.compile(r"""^(?P<head>[^'"#\\\n]*[=(,\[{:]\s*|[^'"#\\\n]*\breturn\s+)(?P<q>['"])(?P<body>[^'"\\\n]*[A-Za-z0-9])(?P=q)$""")
_FLIP = {"'": '"', '"': "'"}


def outside_roots() -> list[Path]:
    """The installed third-party packages of this interpreter (purelib/platlib): Python
    code the default corpus (the standard library) does not contain."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    roots = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p != stdlib and p not in roots:
            roots.append(p)
    return roots


def _files(roots: Iterable[Path], seed: int) -> list[tuple[str, Path]]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in filenames:
                if f.endswith(".py"):
                    p = Path(dirpath, f)
                    out.append((p.relative_to(root).as_posix(), p))
    return sorted(out, key=lambda rp: hashlib.sha256(f"{seed}/{rp[0]}".encode()).digest())


def quote_pairs(tok, n: int = 512, seed: int = 0, max_tokens: int = 96, per_file: int = 2,
                roots: Iterable[Path] | None = None) -> list[Pair]:
    """``n`` probe pairs cut from the files under ``roots`` (default :func:`outside_roots`),
    each prompt at most ``max_tokens`` tokens with its leading ``<|endoftext|>`` (so it fits a
    model of that context). Raises ValueError when the files hold fewer than ``n``."""
    pairs: list[Pair] = []
    seen: set[str] = set()
    for _, path in _files(roots if roots is not None else outside_roots(), seed):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.split("\n")
        got = 0
        triple = 0  # running count of triple quotes before the current line
        for i, line in enumerate(lines):
            before = triple
            triple += line.count('"""') + line.count("'''")
            if before % 2 or i == 0:
                continue
            m = _LINE.match(line)
            if m is None:
                continue
            q, cut = m["q"], line[: m.end("body")]
            start = m.start("q")
            ctx = lines[max(0, i - 40): i]
            flip_line = cut[:start] + _FLIP[q] + cut[start + 1:]
            prompt = flipped = None
            while ctx is not None:
                a, b = "\n".join(ctx + [cut]), "\n".join(ctx + [flip_line])
                if max(len(tok.encode(a)), len(tok.encode(b))) + 1 <= max_tokens:  # + the leading <|endoftext|>
                    prompt, flipped = a, b
                    break
                ctx = ctx[1:] if ctx else None
            if prompt is None or prompt in seen:
                continue
            pairs.append(Pair(prompt, flipped, q + "\n", _FLIP[q] + "\n"))
            seen.add(prompt)
            got += 1
            if len(pairs) == n:
                return pairs
            if got >= per_file:
                break
    raise ValueError(f"probe: found {len(pairs)} quote-closing lines outside the corpus, need {n}; "
                     "install more Python packages or ask for fewer pairs")


# A Task only so the pairs go through the tasks' own encoder and its single-token checks.
_TASK = Task(NAME, "Close a string with its opening quote, on real code outside the corpus.", lambda rng: None)


class QuoteProbe:
    """The probe's pairs, tokenized once; :meth:`score` runs a model on them."""

    def __init__(self, tok, n: int = 512, seed: int = 0, max_tokens: int = 96, roots: Iterable[Path] | None = None,
                 pairs: list[Pair] | None = None):
        self.pairs = pairs if pairs is not None else quote_pairs(tok, n, seed, max_tokens, roots=roots)
        self.batch = encode_pairs(_TASK, tok, self.pairs, max_tokens)

    @torch.no_grad()
    def score(self, model, chunk: int = 128) -> dict:
        """Mean two-sided loss (the tasks' scale: chance 1.386) and accuracy over the pairs."""
        was = model.training
        model.eval()
        losses, accs = [], []
        for s in range(0, len(self.batch), chunk):
            b = self.batch.subset(torch.arange(s, min(s + chunk, len(self.batch))))
            lc, lx = b.answer_logits(model)
            t, a = b.target.to(lc.device), b.alt.to(lc.device)
            losses.append(pair_loss(lc, lx, t, a))
            accs.append(pair_accuracy(lc, lx, t, a))
        model.train(was)
        loss, acc = torch.cat(losses), torch.cat(accs)
        return {"probe": NAME, "loss": float(loss.mean()), "accuracy": float(acc.mean()), "n": len(self.pairs)}
