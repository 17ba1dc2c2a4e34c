"""A hand-built model with a known quote circuit, hidden among distractor weights: pruning
must find the circuit, and its stored verification numbers must be recomputable."""

import dataclasses
import json

import pytest
import torch

from sparsity import prune as prune_lib
from sparsity import scoring, skip
from sparsity import tasks as task_lib
from sparsity.config import ModelConfig
from sparsity.model import GPT
from sparsity.tasks.base import TEST_SEED
from sparsity.tasks.tensors import encode, pair_loss

# The planted path, as node hook names and indices (layer 0 only):
#   residual ch0 = "a ' token here", ch1 = "a \" token here", ch2 = constant (every token)
#   attn.act_in[0,1] → attn.k[0] (keys light up on quote tokens; the query q[0] reads the
#   constant ch2, so it is the same everywhere and mean-ablating it changes nothing)
#   attn.act_in[0] → attn.v[0], attn.act_in[1] → attn.v[1] (the v channels also read noise
#   from non-quote tokens, so without the key's focus the copied quote type drowns)
#   attn.v[0] → attn.resid_delta[3], attn.v[1] → attn.resid_delta[4]
#   the unembedding reads ch3 (for '\n) against ch4 (for "\n)
G = 0.5  # unembedding gain on the two answer channels: held-out loss ≈ 0.02

PLANTED = {"0.attn.act_in": {0, 1}, "0.attn.k": {0}, "0.attn.v": {0, 1}, "0.attn.resid_delta": {3, 4}}


def _quote_task():
    from sparsity.tasks import REGISTRY

    return REGISTRY["single_double_quote"]


def planted_model(tok, gain: float = G) -> GPT:
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=1, d_head=8, d_model=16, d_mlp=16, afrac=None)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    g = torch.Generator().manual_seed(1)

    def distract(shape, density=0.3, scale=0.3):
        return torch.randn(*shape, generator=g) * scale * (torch.rand(*shape, generator=g) < density)

    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for name, p in m.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
        wte = m.transformer.wte.weight
        wte[:, 2] = 1.0
        wte[:, 5:] = distract((cfg.vocab_size, 11))
        for i in range(tok.n_vocab - 1):
            b = tok.encoding.decode_single_token_bytes(i)
            if b"'" in b and b'"' not in b:
                wte[i, 0], wte[i, 5:] = 3.0, 0.0
            elif b'"' in b and b"'" not in b:
                wte[i, 1], wte[i, 5:] = 3.0, 0.0
        attn = m.transformer.h[0].attn
        W = attn.c_attn.weight  # rows: q 0-7 | k 8-15 | v 16-23
        W[0, 2] = 10.0  # q0 ← constant
        W[8, 0] = W[8, 1] = 10.0  # k0 ← either quote
        W[16, 0] = 5.0  # v0 ← '
        W[17, 1] = 5.0  # v1 ← "
        W[1:8, 5:] = distract((7, 11))  # distractor q/k/v channels read distractor residual channels
        W[9:16, 5:] = distract((7, 11))
        W[18:24, 5:] = distract((6, 11))
        # v0/v1 also pick up noise from other tokens: harmless when the key focuses attention
        # on the (noise-free) quote token, fatal when attention spreads — so k0 is needed.
        W[16:18, 5:] = distract((2, 11), density=1.0, scale=1.5)
        P = attn.c_proj.weight  # (d_model, d_head)
        P[3, 0] = 2.0
        P[4, 1] = 2.0
        P[5:, 2:] = distract((11, 6))
        mlp = m.transformer.h[0].mlp
        mlp.c_fc.weight[:, 5:] = distract((16, 11))
        mlp.c_proj.weight[5:, :] = distract((11, 16))
        head = m.lm_head.weight
        head[:, 5:] = distract((cfg.vocab_size, 11), scale=0.2)
        t, a = tok.encode("'\n")[0], tok.encode('"\n')[0]
        # Confident but not saturated (held-out loss ~0.02, like a trained model): a loss of
        # 1e-9 would leave no gradient to tell needed nodes from idle ones.
        head[t, 3], head[t, 4] = gain, -gain
        head[a, 3], head[a, 4] = -gain, gain
    return m


