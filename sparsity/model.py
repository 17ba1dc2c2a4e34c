"""The weight-sparse GPT (docs/design.md, "The model"; Gao et al. 2025 §2).

Pre-norm GPT with RMSNorm, GELU MLP, Linear biases, an untied unembedding, d_head
decoupled from d_model, a fused c_attn, learned position embeddings; AbsTopK activation
sparsity at up to 8 locations; optional dense bigram logit table and per-head attention
sink. Module and parameter names match the reference (openai/circuit_sparsity) so a state
dict moves between the two unchanged. Every node location is a named hook point
(sparsity/hooks.py). Weight sparsity is applied from outside, by sparsity/topk.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsity import skip
from sparsity.abstopk import (
    abs_topk,  # noqa: F401  (re-exported)
    abs_topk_parts_,  # called through this module: tests and benchmarks swap it
)
from sparsity.config import ModelConfig
from sparsity.hooks import Hooks, hook_names


class _Sparsifier:
    """AbsTopK at the configured locations; identity elsewhere. Each input is a fresh
    activation that nothing else reads, so AbsTopK runs in place where it can."""

    def __init__(self, cfg: ModelConfig):
        self.k = {loc: int(cfg.afrac * dim) for loc, dim in cfg.loc_dims().items() if loc in cfg.loctypes}  # none when AbsTopK is off
        self.k_qkv = tuple(self.k.get(loc) for loc in ("attn_q", "attn_k", "attn_v"))

    def __call__(self, loc: str, x: torch.Tensor) -> torch.Tensor:
        k = self.k.get(loc)
        return x if k is None else abs_topk_parts_(x, (k,))[0]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_attn's output split into q, k, v, each after its AbsTopK."""
        return abs_topk_parts_(x, self.k_qkv)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k and v part of c_attn's output, each after its AbsTopK."""
        return abs_topk_parts_(x, self.k_qkv[1:])


class AttentionSink(nn.Module):
    """Causal attention with one extra, always-visible key slot per head whose value is
    zero and whose logit is a learned scalar: a head can attend "nowhere"."""

    def __init__(self, n_head: int):
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                visible: torch.Tensor | None = None) -> torch.Tensor:
        # q: (B, H, Tq, D); k, v: (B, H, T, D); visible: which keys each query may see,
        # broadcastable to (B, H, Tq, T) (default: causal, Tq = T)
        T = k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, T)
        if visible is None:
            visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = self.sink_logit.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # (B, H, T, 1)
        probs = torch.cat([sink, scores], dim=-1).softmax(dim=-1)[..., 1:]  # drop the sink: its value is 0
        return probs @ v


class Packed:
    """R rows of different lengths held as their valid positions alone: (N, width), row
    after row, N = Σ lengths. Everything in a block but attention's mixing works position by
    position (norms, projections, AbsTopK, the MLP, every hook point), so on packed rows it
    skips the padding that a (R, T, width) grid of prompts of mixed lengths carries (a quarter
    of the positions of a pruning batch, over the 20 tasks); attention gets the grid from
    :meth:`grid`, zeros at the padding, which no query at a valid position can see."""

    def __init__(self, lengths: torch.Tensor, T: int):
        self.R, self.T = lengths.shape[0], T
        valid = torch.arange(T, device=lengths.device) < lengths[:, None]  # (R, T)
        self.index = valid.reshape(-1).nonzero().squeeze(1)  # (N,): each packed row's place in the R·T grid
        self.row, self.pos = self.index.div(T, rounding_mode="floor"), self.index.remainder(T)  # (N,) each: its row, its place in it
        self.offset = torch.cumsum(lengths, 0) - lengths  # (R,): where each row starts among the packed rows

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, w) → (R, T, w), zeros at the padding."""
        return x.new_zeros(self.R * self.T, x.shape[-1]).index_copy(0, self.index, x).view(self.R, self.T, -1)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T, w) → (N, w)."""
        return x.reshape(self.R * self.T, -1).index_select(0, self.index)

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """(R,) positions within each row → their (R,) indices among the packed rows."""
        return self.offset + t


def _linear(lin: nn.Linear, x: torch.Tensor, hooks: Hooks) -> torch.Tensor:
    """``lin(x)``; while hooks are active (pruning's gates), through :func:`sparsity.skip.linear`,
    which skips the columns the gates hold fixed."""
    return skip.linear(x, lin.weight, lin.bias) if hooks.active else lin(x)


