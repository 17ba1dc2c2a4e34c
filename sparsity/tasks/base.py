"""The task interface: seeded generators of contrast pairs, tokenized and checked.

A task is a binary next-token choice. Each datapoint is a contrast pair: a ``clean``
prompt whose correct next token is ``target`` and a minimally different ``corrupt``
prompt whose correct next token is ``alt``. Both answers must be single, distinct tokens
of the trained tokenizer at that point (with the reference pat_str a closing quote merges
with what follows, so tasks end prompts where the answer is e.g. ``'\\n`` vs ``"\\n``);
:func:`encode` checks this and fails with a message naming the tokens.

The task loss of a datapoint is the two-sided binary cross-entropy at each prompt's last
token, on the reference's scale (openai/circuit_sparsity, ``last_token_contrast_loss_fn``):
the *sum* over its two prompts of −log softmax([logit_target, logit_alt])[correct], so
chance is 2·ln 2 ≈ 1.386 and the paper's pruning target 0.15 is 0.075 per prompt.
Train and test datapoints come from disjoint seeds (:data:`TRAIN_SEED`, :data:`TEST_SEED`).

Prompts look like training text: one ``<|endoftext|>`` in front (the separator every file
follows in the token shards), then the prompt's tokens, right-padded to the batch's
longest; each prompt is read at its own last real token. Causal attention never lets a
real position see the padding after it, so a prompt's logits do not depend on the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsity.config import CHANCE_LOSS  # noqa: F401  (2 ln 2, re-exported: the scale of every task loss)
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

    def pairs(self, n: int, seed: int, exclude: frozenset[str] = frozenset(), at_least: int | None = None) -> list[Pair]:
        """``n`` distinct pairs from ``random.Random(f"{name}/{seed}")``, none of whose clean
        prompts is in ``exclude`` (so held-out pairs never repeat a training prompt).

        With ``at_least``, fewer than ``n`` are fine once the generator stops finding new
        prompts (a pool for sampling batches from), but never fewer than ``at_least``."""
        rng = random.Random(f"{self.name}/{seed}")
        out, seen = [], set(exclude)
        need = n if at_least is None else at_least
        tries = misses = 0
        while len(out) < n:
            p = self.make(rng)
            tries += 1
            if p.clean not in seen:
                seen.add(p.clean)
                out.append(p)
                misses = 0
                continue
            misses += 1
            if (at_least is not None and misses > 200 and len(out) >= need) or tries > 50 * n:
                if len(out) >= need:
                    break
                raise TaskError(f"task {self.name} cannot make {need} distinct pairs (made {len(out)})")
        return out


# Controls that could succeed: the real task's prompts (Task.pairs seeds the stream by name, so
# each control sees exactly the real task's prompts) with a *consistent* rule for the answers,
# one the model has the features to follow but never learned. Pruning that finds a verified
# circuit for one shows what the mask can make of the model on its own (Drori 2026's
# critique of Gao et al.). A rule that labels pairs at random could never verify, so its
# "pass" would say nothing.
NONSENSE_RULES = ("swap", "fixed")
# Candidates for the fixed-unrelated answers: Python words that no task asks for.
UNRELATED = (" yield", " assert", " nonlocal", " global", " finally", " await", " async", " lambda", " raise",
             " del", " continue", " break", " pass", " import", " class")


def answer_set(task: Task, n: int = 2048) -> tuple[str, ...]:
    """Every answer ``task`` gives (sorted), from ``n`` pairs of each of four streams — the
    train, selection-side and test seeds among them. Name tasks draw from ~80 names, so this
    sees each of them many times over."""
    seen = set()
    for seed in (TRAIN_SEED, TRAIN_SEED + 1, TRAIN_SEED + 2, TEST_SEED):
        for p in task.pairs(n, seed, at_least=1):
            seen.update((p.target, p.alt))
    return tuple(sorted(seen))


def _answer_map(task: Task, answers: tuple[str, ...], image, rule: str) -> Callable[[str], str]:
    def f(a: str) -> str:
        try:
            return image[answers.index(a)]
        except ValueError:
            raise TaskError(f"task {task.name}: answer {a!r} is not among the {len(answers)} answers the {rule} "
                            "control was built from") from None

    return f


def nonsense_swap(task: Task) -> Task:
    """``task`` with every answer replaced by the next one in a fixed cycle of the task's
    answers (:func:`answer_set`): with two answers (a quote, a keyword) every pair's answers
    are exchanged; with many (names) each is replaced by another, the same one wherever it
    occurs. The answer stays a function of the prompt, so a mask could in principle learn it."""
    answers = answer_set(task)
    if len(answers) < 2:
        raise TaskError(f"task {task.name} has a single answer; there is nothing to swap it with")
    swap = _answer_map(task, answers, answers[1:] + answers[:1], "swap")

    def make(rng: random.Random) -> Pair:
        p = task.make(rng)
        return Pair(p.clean, p.corrupt, swap(p.target), swap(p.alt))

    return Task(task.name, f"{task.description} (nonsense control: each answer replaced by the next in a fixed cycle "
                f"of the task's {len(answers)} answers)", make, None)


def fixed_answers(task: Task, tok, n: int = 256) -> tuple[str, str]:
    """The fixed-unrelated control's two answers for ``task`` under ``tok``: the first two
    of :data:`UNRELATED` that are single tokens, that appear in none of ``n`` of the task's
    prompts or answers (train and test streams), and that each tokenize as one answer token
    after every one of those prompts. Deterministic for a task and tokenizer."""
    pairs = task.pairs(n // 2, TRAIN_SEED, at_least=1) + task.pairs(n // 2, TEST_SEED, at_least=1)
    used: set[int] = set()
    prompts = []
    for p in pairs:
        for prompt in (p.clean, p.corrupt):
            ids = tok.encode(prompt)
            used.update(ids)
            prompts.append((prompt, ids))
        used.update(tok.encode(p.target) + tok.encode(p.alt))
    picked = []
    for word in UNRELATED:
        ids = tok.encode(word)
        if len(ids) != 1 or ids[0] in used:
            continue
        if all(tok.encode(prompt + word)[: len(pids) + 1] == pids + ids for prompt, pids in prompts):
            picked.append(word)
        if len(picked) == 2:
            return picked[0], picked[1]
    raise TaskError(f"task {task.name}: fewer than two of the unrelated answer words {', '.join(map(repr, UNRELATED))} "
                    "are single tokens unused by the task in this tokenizer")


def nonsense_fixed(task: Task, tok) -> Task:
    """``task`` with its answers mapped to a fixed pair of unrelated single tokens (x, y)
    (:func:`fixed_answers`): the task's answers (:func:`answer_set`, sorted) alternate
    between x and y, so a task with two answers has one mapped to each in every pair. With
    many answers (names), a pair whose two answers would map to the same token is skipped
    (the stream draws the next), so about half of such a task's pairs remain."""
    x, y = fixed_answers(task, tok)
    answers = answer_set(task)
    fixed = _answer_map(task, answers, tuple(x if i % 2 == 0 else y for i in range(len(answers))), "fixed")

    def make(rng: random.Random) -> Pair:
        for _ in range(1000):
            p = task.make(rng)
            a, b = fixed(p.target), fixed(p.alt)
            if a != b:
                return Pair(p.clean, p.corrupt, a, b)
        raise TaskError(f"task {task.name}: no pair whose answers map to different fixed tokens in 1000 draws")

    return Task(task.name, f"{task.description} (nonsense control: answers mapped to {x!r} / {y!r} by a fixed rule)", make, None)


