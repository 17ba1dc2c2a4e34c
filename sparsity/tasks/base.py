"""The task interface: seeded generators of contrast pairs, and the controls built from them.

A task is a binary next-token choice. Each datapoint is a contrast pair: a ``clean``
prompt whose correct next token is ``target`` and a minimally different ``corrupt``
prompt whose correct next token is ``alt``. Both answers must be single, distinct tokens
of the trained tokenizer at that point (with the reference pat_str a closing quote merges
with what follows, so tasks end prompts where the answer is e.g. ``'\\n`` vs ``"\\n``);
:func:`sparsity.tasks.tensors.encode` checks this and fails with a message naming the tokens.

The task loss of a datapoint is the two-sided binary cross-entropy at each prompt's last
token, on the reference's scale (openai/circuit_sparsity, ``last_token_contrast_loss_fn``):
the *sum* over its two prompts of −log softmax([logit_target, logit_alt])[correct], so
chance is 2·ln 2 ≈ 1.386 and the paper's pruning target 0.15 is 0.075 per prompt.
Train and test datapoints come from disjoint seeds (:data:`TRAIN_SEED`, :data:`TEST_SEED`).

Tokenized (:mod:`sparsity.tasks.tensors`, the only part that needs torch), prompts look like training text: one ``<|endoftext|>`` in front (the separator every file
follows in the token shards), then the prompt's tokens, right-padded to the batch's
longest; each prompt is read at its own last real token. Causal attention never lets a
real position see the padding after it, so a prompt's logits do not depend on the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

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
