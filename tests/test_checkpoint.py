import json

import pytest
import torch
from conftest import tiny_config

from cluster import checkpoints, storage
from sparsity import checkpoint_format as ckpt_lib
from sparsity.model import GPT

# The reference GPTConfig's fields (openai/circuit_sparsity, inference/gpt.py): its loader
# calls GPTConfig(**beeg_config), so an export may use no other key.
REFERENCE_FIELDS = {
    "block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model", "dropout", "bias", "ln_bias", "rms_norm",
    "residual_activation_type", "activation_type", "afrac", "afrac_loctypes", "debug_nans", "tied_unembed",
    "tokenizer_name", "grad_checkpointing", "d_mlp", "enable_bigram_table", "learnable_bigram_table", "d_pos_emb",
    "dropout_cat_pos_emb", "sinusoidal_cat_pos_emb", "enable_sparse_kernels", "flash", "sink",
}


def _trained(**over):
    torch.manual_seed(0)
    cfg = tiny_config(**over)
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for b in model.transformer.h:
            if b.attn.attn_imp is not None:
                b.attn.attn_imp.sink_logit.fill_(0.3)
    return cfg, model


IDX = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_then_load_gives_identical_logits(where, tmp_path, s3_prefix):
    """A checkpoint written to a path or to S3 and read back gives bit-identical logits."""
    cfg, model = _trained(m__sink=True)
    run = str(tmp_path / "run") if where == "local" else s3_prefix
    checkpoints.save(run, ckpt_lib.to_files(model, cfg, 7), 7)
    loaded = checkpoints.load(run)
    assert loaded.step == 7 and loaded.config == cfg
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(IDX), model(IDX))


def test_keep_last_drops_old_checkpoints_and_latest_points_at_the_newest(tmp_path):
    cfg, model = _trained()
    run = str(tmp_path / "run")
    for step in (10, 20, 30):
        checkpoints.save(run, ckpt_lib.to_files(model, cfg, step), step, keep_last=2)
    assert checkpoints.latest_step(run) == 30
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest.json", "step-00000020", "step-00000030"]
    assert checkpoints.load(str(tmp_path / "run" / "checkpoints" / "step-00000020")).step == 20


@pytest.mark.parametrize("over", [{}, {"m__sink": True}, {"m__enable_bigram_table": True, "m__learnable_bigram_table": True},
                                  {"m__tied_unembed": True, "m__rms_norm": False}, {"m__afrac": None}])
def test_reference_export_then_import_is_identical(over, tmp_path):
    """Export to beeg_config.json + final_model.pt, import back: same config fields, same logits."""
    cfg, model = _trained(**over)
    checkpoints.save(str(tmp_path / "run"), ckpt_lib.to_files(model, cfg, 1), 1)
    checkpoints.export_reference(str(tmp_path / "run"), str(tmp_path / "ref"))
    ref_cfg = json.loads((tmp_path / "ref" / "beeg_config.json").read_text())
    assert set(ref_cfg) <= REFERENCE_FIELDS
    sd = torch.load(tmp_path / "ref" / "final_model.pt", weights_only=True)
    assert "transformer.h.0.attn.c_attn.weight" in sd and "lm_head.weight" in sd and "final_logits_bias" in sd
    back = checkpoints.import_reference(str(tmp_path / "ref"), str(tmp_path / "imported"))
    assert back.config.model == cfg.model
    with torch.no_grad():
        assert torch.equal(checkpoints.load(str(tmp_path / "imported")).build_model()(IDX), model(IDX))


def test_import_accepts_reference_quirks(tmp_path):
    """n_mlp for d_mlp, d_head/d_mlp defaults, the non-flash causal-mask buffer, no final_logits_bias."""
    cfg, model = _trained(m__tied_unembed=True, m__rms_norm=False, m__d_head=16)
    files = ckpt_lib.export_reference(model)
    ref = json.loads(files["beeg_config.json"])
    ref["n_mlp"] = ref.pop("d_mlp")
    ref.pop("d_head")
    ref.update(flash=False, grad_checkpointing=True)
    sd = torch.load(__import__("io").BytesIO(files["final_model.pt"]), weights_only=True)
    sd.pop("final_logits_bias")
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    ck = ckpt_lib.import_reference({"beeg_config.json": json.dumps(ref).encode(), "final_model.pt": buf.getvalue()})
    with torch.no_grad():
        assert torch.equal(ck.build_model()(IDX), model(IDX))


