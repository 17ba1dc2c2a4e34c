"""Checkpoints: safetensors weights + JSON config + a weights-only training state.

A checkpoint is three files (kept as ``{name: bytes}`` so any store can hold them):

    model.safetensors  the model's state dict (never unpickled)
    config.json        RunConfig, step, metrics, fingerprint
    train_state.pt     optimizer state, step, data position, RNG states — plain tensors
                       and numbers, loaded with ``torch.load(weights_only=True)``

The reference layout (openai/circuit_sparsity) is ``beeg_config.json`` + ``final_model.pt``;
parameter names are the same as ours, so export/import translate only the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass

import torch

from sparsity.config import ModelConfig, RunConfig, SparsityConfig
from sparsity.errors import CspError
from sparsity.model import GPT

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1

REF_CONFIG = "beeg_config.json"
REF_WEIGHTS = "final_model.pt"


class CheckpointError(CspError):
    pass


@dataclass
class Checkpoint:
    config: RunConfig
    model_state: dict[str, torch.Tensor]
    meta: dict
    train_state: dict | None = None

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def build_model(self, device: str | torch.device = "cpu") -> GPT:
        model = GPT(self.config.model)
        load_state(model, self.model_state, where=self.meta.get("where", "checkpoint"))
        return model.to(device).eval()


def _state_bytes(model: GPT) -> bytes:
    from safetensors.torch import save

    # Tied weights share storage, which safetensors refuses: store each key's own copy.
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(sd)


def identity(weights_sha256: str, run: dict) -> str:
    """A checkpoint's fingerprint: the hash of its weights *and* the run config that gives
    them meaning (the same tensors under another head split are another model)."""
    return hashlib.sha256(json.dumps({"weights": weights_sha256, "run": run}, sort_keys=True).encode()).hexdigest()


def to_files(model: GPT, config: RunConfig, step: int, meta: dict | None = None, train_state: dict | None = None) -> dict[str, bytes]:
    """The checkpoint's files. ``train_state`` (optimizer, RNG, data position) is optional:
    without it the checkpoint can be evaluated and pruned, not resumed."""
    weights = _state_bytes(model)
    wsha = hashlib.sha256(weights).hexdigest()
    info = {
        "format_version": FORMAT_VERSION,
        "run": config.to_dict(),
        "step": int(step),
        "weights_sha256": wsha,
        "fingerprint": identity(wsha, config.to_dict()),
        **(meta or {}),
    }
    files = {MODEL_FILE: weights, CONFIG_FILE: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()}
    if train_state is not None:
        buf = io.BytesIO()
        torch.save(train_state, buf)
        files[STATE_FILE] = buf.getvalue()
    return files


def from_files(files: dict[str, bytes], where: str = "checkpoint", with_train_state: bool = True) -> Checkpoint:
    """Parse checkpoint files; every defect is one CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in files:
            raise CheckpointError(f"{where}: missing {name}; is this a csp checkpoint directory?")
    try:
        meta = json.loads(files[CONFIG_FILE])
        config = RunConfig.from_dict(meta["run"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}/{CONFIG_FILE} is not a valid checkpoint config ({type(e).__name__}: {e})") from None
    actual = hashlib.sha256(files[MODEL_FILE]).hexdigest()
    recorded = meta.get("weights_sha256")
    if recorded is None:  # written before fingerprints covered the config: the weights' hash alone
        if actual != meta.get("fingerprint"):
            raise CheckpointError(f"{where}/{MODEL_FILE} does not match the fingerprint in {CONFIG_FILE} (truncated or replaced)")
    elif identity(recorded, meta["run"]) != meta.get("fingerprint"):
        raise CheckpointError(f"{where}/{CONFIG_FILE} was edited: its run config no longer matches the fingerprint it was saved "
                              "with; restore the original file (the weights only mean something under their own config)")
    elif actual != recorded:
        raise CheckpointError(f"{where}/{MODEL_FILE} does not belong with {CONFIG_FILE}: the weights' hash is not the one "
                              "recorded there (one of the two files was replaced or truncated)")
    try:
        state = load(files[MODEL_FILE])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}/{MODEL_FILE} is unreadable ({e})") from None
    train_state = None
    if with_train_state and STATE_FILE in files:
        try:
            train_state = torch.load(io.BytesIO(files[STATE_FILE]), weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises several types for truncated/foreign pickles
            raise CheckpointError(f"{where}/{STATE_FILE} is unreadable ({type(e).__name__}); the weights are fine, resume is not") from None
    meta["where"] = where
    return Checkpoint(config, state, meta, train_state)


def load_state(model: GPT, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Load a state dict exactly: unknown keys, missing tensors and shape mismatches are errors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unknown:
        problems.append(f"unknown {_few(unknown)}")
    if wrong:
        problems.append("shape mismatch " + _few([f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}" for k in wrong]))
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------------- reference layout

# Reference GPTConfig fields we write and read; others it has take their defaults there.
_REF_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model", "d_mlp", "bias", "rms_norm",
               "activation_type", "afrac", "afrac_loctypes", "tied_unembed", "tokenizer_name",
               "enable_bigram_table", "learnable_bigram_table", "sink")
# Reference fields that change the computation in ways this model does not implement.
_REF_UNSUPPORTED = {"d_pos_emb": None, "residual_activation_type": "identity", "enable_sparse_kernels": False}
# Reference fields that do not affect inference, or that its loader overrides.
_REF_IGNORED = {"dropout", "debug_nans", "grad_checkpointing", "flash", "ln_bias", "dropout_cat_pos_emb",
                "sinusoidal_cat_pos_emb", "use_tied_aux_matrix"}


def export_reference(model: GPT) -> dict[str, bytes]:
    """``beeg_config.json`` + ``final_model.pt`` that the reference ``load_model`` reads."""
    cfg = model.config
    ref = {k: getattr(cfg, k) for k in _REF_FIELDS}
    ref.update(dropout=0.0, ln_bias=not cfg.rms_norm, residual_activation_type="identity", grad_checkpointing=False)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return {REF_CONFIG: (json.dumps(ref, indent=2, sort_keys=True) + "\n").encode(), REF_WEIGHTS: buf.getvalue()}


def import_reference(files: dict[str, bytes], where: str = "reference model") -> Checkpoint:
    """A reference-layout model as a csp Checkpoint (no training state)."""
    for name in (REF_CONFIG, REF_WEIGHTS):
        if name not in files:
            raise CheckpointError(f"{where}: missing {name}; a reference model directory holds {REF_CONFIG} and {REF_WEIGHTS}")
    try:
        ref = json.loads(files[REF_CONFIG])
        if not isinstance(ref, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{where}/{REF_CONFIG} is not valid JSON ({e})") from None
    if "n_mlp" in ref:
        ref["d_mlp"] = ref.pop("n_mlp")
    for k, ok in _REF_UNSUPPORTED.items():
        if k in ref and ref[k] != ok:
            raise CheckpointError(f"{where}: {k}={ref[k]!r} is not supported (csp implements {k}={ok!r})")
    known = set(_REF_FIELDS) | set(_REF_UNSUPPORTED) | _REF_IGNORED
    unknown = sorted(set(ref) - known)
    if unknown:
        raise CheckpointError(f"{where}/{REF_CONFIG}: unknown field(s) {unknown}")
    kw = {k: ref[k] for k in _REF_FIELDS if k in ref and ref[k] is not None}
    if "d_head" not in kw and "d_model" in kw:
        kw["d_head"] = kw["d_model"] // kw.get("n_head", ModelConfig.n_head)
    if "d_mlp" not in kw and "d_model" in kw:
        kw["d_mlp"] = 4 * kw["d_model"]
    if ref.get("afrac", "unset") is None:
        kw["afrac"] = None
    if "rms_norm" not in kw:
        kw["rms_norm"] = False  # the reference default
    if "tied_unembed" not in kw:
        kw["tied_unembed"] = True  # the reference default
    try:
        mcfg = ModelConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}/{REF_CONFIG}: {e}") from None
    try:
        state = torch.load(io.BytesIO(files[REF_WEIGHTS]), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{where}/{REF_WEIGHTS} is unreadable ({type(e).__name__}); is the file complete?") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}/{REF_WEIGHTS} holds a {type(state).__name__}, not a state dict")
    # The reference's non-flash attention keeps a causal-mask buffer named `bias`.
    state = {k: v for k, v in state.items() if not (k.endswith(".attn.bias") and v.dim() == 4)}
    state.setdefault("final_logits_bias", torch.zeros(mcfg.vocab_size))
    density = _density(state)
    run = RunConfig(model=mcfg, sparsity=SparsityConfig(pfrac=max(density, 1e-6)))
    model = GPT(mcfg)
    load_state(model, state, where)
    wsha = hashlib.sha256(_state_bytes(model)).hexdigest()
    meta = {"format_version": FORMAT_VERSION, "run": run.to_dict(), "step": 0, "imported_from": "reference",
            "weights_sha256": wsha, "fingerprint": identity(wsha, run.to_dict()), "where": where}
    return Checkpoint(run, model.state_dict(), meta)


def _density(state: dict[str, torch.Tensor]) -> float:
    mats = [v for k, v in state.items() if k.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight"))]
    n = sum(v.numel() for v in mats)
    return float(sum(int((v != 0).sum()) for v in mats) / n) if n else 1.0


def describe(ckpt: Checkpoint) -> dict:
    """Config, nonzeros per matrix and parameter counts (for `csp model info`)."""
    model = ckpt.build_model()
    from sparsity.topk import sparse_targets

    mats = {t.name: {"shape": list(t.param.shape), "nonzeros": int((t.param != 0).sum()), "numel": t.param.numel()} for t in sparse_targets(model)}
    total = sum(p.numel() for p in model.parameters())
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    return {
        "step": ckpt.step,
        "fingerprint": ckpt.fingerprint,
        "model": dataclasses.asdict(ckpt.config.model),
        "sparsity": dataclasses.asdict(ckpt.config.sparsity),
        "params": total,
        "nonzero_params": nz,
        "matrices": mats,
        "metrics": ckpt.meta.get("metrics", {}),
    }
