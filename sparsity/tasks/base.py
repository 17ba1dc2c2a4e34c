"""The task interface: seeded generators of contrast pairs, tokenized and checked.

A task is a binary next-token choice. Each datapoint is a contrast pair: a ``clean``
prompt whose correct next token is ``target`` and a minimally different ``corrupt``
prompt whose correct next token is ``alt``. Both answers must be single, distinct tokens
of the trained tokenizer at that point (with the reference pat_str a closing quote merges
with what follows, so tasks end prompts where the answer is e.g. ``'\\n`` vs ``"\\n``);
:func:`encode` checks this and fails with a message naming the tokens.

The task loss of a datapoint is the two-sided binary cross-entropy at the last position:
the mean over its two prompts of −log softmax([logit_target, logit_alt])[correct].
Train and test datapoints come from disjoint seeds (:data:`TRAIN_SEED`, :data:`TEST_SEED`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsity.errors import CspError

TRAIN_SEED = 0
TEST_SEED = 1_000_003  # disjoint from every train seed: streams never share a state


class TaskError(CspError):
    pass


@dataclass(frozen=True)
class Pair:
    clean: str
    corrupt: str
    target: str  # the correct completion of `clean` (one token)
    alt: str  # the correct completion of `corrupt` (one token)


@dataclass(frozen=True)
class Task:
    """A named generator of contrast pairs.

    ``complete`` (optional) turns ``clean + target`` into a whole program that ``ast.parse``
    accepts; None for tasks whose prompt is not a finishable statement (documented there).
    """

    name: str
    description: str
    make: Callable[[random.Random], Pair]
    complete: Callable[[str], str] | None = None

    def pairs(self, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Pair]:
        """``n`` distinct pairs from ``random.Random(f"{name}/{seed}")``, none of whose clean
        prompts is in ``exclude`` (so held-out pairs never repeat a training prompt)."""
        rng = random.Random(f"{self.name}/{seed}")
        out, seen = [], set(exclude)
        tries = 0
        while len(out) < n:
            p = self.make(rng)
            tries += 1
            if p.clean not in seen:
                seen.add(p.clean)
                out.append(p)
            elif tries > 50 * n:
                raise TaskError(f"task {self.name} cannot make {n} distinct pairs (made {len(out)})")
        return out


@dataclass
class Batch:
    """Tokenized pairs, left-padded so every prompt's last token is at position -1.

    clean, corrupt: (n, T) int64; target, alt: (n,) token ids. Padding is the EOT token
    before the prompt, where causal attention from the last position sees it as a document
    boundary — the same thing the model saw between files in training.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    target: torch.Tensor
    alt: torch.Tensor
    pairs: list[Pair]


def single_token(tok, text: str, task: str) -> int:
    ids = tok.encode(text)
    if len(ids) != 1:
        pieces = [tok.encoding.decode_single_token_bytes(i) for i in ids]
        raise TaskError(f"task {task}: answer {text!r} is {len(ids)} tokens {pieces} in this tokenizer, not one")
    return ids[0]


def encode(task: Task, tok, n: int, seed: int, max_len: int, exclude: frozenset[str] = frozenset()) -> Batch:
    """Tokenize ``n`` pairs (none with a clean prompt in ``exclude``); check answers are single
    distinct tokens and that each answer is what the tokenizer would emit after the prompt
    (no merge across the boundary)."""
    pairs = task.pairs(n, seed, exclude)
    rows_c, rows_x, tgt, alt = [], [], [], []
    for p in pairs:
        t, a = single_token(tok, p.target, task.name), single_token(tok, p.alt, task.name)
        if t == a:
            raise TaskError(f"task {task.name}: target and alt are the same token {p.target!r}")
        for prompt, ans, ans_id in ((p.clean, p.target, t), (p.corrupt, p.alt, a)):
            ids = tok.encode(prompt)
            if tok.encode(prompt + ans)[: len(ids) + 1] != ids + [ans_id]:
                raise TaskError(f"task {task.name}: {ans!r} after {prompt[-20:]!r} does not tokenize as the prompt's tokens + one answer token")
        c, x = tok.encode(p.clean), tok.encode(p.corrupt)
        if max(len(c), len(x)) > max_len:
            raise TaskError(f"task {task.name}: a prompt is {max(len(c), len(x))} tokens, longer than the model's context {max_len}")
        rows_c.append(c)
        rows_x.append(x)
        tgt.append(t)
        alt.append(a)
    T = max(max(map(len, rows_c)), max(map(len, rows_x)))

    def pad(rows):
        return torch.tensor([[tok.eot_id] * (T - len(r)) + r for r in rows], dtype=torch.long)

    return Batch(pad(rows_c), pad(rows_x), torch.tensor(tgt), torch.tensor(alt), pairs)


def pair_loss(logits_clean: torch.Tensor, logits_corrupt: torch.Tensor, target: torch.Tensor, alt: torch.Tensor) -> torch.Tensor:
    """Per-datapoint two-sided binary CE at the last position: (n,).

    logits_*: (n, T, V) or (n, V) (last position already taken)."""
    lc = logits_clean[:, -1] if logits_clean.dim() == 3 else logits_clean
    lx = logits_corrupt[:, -1] if logits_corrupt.dim() == 3 else logits_corrupt
    two_c = torch.stack([lc.gather(1, target[:, None])[:, 0], lc.gather(1, alt[:, None])[:, 0]], dim=1).float()
    two_x = torch.stack([lx.gather(1, target[:, None])[:, 0], lx.gather(1, alt[:, None])[:, 0]], dim=1).float()
    loss_c = -two_c.log_softmax(1)[:, 0]
    loss_x = -two_x.log_softmax(1)[:, 1]
    return (loss_c + loss_x) / 2


def pair_accuracy(logits_clean, logits_corrupt, target, alt) -> torch.Tensor:
    """(n,) fraction (0, 0.5, 1) of the pair's two prompts answered correctly."""
    lc = logits_clean[:, -1] if logits_clean.dim() == 3 else logits_clean
    lx = logits_corrupt[:, -1] if logits_corrupt.dim() == 3 else logits_corrupt
    ok_c = lc.gather(1, target[:, None])[:, 0] > lc.gather(1, alt[:, None])[:, 0]
    ok_x = lx.gather(1, alt[:, None])[:, 0] > lx.gather(1, target[:, None])[:, 0]
    return (ok_c.float() + ok_x.float()) / 2


@torch.no_grad()
def evaluate(model, task: Task, tok, n: int = 64, seed: int = TEST_SEED) -> dict:
    """Held-out task loss (mean two-sided BCE per pair) and accuracy of a model."""
    dev = next(model.parameters()).device
    b = encode(task, tok, n, seed, model.config.block_size)
    lc, lx = model(b.clean.to(dev), last_only=True)[:, -1], model(b.corrupt.to(dev), last_only=True)[:, -1]
    t, a = b.target.to(dev), b.alt.to(dev)
    return {"task": task.name, "loss": float(pair_loss(lc, lx, t, a).mean()), "accuracy": float(pair_accuracy(lc, lx, t, a).mean()), "n": n}