def nonsense(task: Task, rule: str, tok=None) -> Task:
    """The nonsense control of ``task`` under ``rule`` (one of :data:`NONSENSE_RULES`)."""
    if rule == "swap":
        return nonsense_swap(task)
    if rule == "fixed":
        return nonsense_fixed(task, tok)
    raise TaskError(f"unknown nonsense rule {rule!r}; choose from {', '.join(NONSENSE_RULES)}")


@dataclass
class Batch:
    """Tokenized pairs: ``[EOT] + prompt`` right-padded to the longest in the batch.

    clean, corrupt: (n, T) int64; clean_last, corrupt_last: (n,) position of each prompt's
    last real token (where its answer is read); target, alt: (n,) token ids.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    target: torch.Tensor
    alt: torch.Tensor
    pairs: list[Pair]
    clean_last: torch.Tensor
    corrupt_last: torch.Tensor

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, idx: torch.Tensor) -> Batch:
        """The pairs at ``idx`` (a (m,) index tensor), trimmed to their own longest prompt."""
        idx = idx.cpu()
        cl, xl = self.clean_last[idx], self.corrupt_last[idx]
        return Batch(self.clean[idx, : int(cl.max()) + 1], self.corrupt[idx, : int(xl.max()) + 1], self.target[idx],
                     self.alt[idx], [self.pairs[i] for i in idx.tolist()], cl, xl)

    def answer_logits(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, corrupt) logits at each prompt's last real token: two (n, V) tensors."""
        dev = next(model.parameters()).device
        return (model(self.clean.to(dev), at=self.clean_last.to(dev)),
                model(self.corrupt.to(dev), at=self.corrupt_last.to(dev)))


