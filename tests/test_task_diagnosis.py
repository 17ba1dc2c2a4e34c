"""benchmarks/task_diagnosis.py: why a task is stuck (model, corpus prior, constructions, fine-tuning control)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0


def test_task_diagnosis_smoke_run():
    """`--smoke` diagnoses two tasks on a tiny random model and prints one JSON object in
    which every task has the model's split per side, a corpus prior from a suffix of at least
    one token, construction counts, an answer-tokenization check and a fine-tuning curve at
    the step counts asked for that kept the zeroed weights zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/task_diagnosis.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["threads"] == 1 and out["train_tokens"] > 10_000
    assert set(out["tasks"]) == {"if_ternary", "indent_for"}
    assert out["corpus_files"]["parsed"] > 0
    for name, t in out["tasks"].items():
        m = t["model"]
        for k in ("loss", "ce_clean", "ce_corrupt"):
            assert _finite(m[k]), (name, k, m[k])
        # the pair loss is the two sides' binary CEs summed
        assert abs(m["loss"] - (m["ce_clean"] + m["ce_corrupt"])) < 2e-3, (name, m)
        for k in ("accuracy", "prefers_target_clean", "prefers_target_corrupt"):
            assert 0 <= m[k] <= 1
        for key in ("suffix_prior", "suffix_prior_names"):
            p = t[key]
            assert p["pairs"] == out["settings"]["test_pairs"]
            assert _finite(p["loss"]) and p["loss"] >= math.log(4) - 1e-6  # shared by both prompts: never below chance
            assert 1 <= p["length_mean"] <= out["settings"]["max_suffix"]
            assert p["examples"] and all(e["length"] >= 1 and e["occurrences"] >= e["n_target"] + e["n_alt"] for e in p["examples"])
        assert _finite(t["own_suffix_prior"]["loss"])
        c = t["in_context_copy"]
        assert abs(c["copy_is_answer"] + c["copy_is_other_answer"] + c["copy_is_neither"] - 1) < 1e-3
        assert t["corpus"] and all(v["count"] >= 0 and _finite(v["per_million_tokens"]) for v in t["corpus"].values())
        assert 0 <= t["tokenization"]["answer_as_in_completed_program"] <= 1
        ft = t["finetune"]
        assert [p["step"] for p in ft["curve"]] == [0, 3, 6]
        assert ft["curve"][0]["loss"] == m["loss"]  # step 0 is the model itself
        assert all(_finite(p["loss"]) and 0 <= p["accuracy"] <= 1 for p in ft["curve"])
        assert ft["sparse_matrices"] > 0 and ft["nonzero_after"] == ft["nonzero_before"] > 0
        assert _finite(ft["seconds"]) and _finite(ft["lm_loss_after"])
    assert out["tasks"]["if_ternary"]["corpus"]["ifexp"]["count"] > 0
    assert out["seconds"]["total"] < 60