@pytest.mark.parametrize("damage, fragment", [
    ("truncate_weights", "model.safetensors does not belong with config.json"),
    ("bad_config", "not a valid checkpoint config"),
    ("missing_weights", "missing model.safetensors"),
    ("wrong_shape", "shape mismatch"),
    ("truncate_state", "train_state.pt is unreadable"),
    ("other_config", "model.safetensors does not belong with config.json"),
])
def test_corrupted_checkpoints_fail_with_one_clear_error(damage, fragment, tmp_path):
    cfg, model = _trained()
    files = ckpt_lib.to_files(model, cfg, 3, train_state={"step": 3, "optimizer": {}})
    if damage == "truncate_weights":
        files["model.safetensors"] = files["model.safetensors"][:1000]
    elif damage == "bad_config":
        files["config.json"] = b"{"
    elif damage == "missing_weights":
        del files["model.safetensors"]
    elif damage == "truncate_state":
        files["train_state.pt"] = files["train_state.pt"][:50]
    elif damage == "other_config":  # config.json of another checkpoint (self-consistent, other weights)
        cfg2, model2 = _trained(t__seed=1)
        with torch.no_grad():
            next(model2.parameters()).add_(1.0)
        files["config.json"] = ckpt_lib.to_files(model2, cfg2, 3)["config.json"]
    else:  # a config whose own fingerprint was recomputed, over weights of another shape
        meta = json.loads(files["config.json"])
        meta["run"]["model"]["d_mlp"] = 128
        meta["fingerprint"] = ckpt_lib.identity(meta["weights_sha256"], meta["run"])
        files["config.json"] = json.dumps(meta).encode()
    with pytest.raises(ckpt_lib.CheckpointError, match=fragment) as e:
        ckpt_lib.from_files(files).build_model()
    assert "\n" not in str(e.value)


def test_an_edited_head_split_is_refused_naming_config_json(tmp_path):
    """Same tensor shapes, another model: 4 heads × 16 → 2 × 32 must not load silently
    under the old fingerprint (the model id and the prune store key derive from it)."""
    from cluster import checkpoints

    cfg, model = _trained()
    m = cfg.model
    run = tmp_path / "run"
    checkpoints.save(str(run), ckpt_lib.to_files(model, cfg, 3), 3)
    original = checkpoints.load(str(run), with_train_state=False).fingerprint
    cfile = run / "checkpoints" / "step-00000003" / "config.json"
    meta = json.loads(cfile.read_text())
    meta["run"]["model"].update(n_head=m.n_head // 2, d_head=m.d_head * 2)
    cfile.write_text(json.dumps(meta))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"config.json was edited") as e:
        checkpoints.load(str(run), with_train_state=False)
    assert "model.safetensors" not in str(e.value)
    # The fingerprint covers the config: the same weights under the other split are another id.
    other = ckpt_lib.identity(meta["weights_sha256"], meta["run"])
    assert other != original and ckpt_lib.identity(meta["weights_sha256"], cfg.to_dict()) == original


@pytest.mark.parametrize("edit, fragment", [
    (lambda r, sd: r.update(d_pos_emb=16), "d_pos_emb=16 is not supported"),
    (lambda r, sd: r.update(made_up=1), "unknown field"),
    (lambda r, sd: sd.update({"extra.weight": torch.zeros(2)}), "unknown extra.weight"),
    (lambda r, sd: sd.pop("lm_head.weight"), "missing lm_head.weight"),
])
def test_bad_reference_models_fail_clearly(edit, fragment):
    import io

    _, model = _trained()
    files = ckpt_lib.export_reference(model)
    ref = json.loads(files["beeg_config.json"])
    sd = torch.load(io.BytesIO(files["final_model.pt"]), weights_only=True)
    edit(ref, sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    with pytest.raises(ckpt_lib.CheckpointError, match=fragment):
        ckpt_lib.import_reference({"beeg_config.json": json.dumps(ref).encode(), "final_model.pt": buf.getvalue()})


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint at"):
        checkpoints.load(str(tmp_path))
    assert not storage.ls(str(tmp_path))
