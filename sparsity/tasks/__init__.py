"""Hand-crafted next-token tasks (contrast pairs) for pruning models to circuits.

``REGISTRY`` maps each of the 20 task names to its :class:`Task`; :func:`get` looks one up.
"""

from __future__ import annotations

from sparsity.tasks.base import (
    CHANCE_LOSS,
    NONSENSE_RULES,
    TEST_SEED,
    TRAIN_SEED,
    Batch,
    Pair,
    Task,
    TaskError,
    answer_set,
    encode,
    encode_pairs,
    evaluate,
    fixed_answers,
    nonsense,
    nonsense_fixed,
    nonsense_swap,
    pair_accuracy,
    pair_loss,
)
from sparsity.tasks.suite import REGISTRY


def get(name: str) -> Task:
    """The task called ``name``; TaskError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(REGISTRY)}") from None


__all__ = [
    "CHANCE_LOSS",
    "encode_pairs",
    "NONSENSE_RULES",
    "answer_set",
    "fixed_answers",
    "nonsense",
    "nonsense_fixed",
    "nonsense_swap",
    "evaluate",
    "REGISTRY",
    "TEST_SEED",
    "TRAIN_SEED",
    "Batch",
    "Pair",
    "Task",
    "TaskError",
    "encode",
    "get",
    "pair_accuracy",
    "pair_loss",
]
