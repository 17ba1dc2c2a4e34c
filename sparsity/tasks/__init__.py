"""Hand-crafted next-token tasks (contrast pairs) for pruning models to circuits.

``REGISTRY`` maps each of the 20 task names to its :class:`Task`; :func:`get` looks one up.
The pairs, seeds and controls (:mod:`sparsity.tasks.base`, :mod:`sparsity.tasks.suite`)
load without torch, so listing and showing tasks stays fast; the tensor side — ``encode``,
``Batch``, ``pair_loss``, ``evaluate`` (:mod:`sparsity.tasks.tensors`) — is imported on
first use.
"""

from __future__ import annotations

import importlib

from sparsity.tasks.base import (
    CHANCE_LOSS,
    NONSENSE_RULES,
    TEST_SEED,
    TRAIN_SEED,
    Pair,
    Task,
    TaskError,
    answer_set,
    fixed_answers,
    nonsense,
    nonsense_fixed,
    nonsense_swap,
)
from sparsity.tasks.suite import REGISTRY

_TENSORS = ("Batch", "encode", "encode_pairs", "evaluate", "pair_accuracy", "pair_loss", "single_token")


def __getattr__(name: str):
    if name in _TENSORS:
        return getattr(importlib.import_module("sparsity.tasks.tensors"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> Task:
    """The task called ``name``; TaskError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(REGISTRY)}") from None


__all__ = [
    "CHANCE_LOSS",
    "NONSENSE_RULES",
    "REGISTRY",
    "TEST_SEED",
    "TRAIN_SEED",
    "Pair",
    "Task",
    "TaskError",
    "answer_set",
    "fixed_answers",
    "get",
    "nonsense",
    "nonsense_fixed",
    "nonsense_swap",
    *_TENSORS,
]
