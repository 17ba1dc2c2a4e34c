"""benchmarks/gpu.py, the one prepared command for a GPU machine, run here at its smoke
sizes on CPU: the same code path, so a GPU lease is never spent finding a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_passes_every_section_on_cpu():
    """`benchmarks/gpu.py --device cpu --smoke` exits 0 with every invariant passed under bf16
    autocast, dense and sparse step timings, a trained checkpoint and a pruning verdict."""
    r = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--smoke"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["passed"] and out["failed_sections"] == []
    assert out["device"] == "cpu" and out["torch"] and out["autocast_dtype"] == "bfloat16"

    inv = out["invariants"]
    assert inv["passed"]
    for name in ("weight_topk", "abs_topk", "cpu_vs_device_masks", "training"):
        assert inv[name]["passed"], name
    assert inv["weight_topk"]["floor_binds"]["floor_raised_k"] > 0
    assert inv["abs_topk"]["activation_dtype"] == "bfloat16"  # AbsTopK really ran on bf16 activations
    assert inv["cpu_vs_device_masks"]["bf16_rounded_weights"]["matrices"] > 0

    timing = out["step_timing"]
    for name in ("dense", "sparse"):
        assert timing[name]["ms_per_step"] > 0 and timing[name]["tokens_per_s"] > 0, name
    assert timing["sparse"]["nonzero_weights"] < timing["dense"]["nonzero_weights"]
    assert timing["sparse_over_dense_tokens_per_s"] > 0 and timing["model_flops_per_token"] > 0

    tp = out["train_prune"]
    assert tp["steps"] >= 10 and tp["final_exact_k"] and tp["checkpoint_round_trip_equal"]
    assert tp["val_loss"] > 0 and tp["loss_last"] < tp["loss_first"]
    assert tp["model_verdict"] in ("does_task", "chance", "model_misses_target")
    assert tp["status"] and 0 <= tp["circuit_nodes"] <= tp["nodes_total"]
    assert set(out["seconds"]) >= {"invariants", "step_timing", "data", "train", "prune", "total"}