def _at(x: torch.Tensor, at: torch.Tensor, lay: Packed | None) -> torch.Tensor:
    """Row b of x at position at[b]: (B, 1, width), from (B, T, width) or from packed rows laid out as ``lay``."""
    return (x[torch.arange(x.shape[0], device=x.device), at] if lay is None else x[lay.at(at)]).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: Hooks, sparsify: _Sparsifier):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_attn, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_attn, cfg.d_model, bias=cfg.bias)
        self.attn_imp = AttentionSink(cfg.n_head) if cfg.sink else None
        self.hooks, self.sparsify = hooks, sparsify
        p = f"{layer}.attn."
        self.h_in, self.h_q, self.h_k, self.h_v, self.h_y = p + "act_in", p + "q", p + "k", p + "v", p + "y"

    def forward(self, x: torch.Tensor, kv: list | None = None, lay: Packed | None = None) -> torch.Tensor:
        """(B, T, d_model) → (B, T, d_model), or packed rows (N, d_model) → (N, d_model) with
        their layout ``lay``; ``kv``: a list that gets this layer's keys and values, (B, H, T,
        D) each as attention used them (after AbsTopK and hooks)."""
        hooks, sp = self.hooks, self.sparsify
        x = sp("attn_in", x)
        if hooks.active:
            x = hooks(self.h_in, x)
        q, k, v = sp.qkv(_linear(self.c_attn, x, hooks))  # each (B, T, n_head·d_head), or (N, …) packed
        if hooks.active:
            q, k, v = hooks(self.h_q, q), hooks(self.h_k, k), hooks(self.h_v, v)
        if lay is not None:
            q, k, v = (lay.grid(t) for t in (q, k, v))
        B, T = q.shape[:2]
        q, k, v = (self._heads(t) for t in (q, k, v))  # (B, H, T, D)
        if kv is not None:
            kv.append((k, v))
        y = self._attend(q, k, v, None)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head)  # (B, T, n_head·d_head)
        if lay is not None:
            y = lay.rows(y)
        if hooks.active:
            y = hooks(self.h_y, y)
        return sp("attn_out", _linear(self.c_proj, y, hooks))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.n_head, self.d_head).transpose(1, 2)

    def _attend(self, q, k, v, visible: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, H, Tq, D) over k, v (B, H, T, D); ``visible`` (B, 1, Tq, T):
        the keys each query sees (None: causal, Tq = T)."""
        scale = 1.0 / math.sqrt(self.d_head)
        if self.attn_imp is not None:
            return self.attn_imp(q, k, v, scale, visible)
        if visible is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)

    def _kv_q_at(self, x: torch.Tensor, x_at: torch.Tensor):
        """Keys and values at every position of x ((B, T, d_model), or packed rows) and the
        query from x_at (B, 1, d_model), x at the read positions (hooked inside the caller's
        at_positions)."""
        a = self.n_head * self.d_head
        w, b = self.c_attn.weight, self.c_attn.bias
        lin = skip.linear if self.hooks.active else F.linear
        k, v = self.sparsify.kv(lin(x, w[a:], None if b is None else b[a:]))  # each (B, T, a)
        q = self.sparsify("attn_q", lin(skip.like(x_at, x), w[:a], None if b is None else b[:a]))  # (B, 1, a)
        if self.hooks.active:
            k, v = self.hooks(self.h_k, k), self.hooks(self.h_v, v)
        return k, v, q

    def _out_at(self, q: torch.Tensor, k, v, visible: torch.Tensor) -> torch.Tensor:
        """q (B, 1, a) at the read positions, hooked; the attention output there (B, 1, d_model)."""
        hooks = self.hooks
        if hooks.active:
            q = hooks(self.h_q, q)
        y = self._attend(self._heads(q), k, v, visible)
        y = y.transpose(1, 2).reshape(q.shape[0], 1, self.n_head * self.d_head)
        if hooks.active:
            y = hooks(self.h_y, y)
        return self.sparsify("attn_out", _linear(self.c_proj, y, hooks))

    def forward_at(self, x: torch.Tensor, at: torch.Tensor, kv: list | None = None, lay: Packed | None = None) -> torch.Tensor:
        """The attention output at one position per row, ``at`` (B,): (B, 1, d_model) from
        x (B, T, d_model), or from packed rows (N, d_model) with their layout ``lay``. Keys
        and values at every position (the read position attends to them), the query, the
        mixing and c_proj at the read position alone; hook points past the keys see (B, 1,
        width) tensors with ``hooks.positions`` = at."""
        x = self.sparsify("attn_in", x)
        if self.hooks.active:
            x = self.hooks(self.h_in, x)
        k, v, q = self._kv_q_at(x, _at(x, at, lay))
        if lay is not None:
            k, v = lay.grid(k), lay.grid(v)
        B, T = k.shape[:2]
        k, v = self._heads(k), self._heads(v)  # (B, H, T, D)
        if kv is not None:
            kv.append((k, v))
        visible = (torch.arange(T, device=x.device) <= at[:, None]).view(B, 1, 1, T)
        with self.hooks.at_positions(at):
            return self._out_at(q, k, v, visible)

    def forward_suffix(self, x: torch.Tensor, lay: Packed, pos: torch.Tensor, prefix: tuple, start: torch.Tensor,
                       at: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for rows whose first ``start[r]`` positions are those of another row,
        whose keys and values ``prefix`` holds ((R, H, Tp, D) each, row r's partner in row
        r). x: the rest of each row, packed (N, d_model) as ``lay`` says, whose (R, S) grid
        is at positions ``pos`` = start + (0 … S-1). Returns (N, d_model); with ``at`` (R,),
        only there: (R, 1, d_model) (the last block)."""
        hooks, sp = self.hooks, self.sparsify
        x = sp("attn_in", x)
        if hooks.active:
            x = hooks(self.h_in, x)
        if at is None:
            q, k, v = sp.qkv(_linear(self.c_attn, x, hooks))
            if hooks.active:
                q, k, v = hooks(self.h_q, q), hooks(self.h_k, k), hooks(self.h_v, v)
            q, q_pos = lay.grid(q), pos
        else:
            k, v, q = self._kv_q_at(x, _at(x, at - start, lay))
            q_pos = at[:, None]
        # keys: the partner's (visible before start), then the row's own (up to each query's
        # position): attention does not depend on the keys' order
        k, v = self._heads(lay.grid(k)), self._heads(lay.grid(v))
        K, V = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
        R, Tp, Sq = lay.R, prefix[0].shape[2], q_pos.shape[1]
        partner = (torch.arange(Tp, device=x.device) < start[:, None])[:, None, :].expand(R, Sq, Tp)
        visible = torch.cat([partner, pos[:, None, :] <= q_pos[:, :, None]], 2).unsqueeze(1)  # (R, 1, Sq, Tp + S)
        if at is not None:
            with hooks.at_positions(at):
                return self._out_at(q, K, V, visible)
        y = self._attend(self._heads(q), K, V, visible).transpose(1, 2).reshape(R, lay.T, self.n_head * self.d_head)
        y = lay.rows(y)
        if hooks.active:
            y = hooks(self.h_y, y)
        return sp("attn_out", _linear(self.c_proj, y, hooks))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: Hooks, sparsify: _Sparsifier):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU() if cfg.activation_type == "gelu" else nn.ReLU()
        self.hooks, self.sparsify = hooks, sparsify
        self.h_in, self.h_post = f"{layer}.mlp.act_in", f"{layer}.mlp.post_act"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hooks, sp = self.hooks, self.sparsify
        x = sp("mlp_in", x)
        if hooks.active:
            x = hooks(self.h_in, x)
        h = sp("mlp_neuron", self.act(_linear(self.c_fc, x, hooks)))  # (B, T, d_mlp)
        if hooks.active:
            h = hooks(self.h_post, h)
        return sp("mlp_out", _linear(self.c_proj, h, hooks))


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.RMSNorm(cfg.d_model) if cfg.rms_norm else nn.LayerNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, hooks: Hooks, sparsify: _Sparsifier):
        super().__init__()
        self.ln_1, self.ln_2 = _norm(cfg), _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer, hooks, sparsify)
        self.mlp = MLP(cfg, layer, hooks, sparsify)
        self.hooks = hooks
        self.h = {n: f"{layer}.{n}" for n in ("resid_in", "attn.resid_delta", "resid_mid", "mlp.resid_delta")}

    def forward(self, x: torch.Tensor, kv: list | None = None, lay: Packed | None = None) -> torch.Tensor:
        """(B, T, d_model) → (B, T, d_model); packed rows (N, d_model) with their layout ``lay``."""
        hooks, h = self.hooks, self.h
        if not hooks.active:
            x = x + self.attn(self.ln_1(x), kv, lay)
            return x + self.mlp(self.ln_2(x))
        x = hooks(h["resid_in"], x)
        x = x + hooks(h["attn.resid_delta"], self.attn(self.ln_1(x), kv, lay))
        x = hooks(h["resid_mid"], x)
        return x + hooks(h["mlp.resid_delta"], self.mlp(self.ln_2(x)))

    def forward_at(self, x: torch.Tensor, at: torch.Tensor, kv: list | None = None, lay: Packed | None = None) -> torch.Tensor:
        """The block's output at one position per row, ``at`` (B,): (B, 1, d_model) from x
        (B, T, d_model), or from packed rows with their layout ``lay`` — what a last block
        owes a reader of those positions. Only the keys and values of attention need every
        position; the rest runs at the read positions, with ``hooks.positions`` = at while it does."""
        if self.hooks.active:
            x = self.hooks(self.h["resid_in"], x)
        a = self.attn.forward_at(self.ln_1(x), at, kv, lay)
        return self._rest_at(_at(x, at, lay), a, at)

    def _rest_at(self, x: torch.Tensor, a: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """The residual x (B, 1, d_model) at the read positions plus attention's output a there, then the MLP."""
        hooks, h = self.hooks, self.h
        with hooks.at_positions(at):
            if not hooks.active:
                x = x + a
                return x + self.mlp(self.ln_2(x))
            x = x + hooks(h["attn.resid_delta"], a)
            x = hooks(h["resid_mid"], x)
            return x + hooks(h["mlp.resid_delta"], self.mlp(self.ln_2(x)))

    def forward_suffix(self, x: torch.Tensor, lay: Packed, pos: torch.Tensor, prefix: tuple, start: torch.Tensor,
                       at: torch.Tensor | None = None) -> torch.Tensor:
        """The block on rows whose positions before ``start`` are another row's (whose keys
        and values at this layer are ``prefix``): x packed (N, d_model) as ``lay`` says,
        whose (R, S) grid is at positions ``pos``. With ``at`` (R,), the output at that
        position alone, (R, 1, d_model)."""
        hooks, h = self.hooks, self.h
        if hooks.active:
            x = hooks(h["resid_in"], x)
        a = self.attn.forward_suffix(self.ln_1(x), lay, pos, prefix, start, at)
        if at is not None:
            return self._rest_at(_at(x, at - start, lay), a, at)
        x = x + (hooks(h["attn.resid_delta"], a) if hooks.active else a)
        if hooks.active:
            x = hooks(h["resid_mid"], x)
        m = self.mlp(self.ln_2(x))
        return x + (hooks(h["mlp.resid_delta"], m) if hooks.active else m)


class GPT(nn.Module):
    """``model(idx) -> logits``: idx (B, T) token ids, logits (B, T, vocab_size).

    ``read_positions_only`` (default True): ``model(idx, at=…)`` runs the last block at the
    read positions alone (keys and values excepted), which gives the same logits for about
    half the last block's work; False runs every block at every position first (the plain
    path, kept to measure against)."""

    read_positions_only = True
    # With read_positions_only: GPT.read_pairs may be used by callers that read prompt pairs
    # (sparsity/scoring.py); False keeps them on model(idx, at=…) (benchmarks measure against it)
    share_prefixes = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.hooks = Hooks(hook_names(cfg.n_layer))
        sparsify = _Sparsifier(cfg)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.block_size, cfg.d_model),
                h=nn.ModuleList([Block(cfg, i, self.hooks, sparsify) for i in range(cfg.n_layer)]),
                ln_f=_norm(cfg),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied_unembed:
            self.transformer.wte.weight = self.lm_head.weight
        # Kept (zero) so state dicts match the reference layout, which has this buffer.
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        if cfg.enable_bigram_table and cfg.learnable_bigram_table:
            self.bigram_table = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.vocab_size))
        elif cfg.enable_bigram_table:
            self.register_buffer("bigram_table", torch.zeros(cfg.vocab_size, cfg.vocab_size))
        else:
            self.bigram_table = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual writes
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, last_only: bool = False, at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); (B, 1, V) for the last position only with ``last_only``; (B, V)
        at one position per row with ``at`` (B,) — what next-token tasks read from
        right-padded prompts, without unembedding every position."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        t = self.transformer
        x = t.wte(idx) + t.wpe.weight[:T]  # (B, T, d_model)
        # Only the read positions feed the logits: the last block can run there alone, unless
        # something records activations (a recorder expects every position).
        tail = at is not None and self.read_positions_only and not self.hooks.recording
        for block in t.h[:-1] if tail else t.h:
            x = block(x)
        rows = torch.arange(B, device=idx.device)
        if tail:
            return self._logits_at(t.h[-1].forward_at(x, at), idx[rows, at], at)
        else:
            if self.hooks.active:
                x = self.hooks("final_resid", x)
            if at is not None:
                x, idx = x[rows, at], idx[rows, at]  # (B, d_model), (B,)
            elif last_only:
                x, idx = x[:, -1:], idx[:, -1:]
        logits = self.lm_head(t.ln_f(x)) + self.final_logits_bias  # (B, T, V) or (B, V)
        if self.bigram_table is not None:
            logits = logits + F.embedding(idx, self.bigram_table).to(logits.dtype)
        return logits

    def _logits_at(self, x: torch.Tensor, idx: torch.Tensor, at: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) from the last block's output x (B, 1, d_model) at positions ``at``
        holding tokens ``idx`` (B,); with ``cols`` (B, K) token ids, only those: (B, K)."""
        t = self.transformer
        if self.hooks.active:
            with self.hooks.at_positions(at):
                x = self.hooks("final_resid", x)
        h = t.ln_f(x[:, 0])
        if cols is None:
            logits = self.lm_head(h) + self.final_logits_bias
        else:  # K rows of the unembedding per row instead of all V
            logits = torch.einsum("bd,bkd->bk", h, self.lm_head.weight[cols]) + self.final_logits_bias[cols]
        if self.bigram_table is not None:
            bigram = F.embedding(idx, self.bigram_table) if cols is None else self.bigram_table[idx[:, None], cols]
            logits = logits + bigram.to(logits.dtype)
        return logits

    def read_pairs(self, a: torch.Tensor, at_a: torch.Tensor, b: torch.Tensor, at_b: torch.Tensor,
                   start: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(model(a, at=at_a), model(b, at=at_b))`` for rows b that begin as rows a do:
        b[r, :start[r]] == a[r, :start[r]], and start[r] ≤ at_b[r]. Causal attention makes
        those positions' activations row a's, so row b runs from start[r] on only, its
        attention reading row a's keys and values before it. A task's clean and corrupt
        prompts share most of their tokens: this spares about a quarter of a pruning step's
        FLOPs. Both sides run packed (:class:`Packed`): no position past a row's read
        position is computed, and hook points before the read positions hold (N, width)
        packed rows. Exact wherever every hook replacement treats each position alike (not
        for position-dependent ones, nor while recording). ``cols`` (R, K): only these logits
        of each pair, (R, K) each (a task reads two: its answer and the alternative)."""
        # Both sides run packed (:class:`Packed`): row a up to its read position (and up to
        # where b departs from it, whose keys b reads), row b from its departure to its read position.
        len_a, len_b = torch.maximum(at_a + 1, start), at_b - start + 1
        Ta, S = int(len_a.max()), int(len_b.max())
        for T in (Ta, int(at_b.max()) + 1):
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        t = self.transformer
        lay_a, lay_b = Packed(len_a, Ta), Packed(len_b, S)
        pos = start[:, None] + torch.arange(S, device=b.device)  # (R, S): b's own positions, the grid of lay_b
        pos_b = start[lay_b.row] + lay_b.pos
        xa = t.wte(a[lay_a.row, lay_a.pos]) + t.wpe.weight[lay_a.pos]  # (Na, d_model)
        xb = t.wte(b[lay_b.row, pos_b]) + t.wpe.weight[pos_b]  # (Nb, d_model)
        for block in t.h[:-1]:
            kv: list = []
            xa = block(xa, kv, lay_a)
            xb = block.forward_suffix(xb, lay_b, pos, kv[0], start)
        kv = []
        ya = t.h[-1].forward_at(xa, at_a, kv, lay_a)
        yb = t.h[-1].forward_suffix(xb, lay_b, pos, kv[0], start, at_b)
        rows = torch.arange(a.shape[0], device=a.device)
        return self._logits_at(ya, a[rows, at_a], at_a, cols), self._logits_at(yb, b[rows, at_b], at_b, cols)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a (B, T+1) batch of token rows."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
