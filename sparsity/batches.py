"""Deterministic, random-access batches over in-memory token rows.

``batches(i)`` is a pure function of the batch index, so a run's data position is one
integer: a resumed run asks for batch i and gets exactly what the uninterrupted run got.
Ranks take interleaved global batch indices, so what each rank sees is disjoint.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsity.errors import ConfigError


class TokenRows:
    """Batches of ``batch_size`` rows from an (N, T+1) token array, reshuffled each epoch.

    Global batch g = i·world + rank lives in epoch g // per_epoch, at slot g % per_epoch of
    that epoch's permutation (seeded by ``seed`` and the epoch). The last partial batch
    of an epoch is dropped.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise ConfigError(f"token rows must be a 2-D array of (n, T+1) ids, got shape {rows.shape}")
        if not 0 <= rank < world:
            raise ConfigError(f"rank={rank} out of range: must be in [0, world={world})")
        self.rows = rows
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_epoch = len(rows) // batch_size
        if self.per_epoch < 1:
            raise ConfigError(f"batch_size={batch_size} out of range: the data has only {len(rows)} sequences")
        self._perm_epoch, self._perm = -1, None

    def indices(self, i: int) -> np.ndarray:
        """Row indices of this rank's batch i."""
        g = i * self.world + self.rank
        epoch, slot = divmod(g, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self._perm[slot * self.batch_size : (slot + 1) * self.batch_size]

    def __call__(self, i: int) -> torch.Tensor:
        """Batch i as int64 token ids of shape (batch_size, T+1)."""
        return torch.from_numpy(self.rows[self.indices(i)].astype(np.int64))


class FixedBatches:
    """The first ``n`` batches of rows in order (for validation: the same every time)."""

    def __init__(self, rows: np.ndarray, batch_size: int, n: int):
        self.rows, self.batch_size = rows, batch_size
        self.n = min(n, max(1, len(rows) // batch_size)) if len(rows) else 0

    def __iter__(self):
        for j in range(self.n):
            yield torch.from_numpy(self.rows[j * self.batch_size : (j + 1) * self.batch_size].astype(np.int64))
