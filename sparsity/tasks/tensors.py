"""Tasks as tensors: contrast pairs tokenized and checked, batched for a model, and scored.

The pairs themselves, the seeds and the controls are in :mod:`sparsity.tasks.base` (no
torch there, so listing or showing tasks loads no model code); the loss's scale is
described there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsity.tasks.base import TEST_SEED, Pair, Task, TaskError


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