@pytest.mark.slow
def test_pruning_recovers_the_planted_quote_circuit(stdlib_tokenizer, stdlib_rows):
    tok, task = stdlib_tokenizer, _quote_task()
    model = planted_model(tok)
    test = encode(task, tok, prune_lib.PruneConfig().n_test, TEST_SEED, 64)  # the pairs the circuit was verified on
    with torch.no_grad():
        full = pair_loss(*test.answer_logits(model), test.target, test.alt).mean()
    assert 0.001 < full < 0.15, f"the planted model must solve the task (loss {full:.4f})"

    pretrain = [torch.from_numpy(stdlib_rows[0][i * 32 : (i + 1) * 32].astype("int64")) for i in range(4)]
    circuit = prune_lib.prune(model, task, tok, prune_lib.PruneConfig(), pretrain)
    kept: dict[str, set] = {}
    for layer, loc, idx in circuit.nodes:
        kept.setdefault(f"{layer}.{loc}", set()).add(idx)
    for name, idxs in PLANTED.items():
        assert idxs <= kept.get(name, set()), (name, kept)
    planted_size = sum(map(len, PLANTED.values()))
    assert circuit.metrics["status"] == "ok" and len(circuit.nodes) <= 2 * planted_size

    # Recompute sufficiency and necessity independently, with plain hook replacements.
    means = prune_lib.node_means(model, pretrain)
    keep = {n: torch.zeros_like(v) for n, v in means.items()}
    for layer, loc, idx in circuit.nodes:
        keep[f"{layer}.{loc}"][idx] = 1.0

    def run(mask):
        fns = {n: (lambda m_, mu: (lambda x: x * m_ + mu * (1 - m_)))(mask[n], means[n]) for n in means}
        with torch.no_grad(), model.hooks.replace(fns):
            return float(pair_loss(*test.answer_logits(model), test.target, test.alt).mean())

    assert run(keep) == pytest.approx(circuit.metrics["sufficiency_loss"], rel=1e-5, abs=1e-6)
    assert run({n: 1 - v for n, v in keep.items()}) == pytest.approx(circuit.metrics["necessity_loss"], rel=1e-5, abs=1e-6)
    assert circuit.metrics["sufficiency_loss"] <= 0.15 < circuit.metrics["necessity_loss"]
    # ablating the circuit hurts far more than ablating as many random nodes
    assert circuit.metrics["necessity_loss"] > circuit.metrics["necessity_random_loss"]
    # its sufficiency controls: clearly better than random node sets of its size, and it still
    # works when only some of the other nodes are ablated
    m = circuit.metrics
    assert m["beats_random_keep"] and m["random_keep_best"] > 0.15 >= m["sufficiency_loss"]
    assert m["random_keep_best"] <= min(m["random_keep_loss"], m["random_keep_loc_loss"])
    assert m["partial_ablation_loss"] <= m["partial_ablation_worst"] < m["random_keep_best"]
    curve = json.loads(circuit.metrics["convergence"])
    assert curve[-1][0] == m["mask_steps"] <= prune_lib.PruneConfig().steps and curve[-1][2] < curve[0][2]  # gates closed over training


def test_a_planted_model_that_misses_the_target_is_stored_as_such_and_not_pruned(stdlib_tokenizer, stdlib_rows, tmp_path):
    """Weak unembedding: right answers (accuracy 1) but a loss above the target → model_misses_target, no nodes."""
    from jobs import results
    from jobs import store as store_lib

    tok, task = stdlib_tokenizer, _quote_task()
    model = planted_model(tok, gain=0.05)
    pretrain = [torch.from_numpy(stdlib_rows[0][:32].astype("int64"))]
    cfg = prune_lib.PruneConfig()
    c = prune_lib.prune(model, task, tok, cfg, pretrain)
    assert c.metrics["status"] == "model_misses_target" and c.nodes == [] and c.edges == []
    assert c.metrics["full_accuracy"] == 1.0 and 0.15 < c.metrics["full_loss"] < task_lib.CHANCE_LOSS
    assert "convergence" not in c.metrics  # nothing was trained
    store = str(tmp_path / "results")
    store_lib.write_result(store, {"model_id": "weak", "checkpoint_fingerprint": "w"}, task.name, c, cfg=cfg)
    row = results.circuits(store).iloc[0]
    assert row["status"] == "model_misses_target" and row["full_misses_target"]
    assert row[["n_nodes", "n_edges", "k"]].isna().all()  # no circuit: its counts are "not applicable", not 0
    assert results.nodes(store).empty and results.frontier(store)["tasks_with_circuit"].tolist() == [0]


@pytest.mark.slow
def test_pruning_is_deterministic_and_calibration_runs(stdlib_tokenizer, stdlib_rows):
    """Same seeds → the same circuit; calibration fits a positive scale and still meets the target."""
    tok, task = stdlib_tokenizer, _quote_task()
    model = planted_model(tok)
    pretrain = [torch.from_numpy(stdlib_rows[0][i * 32 : (i + 1) * 32].astype("int64")) for i in range(2)]
    cfg = prune_lib.PruneConfig(steps=120)
    a = prune_lib.prune(model, task, tok, cfg, pretrain)
    b = prune_lib.prune(model, task, tok, cfg, pretrain)
    assert a.nodes == b.nodes and a.edges == b.edges and a.metrics["sufficiency_loss"] == b.metrics["sufficiency_loss"]
    assert a.metrics["convergence"] == b.metrics["convergence"]
    # --seed drives τ-init noise and the pair batches, under mean ablation too
    s1 = prune_lib.prune(model, task, tok, prune_lib.PruneConfig(steps=120, seed=1), pretrain)
    assert s1.metrics["convergence"] != a.metrics["convergence"]
    c = prune_lib.prune(model, task, tok, prune_lib.PruneConfig(steps=120, calibrate=True), pretrain)
    assert c.metrics["calibration_scale"] > 0 and c.metrics["status"] == "ok"


