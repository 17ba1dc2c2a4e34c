"""csp model …: inspect checkpoints, and move them to and from the reference layout."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import DetailFormat, emit, group

app = group("Inspect checkpoints; export/import the reference (openai/circuit_sparsity) layout.")


@app.command()
def info(
    ckpt: Annotated[str, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")],
    fmt: Annotated[DetailFormat, typer.Option("--format", help="table, or json (everything, per matrix).")] = "table",
) -> None:
    """Config, nonzeros per matrix and parameter counts of a checkpoint."""
    from cluster import checkpoints
    from sparsity import checkpoint_format as ckpt_lib

    loaded = checkpoints.load(ckpt, with_train_state=False)
    d = ckpt_lib.describe(loaded)
    d["checkpoints"] = checkpoints.kept(ckpt, loaded.config.train.milestones)
    if DetailFormat(fmt).value == "json":
        emit(d, "json")
        return
    m = d["model"]
    typer.echo(f"step {d['step']}  sha256 {d['fingerprint'][:16]}")
    typer.echo(f"model  n_layer {m['n_layer']}  d_model {m['d_model']}  n_head {m['n_head']}×{m['d_head']}  d_mlp {m['d_mlp']}  "
               f"ctx {m['block_size']}  vocab {m['vocab_size']}  afrac {m['afrac']}  sink {m['sink']}  bigram {m['enable_bigram_table']}")
    s = d["sparsity"]
    typer.echo(f"sparsity  pfrac {s['pfrac']}  ef {s['ef']}  ef_mlp {s['ef_mlp']}")
    in_matrices = sum(mat["nonzeros"] for mat in d["matrices"].values())
    typer.echo(f"params {d['params']:,}  nonzero {d['nonzero_params']:,} (every parameter; {in_matrices:,} in the sparsified "
               f"matrices below, {d['nonzero_params'] - in_matrices:,} in biases and norms)")
    width = max(len(n) for n in d["matrices"])
    for name, mat in d["matrices"].items():
        shape = "×".join(map(str, mat["shape"]))
        typer.echo(f"  {name:<{width}}  {shape:>10}  {mat['nonzeros']:>9,} / {mat['numel']:<9,} ({mat['nonzeros'] / mat['numel']:.4f})")
    if k := d["checkpoints"]:
        steps = ", ".join(f"{st} (milestone)" if st in k["milestones"] else str(st) for st in k["steps"])
        typer.echo(f"checkpoints kept  steps {steps}; {k['bytes'] / 1e6:.1f} MB on storage")
    label = {"nonzeros": "nonzeros (sparsified matrices, as training last reported)"}
    for k, v in d["metrics"].items():
        typer.echo(f"{label.get(k, k)} {v:.4f}" if isinstance(v, float) else f"{label.get(k, k)} {v:,}" if isinstance(v, int) else f"{label.get(k, k)} {v}")


@app.command("export")
def export_(
    ckpt: Annotated[str, typer.Argument(help="A run or checkpoint directory.")],
    out: Annotated[str, typer.Option(help="Directory for beeg_config.json + final_model.pt.")],
) -> None:
    """Write a checkpoint in the reference layout, loadable by circuit_sparsity's load_model."""
    from cluster import checkpoints, storage
    from sparsity import checkpoint_format as ckpt_lib

    storage.check_writable(out)  # a file, read-only or unreachable --out fails before the checkpoint is read
    typer.echo(f"wrote {ckpt_lib.REF_CONFIG} + {ckpt_lib.REF_WEIGHTS} → {checkpoints.export_reference(ckpt, out)}")


@app.command("import")
def import_(
    ref: Annotated[str, typer.Argument(help="Directory holding beeg_config.json + final_model.pt.")],
    out: Annotated[str, typer.Option(help="Run directory to store the csp checkpoint in.")],
) -> None:
    """Store a reference-layout model as a csp checkpoint."""
    from cluster import checkpoints, storage

    storage.check_writable(out)
    ckpt = checkpoints.import_reference(ref, out)
    typer.echo(f"imported {ckpt.config.model.n_layer}-layer model (density {ckpt.config.sparsity.pfrac:.4f}) → {out}")
