"""csp prune: the minimal verified circuit of a checkpoint for each task."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._app import SHARED_FS_HELP, choice
from sparsity.config import ABLATIONS, CHANCE_LOSS, PruneConfig

Ablation = choice("Ablation", ABLATIONS)


def prune(
    ckpt: Annotated[list[str], typer.Argument(help="Run, checkpoint or sweep directories (path or s3://); a sweep means every trial's run.")],
    out: Annotated[str, typer.Option(help="Results URI: circuits, circuit_nodes, circuit_edges go under it.")],
    checkpoints: Annotated[str, typer.Option(help="Which checkpoints of each run: final, milestones (the kept milestones and the final), "
                                             "all (every kept step), or steps such as 500,1000 — circuits over training.")] = "final",
    include_stopped: Annotated[bool, typer.Option("--include-stopped", help="Also prune sweep trials that --scheduler asha stopped early.")] = False,
    search: Annotated[int | None, typer.Option(help="Search the pruning settings (k_coef, mask lr, steps) of each pair with N runs "
                                               "(Optuna's TPE through Ray Tune) at the first --target; every run is stored, and "
                                               "`csp results circuits` shows the best verified one per search.")] = None,
    task: Annotated[list[str] | None, typer.Option(help="Task to prune for (repeatable; default: all 20).")] = None,
    target: Annotated[list[float] | None, typer.Option(
        help=f"Largest held-out task loss a circuit may have, on the reference's summed two-sided scale (chance {CHANCE_LOSS:.3f}); "
             "repeatable: every target is bisected from the same trained masks and stored as its own row "
             "(default: 0.15 and 0.30, the paper's target read on the sum and per prompt).")] = None,
    ablation: Annotated[Ablation, typer.Option(help="How pruned nodes are replaced (mean: the paper's).")] = PruneConfig.ablation,
    seed: Annotated[int, typer.Option(help="Seed of τ-init noise, pair batches and resample draws.")] = 0,
    steps: Annotated[int, typer.Option(help="Mask-training steps.")] = PruneConfig.steps,
    k_coef: Annotated[float, typer.Option(help="Weight of the node-count penalty.")] = PruneConfig.k_coef,
    warmup_frac: Annotated[float, typer.Option(help="Share of the mask steps with a linear lr warmup (the replication: 0).")] = PruneConfig.warmup_frac,
    grad_clip_rms: Annotated[float | None, typer.Option(help="Clip the gates' gradient to this RMS (the replication: 1.0; default: no clipping).")] = None,
    stop_window: Annotated[int, typer.Option(help="Stop mask training once the open gates and the smoothed task loss have been flat for this many steps (0: run every step).")] = PruneConfig.stop_window,
    stop_open_tol: Annotated[float, typer.Option(help="With --stop-window: how far (a fraction) the open-gate count may move over the window and still count as flat.")] = PruneConfig.stop_open_tol,
    calibrate: Annotated[bool, typer.Option(help="Fit a scale and shift of the answer logits per circuit.")] = False,
    prune_anyway: Annotated[bool, typer.Option(help="Prune even where the full model misses the target (the row keeps its verdict in full_misses_target).")] = False,
    controls: Annotated[bool, typer.Option(help="Also run the faithfulness controls of every solved task: random-init model, nonsense tasks (answers swapped; mapped to fixed unrelated tokens), other ablations, two more seeds.")] = False,
    data: Annotated[str | None, typer.Option(help="Pretraining data for node means (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    address: Annotated[str | None, typer.Option(help="Ray cluster for the fan-out (default: in-process Ray when there are several checkpoints).")] = None,
    shared_fs: Annotated[bool, typer.Option("--shared-fs", help=SHARED_FS_HELP)] = False,
) -> None:
    """Prune a checkpoint to its smallest circuit per task and store every result."""
    from cluster import storage
    from sparsity.errors import ConfigError
    from sparsity.train import resolve_device

    resolve_device(device)  # a device this machine does not have fails before anything is loaded or written
    targets = list(dict.fromkeys(target or PruneConfig().targets))  # in the order given, each once
    for t in targets:
        if not t > 0:
            raise ConfigError(f"target={t} out of range: must be > 0")
    cfg = PruneConfig(target=targets[0], also_targets=tuple(targets[1:]), ablation=Ablation(ablation).value, seed=seed, steps=steps, k_coef=k_coef, calibrate=calibrate,
                      warmup_frac=warmup_frac, grad_clip_rms=grad_clip_rms, stop_window=stop_window,
                      stop_open_tol=stop_open_tol,
                      prune_anyway=prune_anyway)
    storage.check_writable(out)  # a read-only or unreachable --out fails before any pruning

    from jobs import sweep

    if search is not None:
        _search(ckpt, task, out, cfg, data, search, checkpoints, include_stopped, address, shared_fs, controls)
        return
    if len(ckpt) == 1 and address is None and not sweep.is_sweep(ckpt[0]) and checkpoints == "final":
        _prune_one(ckpt[0], task, out, cfg, data, device, controls)
    else:
        _prune_many(ckpt, task, out, cfg, data, controls, address, shared_fs, checkpoints, include_stopped)


def _prune_one(ckpt: str, task: list[str] | None, out: str, cfg: PruneConfig, data: str | None, device: str, controls: bool) -> None:
    """One checkpoint, in this process: a line per task (per target) as it is done."""
    from jobs import prune_pairs as prune_job

    def show(name: str, r: dict) -> None:
        for t, row in r.get("by_target", {t: r for t in cfg.targets[:1]}).items():
            _show_row(f"{name} @{t:g}", row)

    rows = prune_job.prune_checkpoint(ckpt, task, out, cfg, data_uri=data, device=device, progress=show, controls=controls)
    real = [r for r in rows if r.get("control") is None]
    done = sum(v["status"] == "ok" for r in real for v in r.get("by_target", {0: r}).values())
    n_rows = sum(len(r.get("by_target", {0: r})) for r in real)
    typer.echo(f"{done} verified circuits, {n_rows - done} other verdicts"
               + (f", {len(rows) - len(real)} control runs" if controls else "") + f" → {out}")


def _search(ckpt: list[str], task: list[str] | None, out: str, cfg: PruneConfig, data: str | None, n: int, which: str,
            include_stopped: bool, address: str | None, shared_fs: bool, controls: bool = False) -> None:
    """`--search N`: one search per (checkpoint, task), a line each with its best run."""
    from cluster import runtime
    from jobs import fanout, prune_search, results
    from sparsity import tasks as task_lib

    if n < 2:
        raise typer.BadParameter(f"--search must be ≥ 2 (runs per pair), got {n}")
    if controls:
        raise typer.BadParameter("--search and --controls: search the settings first, then run the controls without --search")
    names = task or list(task_lib.REGISTRY)
    for name in names:
        task_lib.get(name)
    ckpts = fanout.expand_checkpoints(ckpt, which, include_stopped)
    runtime.init(address=address, storage={"--out": out, "--data": data}, shared_fs=shared_fs, log_to_driver=False)
    default_key = cfg.for_target(cfg.target).key()
    for u in ckpts:
        for name in names:
            row = prune_search.search_pair(u, name, out, cfg, n, data_uri=data, seed=cfg.seed)
            stored = results.circuits(out, task=name, model=row["model_id"], searches="all")
            base = stored[(stored["prune_key"] == default_key) & stored["control"].isna()]
            was = f"; default settings: {int(base['n_edges'].iloc[0])} edges" if len(base) and base["status"].iloc[0] == "ok" else ""
            done = " (already searched)" if row.get("already_stored") else f" in {row['seconds']:.0f} s"
            best = (f"best {row['best_n_edges']} edges at {row['best_config']}" if row["best_prune_key"]
                    else "no run verified")
            typer.echo(f"{row['model_id']} {name}: {best}; {row['n_verified']}/{row['n_trials']} runs verified{was}{done}")


def _show_row(name: str, r: dict) -> None:
    """One pruned (task, target) as a line: its verdict, size and losses, and its nodes per layer."""
    if r.get("already_stored"):
        typer.echo(f"{name:<34} {r['status']:<19} already stored with this config (nothing done)")
        return
    if r["status"] == "claimed":
        typer.echo(f"{name:<34} {'claimed':<19} being pruned by another process: {r['held_by']}")
        return
    if r["status"] in ("chance", "model_misses_target", "failed"):
        extra = f"full model: held-out accuracy {r['full_accuracy']:.2f}, loss {r['full_loss']:.3f}" if r["status"] != "failed" else r["error"]
        typer.echo(f"{name:<34} {r['status']:<19} {extra}")
        return
    layers = " ".join(f"L{layer}:" + ",".join(f"{loc}={c}" for loc, c in locs.items()) for layer, locs in r["nodes_by_layer"].items())
    flag = "  (full model misses the target)" if r["full_misses_target"] else ""
    rnd, keep = r.get("necessity_random_loss"), r.get("random_keep_best")
    typer.echo(f"{name:<34} {r['status']:<19} nodes {r['n_nodes']:>4}  edges {r['n_edges']:>5}  "
               f"full {r['full_loss']:.3f}  sufficiency {r['sufficiency_loss']:.3f}"
               f"{f' (best random set {keep:.3f})' if keep is not None else ''}  necessity {r['necessity_loss']:.3f}"
               f"{f' (random {rnd:.3f})' if rnd is not None else ''}{flag}")
    if keep is not None and not r.get("beats_random_keep"):
        typer.echo(f"{'':<34}   does not clearly beat random node sets of its size (beats_random_keep false)")
    if layers:
        typer.echo(f"{'':<34}   {layers}")


def _prune_many(ckpt: list[str], task: list[str] | None, out: str, cfg: PruneConfig, data: str | None, controls: bool,
                address: str | None, shared_fs: bool, which: str = "final", include_stopped: bool = False) -> None:
    """Several checkpoints, a sweep, a run's checkpoints over training or a named cluster: the
    Ray fan-out, a line per pair as it is done."""
    from cluster import runtime
    from jobs import fanout

    n = len(fanout.expand_checkpoints(ckpt, which, include_stopped))  # a missing checkpoint, sweep or step fails before Ray starts
    if which != "final":
        from sparsity import tasks as task_lib

        typer.echo(f"{n} checkpoints ({which}) × {len(task or task_lib.REGISTRY)} tasks")
    runtime.init(address=address, storage={"--out": out, "--data": data, "CKPT": next((u for u in ckpt if not u.startswith("s3://")), ckpt[0])},
                 shared_fs=shared_fs)

    def tick(done: int, total: int, row: dict) -> None:
        at = f" @ step {row['step']}" if which != "final" and row.get("step") is not None else ""
        typer.echo(f"[{done}/{total}] {row['task']}{at}{' [' + row['control'] + ']' if row.get('control') else ''}: {row['status']}")

    counts = fanout.fanout(ckpt, task, out, cfg, data_uri=data, progress=tick, controls=controls, which=which,
                           include_stopped=include_stopped)
    elsewhere = f", {counts['elsewhere']} being pruned by another process" if counts["elsewhere"] else ""
    typer.echo(f"{counts['pairs']} pairs: {counts['pruned']} pruned, {counts['skipped']} already stored{elsewhere}, "
               f"{counts['failed']} failed → {out}")