def _pretrain(rows, n=2):
    return [torch.from_numpy(rows[0][i * 32 : (i + 1) * 32].astype("int64")) for i in range(n)]


def test_the_planted_circuit_beats_random_node_sets_and_a_random_circuit_does_not(stdlib_tokenizer, stdlib_rows):
    """score_nodes on the planted path: verified and clearly better than random sets of its
    size; on as many nodes drawn at random: no better than other random sets."""
    tok, task = stdlib_tokenizer, _quote_task()
    model, pretrain = planted_model(tok), _pretrain(stdlib_rows)
    planted = [(0, name.split(".", 1)[1], i) for name, idxs in PLANTED.items() for i in sorted(idxs)]
    cfg = prune_lib.PruneConfig()
    good = prune_lib.score_nodes(model, task, tok, planted, cfg, pretrain)
    assert good["k"] == len(planted) and good["sufficiency_loss"] <= 0.15 < good["ablated_loss"]
    assert good["beats_random_keep"] and good["random_keep_best"] - good["sufficiency_loss"] >= cfg.target
    assert 0 < good["random_keep_recovered"] < 1  # random sets get part of the way, not all
    g = torch.Generator().manual_seed(5)
    names = prune_lib.node_names(model.config)
    sizes = {n: int(v.numel()) for n, v in prune_lib.node_means(model, pretrain).items()}
    everything = [(int(n.split(".", 1)[0]), n.split(".", 1)[1], i) for n in names for i in range(sizes[n])]
    drawn = [everything[i] for i in torch.randperm(len(everything), generator=g)[: len(planted)].tolist()]
    bad = prune_lib.score_nodes(model, task, tok, drawn, cfg, pretrain)
    assert not bad["beats_random_keep"] and bad["sufficiency_loss"] > 0.15
    with pytest.raises(ValueError, match="out of range"):
        prune_lib.score_nodes(model, task, tok, [(0, "attn.q", 99)], cfg, pretrain)


