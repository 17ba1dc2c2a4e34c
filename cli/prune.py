"""csp prune: the minimal verified circuit of a checkpoint for each task."""

from __future__ import annotations

from typing import Annotated

import typer

from cluster import storage
from jobs import prune as prune_job
from sparsity.prune import ABLATIONS, PruneConfig


def prune(
    ckpt: Annotated[list[str], typer.Argument(help="Run, checkpoint or sweep directories (path or s3://); a sweep means every trial's final checkpoint.")],
    out: Annotated[str, typer.Option(help="Results URI: circuits, circuit_nodes, circuit_edges go under it.")],
    task: Annotated[list[str] | None, typer.Option(help="Task to prune for (repeatable; default: all 20).")] = None,
    target: Annotated[float, typer.Option(help="Largest held-out task loss a circuit may have.")] = PruneConfig.target,
    ablation: Annotated[str, typer.Option(help=f"How pruned nodes are replaced: {', '.join(ABLATIONS)}.")] = PruneConfig.ablation,
    seed: Annotated[int, typer.Option(help="Seed of the mask training.")] = 0,
    steps: Annotated[int, typer.Option(help="Mask-training steps.")] = PruneConfig.steps,
    k_coef: Annotated[float, typer.Option(help="Weight of the node-count penalty.")] = PruneConfig.k_coef,
    calibrate: Annotated[bool, typer.Option(help="Fit a scale and shift of the answer logits per circuit.")] = False,
    data: Annotated[str | None, typer.Option(help="Pretraining data for node means (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    address: Annotated[str | None, typer.Option(help="Ray cluster for the fan-out (default: in-process Ray when there are several checkpoints).")] = None,
) -> None:
    """Prune a checkpoint to its smallest circuit per task and store every result."""
    cfg = PruneConfig(target=target, ablation=ablation, seed=seed, steps=steps, k_coef=k_coef, calibrate=calibrate)

    def show(name: str, r: dict) -> None:
        if r["status"] in ("chance", "failed"):
            extra = f"held-out accuracy {r['full_accuracy']:.2f}, loss {r['full_loss']:.3f}" if r["status"] == "chance" else r["error"]
            typer.echo(f"{name:<28} {r['status']:<18} {extra}")
            return
        layers = " ".join(f"L{layer}:" + ",".join(f"{loc}={c}" for loc, c in locs.items()) for layer, locs in r["nodes_by_layer"].items())
        flag = "  (full model misses the target)" if r["full_misses_target"] else ""
        typer.echo(f"{name:<28} {r['status']:<18} nodes {r['n_nodes']:>4}  edges {r['n_edges']:>5}  "
                   f"full {r['full_loss']:.3f}  sufficiency {r['sufficiency_loss']:.3f}  necessity {r['necessity_loss']:.3f}{flag}")
        if layers:
            typer.echo(f"{'':<28}   {layers}")

    single = len(ckpt) == 1 and address is None and not storage.exists(storage.resolve(ckpt[0]).join("summary.parquet"))
    if single:
        rows = prune_job.prune_checkpoint(ckpt[0], task, out, cfg, data_uri=data, device=device, progress=show)
        done = sum(r["status"] == "ok" for r in rows)
        typer.echo(f"{done} circuits meet the target, {len(rows) - done} verdicts → {out}")
        return
    from cluster import runtime
    from jobs import fanout

    runtime.init(address=address)

    def tick(done: int, total: int, row: dict) -> None:
        typer.echo(f"[{done}/{total}] {row['task']}: {row['status']}")

    counts = fanout.fanout(ckpt, task, out, cfg, data_uri=data, progress=tick)
    typer.echo(f"{counts['pairs']} pairs: {counts['pruned']} pruned, {counts['skipped']} already stored, {counts['failed']} failed → {out}")
