"""Hand-crafted next-token tasks (contrast pairs) for pruning models to circuits.

``REGISTRY`` maps each of the 20 task names to its :class:`Task`; :func:`get` looks one up.
"""

from __future__ import annotations

from sparsity.tasks.base import (
    CHANCE_LOSS,
    TEST_SEED,
    TRAIN_SEED,
    Batch,
    Pair,
    Task,
    TaskError,
    encode,
    encode_pairs,
    evaluate,
    nonsense,
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
    "nonsense",
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