@pytest.mark.slow
def test_two_targets_from_one_mask_training_equal_two_single_target_runs(stdlib_tokenizer, stdlib_rows, monkeypatch):
    """prune_targets bisects each target from the same masks; each row is what a run at that
    target alone returns (so it is stored under that run's key), and the looser target's
    circuit is no larger. Where both targets land on one circuit, its test-pair measurements
    (verification, controls) are taken once and serve both rows."""
    tok, task = stdlib_tokenizer, _quote_task()
    model, pretrain = planted_model(tok), _pretrain(stdlib_rows)
    cfg = prune_lib.PruneConfig(steps=120, also_targets=(0.30,))
    calls = {"verify_losses": 0, "control_losses": 0}  # the real functions, counted

    def counting(name, fn):
        def counted(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return counted

    for name in calls:
        monkeypatch.setattr(scoring, name, counting(name, getattr(scoring, name)))
    strict, loose = prune_lib.prune_targets(model, task, tok, cfg, pretrain)
    assert strict.metrics["k"] == loose.metrics["k"]  # the planted circuit meets both targets
    assert calls == {"verify_losses": 1, "control_losses": 1}
    alone = prune_lib.prune(model, task, tok, prune_lib.PruneConfig(steps=120, target=0.30), pretrain)
    assert calls == {"verify_losses": 2, "control_losses": 2}
    assert loose.nodes == alone.nodes
    for key in ("sufficiency_loss", "sufficiency_accuracy", "necessity_loss", "necessity_random_loss", "random_keep_loss",
                "random_keep_loc_loss", "random_keep_best", "random_keep_recovered", "beats_random_keep",
                "partial_ablation_loss", "partial_ablation_worst"):
        assert loose.metrics[key] == alone.metrics[key], key
    assert loose.provenance["prune_key"] == prune_lib.PruneConfig(steps=120, target=0.30).key() != strict.provenance["prune_key"]
    assert strict.provenance["prune_key"] == prune_lib.PruneConfig(steps=120).key()
    assert strict.metrics["target"] == 0.15 and loose.metrics["target"] == 0.30
    assert strict.metrics["status"] == loose.metrics["status"] == "ok" and len(loose.nodes) <= len(strict.nodes)


def _prune_both_paths(model, task, tok, cfg, pretrain):
    """(plain, fast): every block at every position with plain linear layers; then the
    defaults (read positions only, shared prefixes, linear layers skipping the columns
    closed gates hold fixed, sparsity/skip.py)."""
    out = []
    try:
        for fast in (False, True):
            model.read_positions_only = skip.enabled = fast
            out.append(prune_lib.prune_targets(model, task, tok, cfg, pretrain))
    finally:
        model.read_positions_only = skip.enabled = True
    return out


def _same_circuits(plain, fast):
    for a, b in zip(plain, fast, strict=True):
        assert a.nodes == b.nodes and a.edges == b.edges
        for key in ("status", "k", "n_open"):
            assert a.metrics[key] == b.metrics[key], key
        for key in ("full_loss", "selection_loss", "sufficiency_loss", "necessity_loss", "ablated_loss"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-4, abs=1e-5), key
        ca, cb = json.loads(a.metrics["convergence"]), json.loads(b.metrics["convergence"])
        assert [r[::2] for r in ca] == [r[::2] for r in cb]  # (step, open gates) exactly
        assert [r[1] for r in ca] == pytest.approx([r[1] for r in cb], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_reading_positions_only_changes_no_mask_loss_or_k_on_any_task(stdlib_tokenizer, stdlib_rows):
    """Pruning with the last block at the read positions alone and each corrupt prompt run
    from where it departs from its clean twin (the defaults) trains the same masks, scores
    the same losses and chooses the same k as the plain path, on every task (pruned anyway
    where the planted model is at chance)."""
    tok, model, pretrain = stdlib_tokenizer, planted_model(stdlib_tokenizer), _pretrain(stdlib_rows)
    cfg = prune_lib.PruneConfig(steps=40, n_train=64, n_select=32, n_test=32, batch_pairs=16, prune_anyway=True)
    pruned = 0
    skipped = dict(skip.counts)
    for task in task_lib.REGISTRY.values():
        plain, fast = _prune_both_paths(model, task, tok, cfg, pretrain)
        _same_circuits(plain, fast)
        pruned += plain[0].metrics["n_open"] is not None
    assert pruned == len(task_lib.REGISTRY)  # every task trained masks (none trivial)
    assert all(skip.counts[k] > skipped[k] for k in skipped)  # the fast path did skip closed columns, both ways


@pytest.mark.slow
def test_reading_positions_only_matches_the_plain_path_under_resample_ablation_in_two_layers(stdlib_tokenizer, stdlib_rows):
    """Two layers (the first runs in full, the last at the read positions) and resample
    ablation, whose values depend on the position each hook point holds."""
    tok = stdlib_tokenizer
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, d_model=32, n_head=2, d_head=8, d_mlp=64, afrac=0.5)).eval()
    cfg = prune_lib.PruneConfig(steps=30, n_train=32, n_select=16, n_test=16, batch_pairs=8, prune_anyway=True,
                                ablation="resample")
    plain, fast = _prune_both_paths(model, _quote_task(), tok, cfg, _pretrain(stdlib_rows))
    assert plain[0].metrics["n_open"] is not None
    _same_circuits(plain, fast)


@pytest.mark.slow
def test_mask_training_stops_at_the_first_point_the_rule_holds_and_says_why(stdlib_tokenizer, stdlib_rows):
    """With stop_window the masks train until the record has been flat for the window (never
    before the floor) and the row says so; without, every step runs. Both verify the planted path."""
    tok, task = stdlib_tokenizer, _quote_task()
    model, pretrain = planted_model(tok), _pretrain(stdlib_rows)
    cfg = prune_lib.PruneConfig(steps=300, batch_pairs=16, stop_window=45)
    early = prune_lib.prune(model, task, tok, cfg, pretrain)
    full = prune_lib.prune(model, task, tok, dataclasses.replace(cfg, stop_window=0), pretrain)
    curve = json.loads(early.metrics["convergence"])
    assert early.metrics["stop_reason"] == "converged" and early.metrics["mask_steps"] == curve[-1][0] < 300
    floor = max(2 * 15, int(0.05 * 300))
    assert prune_lib.converged(curve, 45, floor) and not any(prune_lib.converged(curve[:i], 45, floor) for i in range(1, len(curve)))
    assert full.metrics["stop_reason"] == "max_steps" and full.metrics["mask_steps"] == 300
    assert json.loads(full.metrics["convergence"])[: len(curve)] == curve  # the same run up to the stop
    assert early.metrics["status"] == full.metrics["status"] == "ok"
    assert {(0, loc, i) for n, idx in PLANTED.items() for i in idx for loc in [n.split(".", 1)[1]]} <= set(early.nodes)
    phases = json.loads(early.metrics["phase_seconds"])
    assert {"setup", "masks", "choose_k", "verify", "controls", "edges"} <= set(phases)
    assert sum(phases.values()) <= early.metrics["prune_seconds"] + 0.01  # each phase rounded to ms
