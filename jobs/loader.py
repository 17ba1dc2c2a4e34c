"""One way to open a trained checkpoint for use: the model, the tokenizer of the data it
was trained on, and that dataset's URI — shared by pruning (jobs/prune_pairs.py), the prune
fan-out (jobs/fanout.py) and circuit diagrams (jobs/viz.py).

The dataset is the one ``--data`` names, else the one the run's run.json records; the
tokenizer is ``--tokenizer``'s, else the dataset's, and must match the model's vocabulary.
:func:`cached` keeps one opened checkpoint resident per process (a Ray worker pruning
many tasks of one model loads it once; moving to the next model frees the last).
"""

from __future__ import annotations

from typing import TypeVar

from cluster import checkpoints, sources
from sparsity.errors import CspError


class LoadError(CspError):
    pass


class LoadedModel:
    """A checkpoint opened on ``device``: ``ckpt``, ``model`` (eval mode), ``tok`` (None
    only when ``need_tokenizer`` is False and no dataset is known) and ``data_uri``."""

    def __init__(self, ckpt_uri: str, data_uri: str | None = None, tokenizer_uri: str | None = None, device: str = "cpu",
                 need_tokenizer: bool = True):
        self.ckpt_uri, self.device = ckpt_uri, device
        self.ckpt = checkpoints.load(ckpt_uri, with_train_state=False)
        self.data_uri = data_uri or checkpoints.run_data_uri(ckpt_uri)
        src = tokenizer_uri or self.data_uri
        if src is None and need_tokenizer:
            raise LoadError(f"no tokenizer for {ckpt_uri}: its run.json names no dataset; pass --data (or --tokenizer)")
        self.tok = sources.load_tokenizer(src) if src else None
        if self.tok is not None and self.tok.n_vocab != self.ckpt.config.model.vocab_size:
            raise LoadError(f"tokenizer has {self.tok.n_vocab} ids but the model's vocab_size is {self.ckpt.config.model.vocab_size}")
        self.model = self.ckpt.build_model(device)


L = TypeVar("L", bound=LoadedModel)
_RESIDENT: dict[tuple, LoadedModel] = {}


def cached(ckpt_uri: str, data_uri: str | None = None, kind: type[L] = LoadedModel, **kw) -> L:
    """``kind(ckpt_uri, data_uri, **kw)``, reused while the same arguments come back; one
    checkpoint is resident per process at a time."""
    key = (kind, ckpt_uri, data_uri, tuple(sorted(kw.items())))
    if key not in _RESIDENT:
        _RESIDENT.clear()
        _RESIDENT[key] = kind(ckpt_uri, data_uri, **kw)
    return _RESIDENT[key]  # type: ignore[return-value]
