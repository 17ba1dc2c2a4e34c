"""Configuration: frozen dataclasses validated at construction.

Field names follow the reference GPTConfig (openai/circuit_sparsity) so a reference
``beeg_config.json`` maps onto :class:`ModelConfig`. A bad value raises ConfigError (a
ValueError) naming the field, its value and the allowed range. Dicts appear only at the
Ray/JSON boundary: ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sparsity.errors import ConfigError


@dataclass(frozen=True)
class Location:
    """One of the 8 places in a block where AbsTopK sparsifies activations and where pruning
    gates nodes (docs/design.md, "The model"): ``name`` as ``--afrac-loctypes`` spells it,
    ``hook`` the hook point that records it (``{layer}.{hook}``; a circuit's node location),
    ``width`` the ModelConfig attribute that gives its number of channels."""

    name: str
    hook: str
    width: str


LOCATIONS = (
    Location("attn_in", "attn.act_in", "d_model"),  # the residual as attention reads it
    Location("attn_q", "attn.q", "d_attn"),
    Location("attn_k", "attn.k", "d_attn"),
    Location("attn_v", "attn.v", "d_attn"),
    Location("attn_out", "attn.resid_delta", "d_model"),  # what attention writes to the residual
    Location("mlp_in", "mlp.act_in", "d_model"),
    Location("mlp_neuron", "mlp.post_act", "d_mlp"),
    Location("mlp_out", "mlp.resid_delta", "d_model"),
)
LOCTYPES = tuple(loc.name for loc in LOCATIONS)
HOOK_OF = {loc.name: loc.hook for loc in LOCATIONS}  # "attn_q" -> "attn.q"
ALL_LOCTYPES = ",".join(LOCTYPES)
OPTIMIZERS = ("adam", "muon")
MLP_RATIO = 4  # d_mlp = MLP_RATIO × d_model unless given (GPT-2's ratio)

# csp's learning-rate rule — ours, not the paper's: the paper tunes lr per experiment and
# notes that sparser models want larger ones; its training code has one base lr and no
# rule across densities. A model whose block matrices keep a fraction d of their weights
# trains at LR_DENSE[optimizer] / sqrt(d) unless --lr says otherwise; with Adam also times
# LR_REF_WIDTH / d_model (Adam's best lr falls as the matrices widen; Muon scales its update
# per shape, sparsity/optim.py, so one lr serves every width).
# Measured (benchmarks/lr_rule.py: the demo's models on the paper's architecture, Adam, 700
# steps; val loss at each lr): d64 dense best at 0.03 (4.218; 0.01: 4.277, 0.06: 4.248);
# d128 dense best at 0.015 (4.123; 0.0075: 4.136, 0.03: 4.562); d128 at density 1/8 best
# at 0.0424 (4.241; 0.0283: 4.321, 0.0849: 4.530) — each the rule's value.
LR_DENSE = {"adam": 3e-2, "muon": 1e-2}
LR_REF_WIDTH = 64  # the d_model at which Adam's dense lr is LR_DENSE["adam"]


def density_lr(density: float, optimizer: str = "adam", lr_dense: float | None = None, d_model: int = LR_REF_WIDTH) -> float:
    """The learning rate of a model at block-weight ``density`` and width ``d_model`` (3
    significant digits): ``lr_dense / sqrt(density)``, times ``LR_REF_WIDTH / d_model`` for Adam."""
    base = LR_DENSE[optimizer] if lr_dense is None else lr_dense
    width = LR_REF_WIDTH / d_model if optimizer == "adam" else 1.0
    return float(f"{base * width / math.sqrt(density):.3g}")
PLACEMENTS = ("spread", "strict_spread", "pack")  # where Ray Train puts the workers of one run


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} out of range: {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """The sparse GPT's shape and options (the reference GPTConfig's fields)."""

    vocab_size: int = 2048  # the csp BPE: 2047 byte-level tokens + <|endoftext|>
    block_size: int = 256  # context length (n_ctx)
    n_layer: int = 2  # the demo size that learns the quote task on 2 CPU cores
    n_head: int = 4
    d_head: int = 16  # decoupled from d_model: attention width = n_head * d_head
    d_model: int = 64
    d_mlp: int = 256  # MLP_RATIO × d_model, the GPT-2 ratio
    bias: bool = True  # Linear biases, as the reference (they stay dense)
    rms_norm: bool = True  # RMSNorm, no learned shift: fewer dense parameters
    activation_type: str = "gelu"
    afrac: float | None = 0.25  # AbsTopK keeps int(afrac·dim) activations; None = off
    afrac_loctypes: str = ALL_LOCTYPES  # all 8 locations, as in the paper
    tied_unembed: bool = False  # untied: the unembedding gets its own sparse matrix
    enable_bigram_table: bool = False  # dense V×V logit table added to the logits
    learnable_bigram_table: bool = False
    sink: bool = False  # per-head learnable attention sink (an always-visible zero slot)
    tokenizer_name: str = "csp-bpe-2048"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_head", "d_model", "d_mlp"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer ≥ 1")
        _check(self.vocab_size <= 65536, "vocab_size", self.vocab_size, "must be ≤ 65536 (token ids are stored as uint16)")
        _check(self.activation_type in ("gelu", "relu"), "activation_type", self.activation_type, "must be 'gelu' or 'relu'")
        if self.afrac is not None:
            _check(isinstance(self.afrac, int | float) and 0.0 < self.afrac <= 1.0, "afrac", self.afrac, "must be in (0, 1], or None to turn AbsTopK off")
            for loc, dim in self.loc_dims().items():
                if loc in self.loctypes:
                    _check(int(self.afrac * dim) >= 1, "afrac", self.afrac, f"keeps no activation at {loc} (width {dim}); raise afrac to ≥ {1 / dim:.3g}")
        unknown = [x for x in self.afrac_loctypes.split(",") if x and x not in LOCTYPES]
        _check(not unknown, "afrac_loctypes", self.afrac_loctypes, f"unknown location(s) {unknown}; choose from {ALL_LOCTYPES}")
        _check(not (self.learnable_bigram_table and not self.enable_bigram_table), "learnable_bigram_table", True, "needs enable_bigram_table=True")

    @staticmethod
    def afrac_or_off(afrac: float | None) -> float | None:
        """A user's AbsTopK fraction (``--afrac``, a sweep's ``afrac`` axis) as the config
        stores it: a fraction in (0, 1) keeps that share of each activation, 1 (or None)
        turns AbsTopK off; anything else is refused naming the range."""
        if afrac is None:
            return None
        _check(isinstance(afrac, int | float) and not isinstance(afrac, bool) and 0.0 < afrac <= 1.0, "afrac", afrac,
               "must be in (0, 1]; 1 turns AbsTopK off")
        return None if afrac >= 1.0 else float(afrac)

    @property
    def loctypes(self) -> frozenset[str]:
        return frozenset(x for x in self.afrac_loctypes.split(",") if x) if self.afrac is not None else frozenset()

    @property
    def d_attn(self) -> int:
        return self.n_head * self.d_head

    def loc_dims(self) -> dict[str, int]:
        """Channels at each location, by its ``--afrac-loctypes`` name (:data:`LOCATIONS`)."""
        return {loc.name: getattr(self, loc.width) for loc in LOCATIONS}

    @classmethod
    def gpt(cls, d_model: int, **kw) -> ModelConfig:
        """A model of width ``d_model`` with the GPT-2 MLP (d_mlp = MLP_RATIO × d_model)."""
        return cls(d_model=d_model, d_mlp=kw.pop("d_mlp", MLP_RATIO * d_model), **kw)

    def scaled(self, ef: float, ef_mlp: float | None = None) -> ModelConfig:
        """This config widened by ``ef``: d_model and n_head (so attention width) by ef,
        d_mlp by ef_mlp (default ef); d_head stays fixed."""
        _check(ef > 0, "ef", ef, "must be > 0")
        em = ef if ef_mlp is None else ef_mlp
        _check(em > 0, "ef_mlp", ef_mlp, "must be > 0")
        return dataclasses.replace(
            self,
            d_model=max(1, round(self.d_model * ef)),
            n_head=max(1, round(self.n_head * ef)),
            d_mlp=max(1, round(self.d_mlp * em)),
        )


@dataclass(frozen=True)
class SparsityConfig:
    """Weight sparsity: one density for every matrix, L0frac = pfrac / (ef · ef_mlp)."""

    pfrac: float = 0.125  # 1/8: the density that solved the quote task in 4 CPU minutes
    ef: float = 1.0  # width multiplier of d_model that the model was built with
    ef_mlp: float | None = None  # width multiplier of d_mlp (None: same as ef)
    embed_pfrac: float | None = None  # embeddings' own fraction (None: pfrac / ef)
    anneal_start: float = 0.01  # fraction of training where L0 starts to fall from dense
    anneal_end: float = 0.5  # … and where it reaches the target
    min_per_unit: int = 4  # floor: nonzeros kept per neuron / attention channel

    def __post_init__(self) -> None:
        _check(self.ef > 0, "ef", self.ef, "must be > 0")
        _check(self.ef_mlp is None or self.ef_mlp > 0, "ef_mlp", self.ef_mlp, "must be > 0")
        # pfrac is relative to the base (ef=1) dense model: ef·ef_mlp is dense at this width.
        cap = self.ef * (self.ef if self.ef_mlp is None else self.ef_mlp)
        _check(0.0 < self.pfrac <= max(1.0, cap), "pfrac", self.pfrac, f"must be in (0, {max(1.0, cap):g}] (1 = dense at ef=1; ef·ef_mlp = dense at this width)")
        _check(self.embed_pfrac is None or 0.0 < self.embed_pfrac <= 1.0, "embed_pfrac", self.embed_pfrac, "must be in (0, 1]")
        _check(0.0 <= self.anneal_start <= self.anneal_end <= 1.0, "anneal_start/anneal_end", (self.anneal_start, self.anneal_end), "need 0 ≤ anneal_start ≤ anneal_end ≤ 1")
        _check(isinstance(self.min_per_unit, int) and self.min_per_unit >= 0, "min_per_unit", self.min_per_unit, "must be an integer ≥ 0")

    @property
    def l0frac(self) -> float:
        """Target density of every block matrix."""
        em = self.ef if self.ef_mlp is None else self.ef_mlp
        return min(1.0, self.pfrac / (self.ef * em))

    @property
    def embed_l0frac(self) -> float:
        """Target density of the embedding / unembedding matrices."""
        return min(1.0, self.embed_pfrac if self.embed_pfrac is not None else self.pfrac / self.ef)

    @property
    def dense(self) -> bool:
        return self.l0frac >= 1.0 and self.embed_l0frac >= 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe (docs/design.md, "The model"): Adam on RMS-normalised gradients."""

    steps: int = 2000
    batch_size: int = 32  # sequences per optimizer step
    micro_batches: int = 1  # gradient accumulation: batch_size must divide evenly
    optimizer: str = "adam"  # "adam" (the paper's) or "muon" (Muon on block matrices; sparsity/optim.py)
    lr: float = 3e-2  # best of {3e-3, 1e-2, 3e-2, 1e-1} for dense and 1/8-dense d64 models in 300 steps here
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # large on purpose: meaningful only because grads are RMS-normalised
    grad_rms_eps: float = 1e-5  # g ← g / (rms(g) + grad_rms_eps)
    weight_decay: float = 0.1  # decoupled, × lr, on 2-D weights only
    warmup_frac: float = 0.01  # 1% linear warmup, then linear decay to 0
    eval_every: int = 200  # steps between validation evaluations (0 = only at the end)
    eval_batches: int = 8
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    log_every: int = 10
    seed: int = 0
    milestones: tuple[int, ...] = ()  # steps whose checkpoints are kept for good, beside the last 2 (:func:`milestone_steps`)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batches", "eval_batches", "log_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, v, "must be an integer ≥ 1")
        for name in ("eval_every", "ckpt_every", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, v, "must be an integer ≥ 0")
        _check(self.batch_size % self.micro_batches == 0, "micro_batches", self.micro_batches, f"must divide batch_size={self.batch_size}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, "must be 'adam' or 'muon'")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be > 0")
        _check(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        _check(self.eps > 0, "eps", self.eps, "must be > 0")
        _check(self.grad_rms_eps > 0, "grad_rms_eps", self.grad_rms_eps, "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be ≥ 0")
        _check(0 <= self.warmup_frac < 1, "warmup_frac", self.warmup_frac, "must be in [0, 1)")
        ms = self.milestones
        _check(isinstance(ms, (tuple, list)) and all(isinstance(m, int) and not isinstance(m, bool) for m in ms), "milestones", ms,
               "must be a list of integer steps")
        _check(all(1 <= m <= self.steps for m in ms), "milestones", list(ms), f"must be steps in 1..{self.steps}")
        object.__setattr__(self, "milestones", tuple(sorted(set(ms))))


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; what a checkpoint stores beside its weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.train.milestones:  # a run without milestones keeps the dict (and run.json) it always had
            del d["train"]["milestones"]
        else:
            d["train"]["milestones"] = list(self.train.milestones)
        return d

    @classmethod
    def at_width(cls, base: ModelConfig, train: TrainConfig, pfrac: float = SparsityConfig.pfrac, ef: float = 1.0,
                 ef_mlp: float | None = None, **sparsity) -> RunConfig:
        """The one way to widen a base model: ``ef``/``ef_mlp`` scale the model and go into
        the sparsity config that divides the density by them, so the two always agree."""
        return cls(model=base.scaled(ef, ef_mlp), sparsity=SparsityConfig(pfrac=pfrac, ef=ef, ef_mlp=ef_mlp, **sparsity), train=train)

    def with_density_lr(self, lr_dense: float | None = None) -> RunConfig:
        """This config at csp's density-scaled learning rate (:func:`density_lr`)."""
        lr = density_lr(self.sparsity.l0frac, self.train.optimizer, lr_dense, self.model.d_model)
        return dataclasses.replace(self, train=dataclasses.replace(self.train, lr=lr))

    def lr_rule(self) -> str:
        """How the rule arrives at this config's lr, for a log line."""
        d, opt = self.sparsity.l0frac, self.train.optimizer
        width = f" × {LR_REF_WIDTH}/d_model {self.model.d_model}" if opt == "adam" else ""
        return (f"lr {self.train.lr:.3g} = {LR_DENSE[opt]:g}{width} / sqrt(density {d:.4g}) "
                f"(csp's density rule for {opt}; --lr sets it)")

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            sparsity=_build(SparsityConfig, d.get("sparsity", {}), "sparsity"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} config field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


# The summed two-sided task loss of a model that cannot tell a pair's answers apart (2 ln 2):
# the scale every task loss, target and verdict is read on (sparsity/tasks/base.py).
CHANCE_LOSS = 2 * math.log(2)


def milestone_steps(spec: str, steps: int) -> tuple[int, ...]:
    """``--milestones``: a count N (N steps log-spaced from 1% of the run to its end, the
    early ones dense where a model changes fastest) or explicit steps ``"100,500,2000"``."""
    spec = str(spec).strip()
    try:
        parts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--milestones {spec!r}: give a count (6) or steps separated by commas (100,500,2000)") from None
    if len(parts) == 1 and "," not in spec:
        n = parts[0]
        _check(1 <= n <= steps, "milestones", n, f"a count must be in 1..{steps} (the run's steps)")
        lo = max(1, steps // 100)
        if n == 1:
            return (steps,)
        return tuple(sorted({min(steps, max(1, round(lo * (steps / lo) ** (i / (n - 1))))) for i in range(n)}))
    _check(bool(parts) and all(1 <= m <= steps for m in parts), "milestones", spec, f"must be steps in 1..{steps}")
    return tuple(sorted(set(parts)))
ABLATIONS = ("mean", "zero", "resample")
# PruneConfig fields newer than the first stored keys, and their "unset" value. stop_open_tol:
# rows stored before it existed stopped with 0.05.
LATER_FIELDS = {"grad_clip_rms": None, "stop_window": 0, "stop_open_tol": 0.05}


@dataclass(frozen=True)
class PruneConfig:
    """Hyper-parameters of one pruning run. Every field but ``also_targets`` is part of the
    result key (:meth:`key`): two configs never overwrite each other's circuits."""

    target: float = 0.15  # the paper's target, on the summed two-sided loss (chance 2·ln 2)
    # More targets bisected from the same trained masks (the masks do not depend on the
    # target), each stored as its own row keyed as a run at that target (:meth:`for_target`).
    # 0.30: the paper's 0.15 read per prompt, as the reference viewer's halving suggests.
    also_targets: tuple[float, ...] = (0.30,)
    ablation: str = "mean"  # the paper's: pruned nodes take their mean over pretraining data
    # Weight of Σ H(τ). Measured on the demo's dense d_model-128 model (else_elif, 400 steps):
    # 87 nodes at 1e-3 vs 135 at 1e-4 (the replication's Table 2 centre), both verified.
    k_coef: float = 1e-3
    steps: int = 400  # AdamW steps on τ: a time budget from the measured size-vs-steps curve (docs/circuits.md, docs/pruning-speed.md)
    # Stop before ``steps`` once the open gates and the smoothed task loss have been flat for
    # this many steps (sparsity.prune.converged; measured in docs/pruning-speed.md); 0: always
    # run every step.
    stop_window: int = 40
    # ... the open-gate count staying within this fraction of itself over the window (and the
    # smoothed loss within sparsity.prune.STOP_LOSS_TOL). 0.02: the fastest rule that kept
    # circuits within their seed spread on 24 pairs (docs/pruning-speed.md; 0.05 did on 15).
    stop_open_tol: float = 0.02
    lr: float = 3e-3  # paper (replication's Table 2 centre)
    weight_decay: float = 1e-3  # paper (same source)
    warmup_frac: float = 0.05  # then linear decay to 0 (same source)
    # Scale τ's gradients down to this RMS when larger (the replication's grad_clip_norm 1.0,
    # an RMS over every gate); None: no clipping.
    grad_clip_rms: float | None = None
    init: float = 0.1  # τ starts just open: every node passes, the penalty must earn each closure
    init_noise: float = 0.01  # std of the seeded noise on τ's init (breaks ties between nodes)
    surrogate_temp: float = 1.0  # backward of H(τ) is σ'(τ/temp)/temp (paper: 1)
    batch_pairs: int = 64  # task datapoints per step (128 prompts), drawn afresh each step
    n_train: int = 1024  # the pool of distinct train pairs the batches are drawn from
    # Held-out pairs for bisecting k. k is the smallest that meets the target on these, so it
    # sits where their noise decides (a winner's curse on the test pairs): 128 rather than 64
    # halves the variance for ~3 s of forward passes (the demo's first run at 64: 3 of 7
    # circuits missed the target on test pairs by 0.007-0.010).
    n_select: int = 128
    # k must meet the target on the selection pairs by this many standard errors of their
    # mean loss (0: the paper's plain bisection). In the demo, 2 of 6 circuits miss on test
    # pairs by 0.002-0.010 either way: their selection loss is more than 1 SE below target.
    select_se: float = 1.0
    n_test: int = 128  # held-out pairs for verification (never used to choose anything)
    calibrate: bool = False  # fit a scale and shift on the answer logits per circuit
    seed: int = 0  # drives τ-init noise, batch sampling and resample draws
    prune_anyway: bool = False  # prune even when the full model misses the target (the row says so)

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ConfigError(f"{name}={getattr(self, name)!r} out of range: {allowed}")

        if not self.target > 0:
            bad("target", "must be > 0")
        # each target once, in order (PruneConfig(target=0.3) leaves the default 0.3 out)
        also = tuple(dict.fromkeys(float(t) for t in self.also_targets if float(t) != self.target))
        object.__setattr__(self, "also_targets", also)
        if any(not t > 0 for t in self.also_targets):
            bad("also_targets", "every target must be > 0")
        if self.ablation not in ABLATIONS:
            bad("ablation", f"choose one of {', '.join(ABLATIONS)}")
        if self.k_coef < 0:
            bad("k_coef", "must be ≥ 0")
        if not (isinstance(self.stop_window, int) and self.stop_window >= 0):
            bad("stop_window", "must be an integer ≥ 0 (0: no early stop)")
        if not 0 <= self.stop_open_tol < 1:
            bad("stop_open_tol", "must be in [0, 1)")
        for name in ("steps", "n_train", "n_select", "n_test", "batch_pairs"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                bad(name, "must be an integer ≥ 1")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not self.surrogate_temp > 0:
            bad("surrogate_temp", "must be > 0")
        if not 0 <= self.warmup_frac < 1:
            bad("warmup_frac", "must be in [0, 1)")
        if not -1 <= self.init <= 1:
            bad("init", "must be in [-1, 1] (τ is clamped there)")
        if self.grad_clip_rms is not None and not self.grad_clip_rms > 0:
            bad("grad_clip_rms", "must be > 0, or None for no clipping")
        for name in ("init_noise", "weight_decay", "select_se"):
            if getattr(self, name) < 0:
                bad(name, "must be ≥ 0")

    @property
    def targets(self) -> tuple[float, ...]:
        """Every target this run bisects for: ``target`` first, then ``also_targets``."""
        return (self.target, *self.also_targets)

    def for_target(self, target: float) -> PruneConfig:
        """The single-target config whose row ``target`` is: what a run at that target alone
        would use, and so the key that row is stored under."""
        return dataclasses.replace(self, target=target, also_targets=())

    def key(self) -> str:
        """A short, stable id of this config's row at ``target``: part of every stored
        result's key. ``also_targets`` is not part of it: each of those rows is keyed by
        its own :meth:`for_target` config (the same masks, so the same row)."""
        fields = dataclasses.asdict(self)
        fields.pop("also_targets")
        # Fields added after results were first stored enter the key only when set, so the
        # keys of earlier rows (and re-runs of their configs) stay what they were.
        for name, unset in LATER_FIELDS.items():
            if fields[name] == unset or (name == "stop_open_tol" and not self.stop_window):  # no early stop: no tolerance
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
