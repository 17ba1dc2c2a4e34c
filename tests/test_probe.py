"""The outside-the-corpus quote probe (sparsity/probe.py) and benchmarks/learning_curve.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsity import corpus, probe
from sparsity.config import ModelConfig
from sparsity.model import GPT

ROOT = Path(__file__).resolve().parents[1]


def test_probe_lines_come_from_outside_the_default_corpus():
    """The probe reads installed third-party packages, never the standard library the
    default corpus is made of."""
    stdlib = corpus.default_corpus_root().resolve()
    roots = probe.outside_roots()
    assert roots
    for r in roots:
        assert stdlib not in r.parents and r != stdlib and r.is_dir()


def test_probe_pairs_are_deterministic_flipped_and_fit_the_context(stdlib_tokenizer):
    """The same seed gives the same pairs; each corrupt prompt is its clean one with only the
    string's opening quote flipped; answers are the closing quote + newline, one token each;
    every prompt fits ``max_tokens`` with its leading <|endoftext|>."""
    a = probe.quote_pairs(stdlib_tokenizer, n=48, seed=3, max_tokens=48)
    assert a == probe.quote_pairs(stdlib_tokenizer, n=48, seed=3, max_tokens=48)
    assert a != probe.quote_pairs(stdlib_tokenizer, n=48, seed=4, max_tokens=48)
    assert len({p.clean for p in a}) == 48
    for p in a:
        assert {p.target, p.alt} == {"'\n", '"\n'}
        diff = [i for i, (x, y) in enumerate(zip(p.clean, p.corrupt, strict=True)) if x != y]
        assert len(diff) == 1 and p.clean[diff[0]] == p.target[0] and p.corrupt[diff[0]] == p.alt[0]
        last_line = p.clean.rsplit("\n", 1)[-1]
        assert last_line[diff[0] - (len(p.clean) - len(last_line))] == p.target[0]  # the flip is on the cut line
        assert max(len(stdlib_tokenizer.encode(p.clean)), len(stdlib_tokenizer.encode(p.corrupt))) + 1 <= 48
    qp = probe.QuoteProbe(stdlib_tokenizer, pairs=a, max_tokens=48)
    assert qp.batch.clean.shape[1] <= 48 and len(qp.batch) == 48


def test_probe_scores_a_one_quote_model_at_half_accuracy_and_the_hand_computed_loss(stdlib_tokenizer):
    """A model that always prefers one quote by a margin of 3 scores accuracy exactly ½ (each
    pair asks for both quotes) and the loss a hand computation gives for that margin."""
    pairs = probe.quote_pairs(stdlib_tokenizer, n=16, max_tokens=64)
    qp = probe.QuoteProbe(stdlib_tokenizer, pairs=pairs, max_tokens=64)
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=64, d_model=32, n_head=2, d_mlp=64, afrac=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.final_logits_bias.zero_()
        model.final_logits_bias[stdlib_tokenizer.encode("'\n")[0]] = 3.0  # always says '
    res = qp.score(model)
    assert res["n"] == 16 and res["accuracy"] == pytest.approx(0.5)
    # one side is right with margin 3, the other wrong with margin 3: log(1+e^-3) + log(1+e^3)
    assert res["loss"] == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-3.0)) + torch.nn.functional.softplus(torch.tensor(3.0))), rel=1e-4)


def test_probe_refuses_to_return_fewer_pairs_than_asked(stdlib_tokenizer, tmp_path):
    """Too little outside code is a clear error, not a short probe."""
    (tmp_path / "a.py").write_text("x = 1\nname = 'hello'\n")
    with pytest.raises(ValueError, match="found 1 quote-closing lines outside the corpus, need 5"):
        probe.quote_pairs(stdlib_tokenizer, n=5, roots=[tmp_path])


@pytest.mark.slow
def test_learning_curve_smoke_run_evaluates_every_point():
    """`benchmarks/learning_curve.py --smoke` trains its tiny points with evaluations part-way
    and at the end (val loss with its standard error, tasks, the probe) and prints JSON."""
    r = subprocess.run([sys.executable, "benchmarks/learning_curve.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["evaluations"] == 4 and len(out["points"]) == 2
    for p in out["points"]:
        assert p["val_loss"] > 0 and 0 < p["val_se"] < 1
    assert any(p["probe_acc"] is not None for p in out["points"])


def test_learning_curve_mix_replaces_a_share_of_the_stream_with_task_programs_held_out_pairs_excluded(tmp_path):
    """``mix=`` (benchmarks/learning_curve.py:mixed_stream): the stream keeps its length; about
    that share of it becomes completed task programs, whole documents; none is the completed
    program of a pair that pruning selects k on or tests on; the stdlib text around them is
    unchanged."""
    import importlib.util

    import numpy as np

    from sparsity import tasks, tokenizer
    from sparsity.prune import SELECT_SEED
    from sparsity.tasks import TEST_SEED

    spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "benchmarks" / "learning_curve.py")
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    lc._smoke_cache(tmp_path, probe)
    base = np.load(tmp_path / "train.npy")
    mixed = lc.mixed_stream(tmp_path, 0.05)
    assert mixed.shape == base.shape and mixed.dtype == base.dtype
    tok = tokenizer.load(tmp_path / "tokenizer")

    def docs(stream) -> list[str]:
        out, cur = [], []
        for t in stream.tolist():
            if t == tok.eot_id:
                out.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        return out

    before, after = docs(base), docs(mixed)
    programs = {t.complete(prompt + ans) for t in tasks.REGISTRY.values() if t.complete is not None
                for rnd in range(4) for p in t.pairs(64, lc.MIX_SEED + rnd, at_least=1) for prompt, ans in ((p.clean, p.target), (p.corrupt, p.alt))}
    added = [d for d in after if d in programs]
    share = sum(len(tok.encode(d)) + 1 for d in added) / len(base)
    assert 0.04 < share < 0.06, share
    held = {t.complete(prompt + ans) for t in tasks.REGISTRY.values() if t.complete is not None
            for sd in (TEST_SEED, SELECT_SEED) for p in t.pairs(256, sd, at_least=1) for prompt, ans in ((p.clean, p.target), (p.corrupt, p.alt))}
    assert not held & set(after)
    stdlib = [d for d in after if d not in programs and d not in before[len(before) - 1:]]
    assert set(stdlib) <= set(before)  # the stdlib documents are whole and unchanged (the last one may be cut)
