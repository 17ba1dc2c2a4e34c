"""Named hook points: record and replace activations by name, free when unused.

Every node location of the model passes its tensor through ``hooks(name, x)``; with no
recorder or replacement active that is one attribute check. Names follow one scheme
(the reference's):

    {i}.resid_in     (B, T, d_model)   residual stream entering block i
    {i}.attn.act_in  (B, T, d_model)   normalised residual read by attention (after AbsTopK)
    {i}.attn.q/k/v   (B, T, n_head·d_head)  query/key/value channels (after AbsTopK)
    {i}.attn.y       (B, T, n_head·d_head)  attention output channels, before c_proj
    {i}.attn.resid_delta (B, T, d_model)  what attention writes to the residual
    {i}.resid_mid    (B, T, d_model)   residual between attention and MLP
    {i}.mlp.act_in   (B, T, d_model)   normalised residual read by the MLP (after AbsTopK)
    {i}.mlp.post_act (B, T, d_mlp)     MLP neurons after the nonlinearity (after AbsTopK)
    {i}.mlp.resid_delta (B, T, d_model)   what the MLP writes to the residual
    final_resid      (B, T, d_model)   residual before the final norm

Pruning reads and ablates only through these names.

A forward that reads one position per row (``model(idx, at=…)``) runs its last block at
those positions alone, past the keys and values: there a hook point holds (B, 1, width), row
b at position ``hooks.positions[b]`` (None elsewhere). A replacement that depends on the
position (resample ablation) reads it; such a forward never runs while recording.
``GPT.read_pairs`` (prompt pairs that share a prefix) runs its rows packed: there a hook
point before the read positions holds (N, width), the N valid positions of all rows one
after another; replacements that treat every position alike (the pruning gates under mean
or zero ablation) see no difference.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator

import torch

Replacement = Callable[[torch.Tensor], torch.Tensor]


def hook_names(n_layer: int) -> list[str]:
    """Every hook name of an ``n_layer`` model, in forward order."""
    names = []
    for i in range(n_layer):
        names += [f"{i}.resid_in", f"{i}.attn.act_in", f"{i}.attn.q", f"{i}.attn.k", f"{i}.attn.v", f"{i}.attn.y",
                  f"{i}.attn.resid_delta", f"{i}.resid_mid", f"{i}.mlp.act_in", f"{i}.mlp.post_act", f"{i}.mlp.resid_delta"]
    return names + ["final_resid"]


class Hooks:
    """The hook state of one model. Use :meth:`record` and :meth:`replace` as context
    managers; they nest, and always clean up, even when the forward pass raises."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names)
        self._known = frozenset(self.names)
        self.active = False  # the only thing a hook point checks when nothing is attached
        # (B,) while hook points hold one position per row (row b at positions[b]); else None
        self.positions: torch.Tensor | None = None
        self._recorders: list[tuple[re.Pattern | frozenset, dict, bool]] = []
        self._replacements: list[dict[str, Replacement]] = []

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for table in self._replacements:
            fn = table.get(name)
            if fn is not None:
                x = fn(x)
        for match, cache, detach in self._recorders:
            if (name in match) if isinstance(match, frozenset) else match.fullmatch(name):
                cache[name] = x.detach() if detach else x
        return x

    def _resolve(self, names: str | Iterable[str] | None) -> re.Pattern | frozenset:
        if names is None:
            return re.compile(".*")
        if isinstance(names, str):
            return re.compile(names)
        chosen = frozenset(names)
        unknown = sorted(chosen - self._known)
        if unknown:
            raise KeyError(f"unknown hook name(s) {unknown}; see model.hooks.names")
        return chosen

    @property
    def recording(self) -> bool:
        return bool(self._recorders)

    @contextlib.contextmanager
    def at_positions(self, at: torch.Tensor) -> Iterator[None]:
        """Mark the hook points run inside as holding row b's position ``at[b]`` only."""
        before, self.positions = self.positions, at
        try:
            yield
        finally:
            self.positions = before

    def _update(self) -> None:
        self.active = bool(self._recorders or self._replacements)

    @contextlib.contextmanager
    def record(self, names: str | Iterable[str] | None = None, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Record tensors at hook points: ``names`` is a list of names, a regex, or None for all.

        Yields the dict that fills as the forward pass runs. ``detach=False`` keeps the
        autograd graph (for gradients through recorded activations)."""
        entry = (self._resolve(names), {}, detach)
        self._recorders.append(entry)
        self._update()
        try:
            yield entry[1]
        finally:
            self._recorders.remove(entry)
            self._update()

    @contextlib.contextmanager
    def replace(self, fns: dict[str, Replacement]) -> Iterator[None]:
        """Replace tensors at hook points: ``{name: fn(x) -> new x}``."""
        self._resolve(list(fns))
        table = dict(fns)
        self._replacements.append(table)
        self._update()
        try:
            yield
        finally:
            self._replacements.remove(table)
            self._update()


def run_with_cache(model, idx: torch.Tensor, names: str | Iterable[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits, {hook name: activation})`` for one forward pass (TransformerLens-style)."""
    with model.hooks.record(names) as cache:
        logits = model(idx)
    return logits, cache