def single_token(tok, text: str, task: str) -> int:
    ids = tok.encode(text)
    if len(ids) != 1:
        pieces = [tok.encoding.decode_single_token_bytes(i) for i in ids]
        raise TaskError(f"task {task}: answer {text!r} is {len(ids)} tokens {pieces} in this tokenizer, not one")
    return ids[0]


def encode(task: Task, tok, n: int, seed: int, max_len: int, exclude: frozenset[str] = frozenset(),
           at_least: int | None = None) -> Batch:
    """Tokenize ``n`` pairs (none with a clean prompt in ``exclude``; see :meth:`Task.pairs`
    for ``at_least``); check answers are single distinct tokens and that each answer is what
    the tokenizer would emit after the prompt (no merge across the boundary)."""
    return encode_pairs(task, tok, task.pairs(n, seed, exclude, at_least), max_len)


def encode_pairs(task: Task, tok, pairs: list[Pair], max_len: int) -> Batch:
    """Tokenize given pairs of ``task`` (see :func:`encode`)."""
    rows_c, rows_x, tgt, alt = [], [], [], []
    for p in pairs:
        t, a = single_token(tok, p.target, task.name), single_token(tok, p.alt, task.name)
        if t == a:
            raise TaskError(f"task {task.name}: target and alt are the same token {p.target!r}")
        for prompt, ans, ans_id in ((p.clean, p.target, t), (p.corrupt, p.alt, a)):
            ids = tok.encode(prompt)
            if tok.encode(prompt + ans)[: len(ids) + 1] != ids + [ans_id]:
                raise TaskError(f"task {task.name}: {ans!r} after {prompt[-20:]!r} does not tokenize as the prompt's tokens + one answer token")
        c, x = [tok.eot_id] + tok.encode(p.clean), [tok.eot_id] + tok.encode(p.corrupt)
        if max(len(c), len(x)) > max_len:
            raise TaskError(f"task {task.name}: a prompt is {max(len(c), len(x))} tokens, longer than the model's context {max_len}")
        rows_c.append(c)
        rows_x.append(x)
        tgt.append(t)
        alt.append(a)
    def pad(rows):
        # After the last real token: causal attention keeps it out of every real position.
        T = max(map(len, rows))
        return torch.tensor([r + [tok.eot_id] * (T - len(r)) for r in rows], dtype=torch.long)

    def last(rows):
        return torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)

    return Batch(pad(rows_c), pad(rows_x), torch.tensor(tgt), torch.tensor(alt), pairs, last(rows_c), last(rows_x))


def pair_loss(logits_clean: torch.Tensor, logits_corrupt: torch.Tensor, target: torch.Tensor, alt: torch.Tensor) -> torch.Tensor:
    """Per-datapoint two-sided binary CE, summed over the pair's two prompts: (n,).

    logits_*: (n, V) at each prompt's answer position (or (n, T, V): the last position).
    Chance is 2·ln 2 (:data:`CHANCE_LOSS`), the reference's scale."""
    lc = logits_clean[:, -1] if logits_clean.dim() == 3 else logits_clean
    lx = logits_corrupt[:, -1] if logits_corrupt.dim() == 3 else logits_corrupt
    two_c = torch.stack([lc.gather(1, target[:, None])[:, 0], lc.gather(1, alt[:, None])[:, 0]], dim=1).float()
    two_x = torch.stack([lx.gather(1, target[:, None])[:, 0], lx.gather(1, alt[:, None])[:, 0]], dim=1).float()
    loss_c = -two_c.log_softmax(1)[:, 0]
    loss_x = -two_x.log_softmax(1)[:, 1]
    return loss_c + loss_x


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
    b = encode(task, tok, n, seed, model.config.block_size)
    lc, lx = b.answer_logits(model)
    t, a = b.target.to(lc.device), b.alt.to(lc.device)
    return {"task": task.name, "loss": float(pair_loss(lc, lx, t, a).mean()), "accuracy": float(pair_accuracy(lc, lx, t, a).mean()), "n": n}
