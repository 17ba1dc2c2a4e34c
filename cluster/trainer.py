"""Distributed sparse training on Ray Train: N workers, DDP (gloo on CPU, NCCL on CUDA).

Data: one ``TokenServer`` actor per worker holds the train rows and serves that rank's
batches by index (``TokenRows``: rank r takes global batches r, r+N, r+2N, … — disjoint and
deterministic). Actors rather than Ray Data's streaming split because a batch is a pure
function of (index, rank): the data position in a checkpoint is one integer, a resumed run
asks for exactly the next batch, and the worker prefetches the next few while it computes.

Every rank runs ``sparsity.train.train`` on identical initial weights (same seed); DDP
averages gradients, so the RMS normalisation, Adam step and top-k projection are identical
on every rank. Rank 0 writes checkpoints (our format, cluster/checkpoints.py) to the run
URI and reports them to Ray; after a worker failure (FailureConfig) every rank restarts
from the latest checkpoint.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile

from cluster import checkpoints, runtime, storage
from cluster.training import METRICS_FILE, RUN_FILE, RunError, load_data
from sparsity.config import RunConfig

PREFETCH = 4


class TokenServer:
    """Holds the train rows of a dataset and serves one rank's batches by index."""

    def __init__(self, data_uri: str, cfg_dict: dict, rank: int, world: int):
        from sparsity.batches import TokenRows

        cfg = RunConfig.from_dict(cfg_dict)
        rows, _, _ = load_data(data_uri, cfg)
        self.rows = TokenRows(rows, cfg.train.batch_size // world // cfg.train.micro_batches, seed=cfg.train.seed, rank=rank, world=world)

    def batch(self, i: int):
        return self.rows(i).numpy(), i * self.rows.world + self.rows.rank  # (tokens, global batch id)


class _Prefetcher:
    """``batches(i)`` for the training loop, keeping the next PREFETCH requests in flight."""

    def __init__(self, server, log: list | None):
        self.server, self.log = server, log
        self.pending: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, i: int):
        import ray
        import torch

        for j in range(i, i + PREFETCH):
            if j not in self.pending:
                self.pending[j] = self.server.batch.remote(j)
        for stale in [j for j in self.pending if j < i]:
            del self.pending[stale]
        arr, gid = ray.get(self.pending.pop(i))
        if self.log is not None:
            self.log.append(gid)
        return torch.from_numpy(arr.copy())  # arrays from the object store are read-only


def _worker(config: dict) -> None:
    """The per-worker training function (a plain function of a dict, as Ray's examples)."""
    import ray.train
    import ray.train.torch

    from sparsity import train as train_lib

    cfg = RunConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = config["out"]
    device = ray.train.torch.get_device()
    state = checkpoints.load(out) if checkpoints.latest_step(out) is not None else None
    debug = config.get("debug")
    seen: list[int] | None = [] if debug else None
    hashes: list[str] = []
    batches = _Prefetcher(config["servers"][rank], seen)

    def wrap(model):
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict] = []

    def report(m: dict) -> None:
        history.append(m)

    def save(files: dict[str, bytes], step: int) -> None:
        ckpt = None
        if rank == 0:
            checkpoints.save(out, files, step)
            storage.write_text(storage.resolve(out).join(METRICS_FILE).uri, "".join(json.dumps(m) + "\n" for m in history))
            tmp = tempfile.mkdtemp()
            with open(os.path.join(tmp, "csp_checkpoint.json"), "w") as f:
                json.dump({"step": step, "uri": storage.resolve(out).join(checkpoints.CHECKPOINTS, checkpoints.step_dir(step)).uri}, f)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        last = history[-1] if history else {}
        ray.train.report({"step": step, **{k: v for k, v in last.items() if k != "step"}}, checkpoint=ckpt)

    def on_step(step: int, model) -> None:
        if debug:
            h = hashlib.sha256()
            for p in model.parameters():
                h.update(p.detach().cpu().numpy().tobytes())
            hashes.append(f"{step}:{h.hexdigest()[:16]}")
        fail = config.get("fail_at_step")
        marker = storage.resolve(out).join("_debug", "failed-once")
        if fail is not None and step == fail and rank == world - 1 and not storage.exists(marker):
            storage.write_text(marker, "1")
            os._exit(1)  # a worker process dies mid-run, as a preempted node would

    from cluster.data import load_rows
    from sparsity.batches import FixedBatches

    val = load_rows(config["data"], "val", max_rows=cfg.train.eval_batches * cfg.train.batch_size)[:, : cfg.model.block_size + 1]
    train_lib.train(cfg, batches, device, report, state=state, save=save, wrap=wrap, on_step=on_step,
                    val_batches=FixedBatches(val, cfg.train.batch_size, cfg.train.eval_batches))
    if debug:
        start = state.step if state is not None else 0
        attempt = storage.resolve(out).join("_debug", f"rank-{rank}-from-{start}.json")
        storage.write_json(attempt, {"rank": rank, "start": start, "batches": seen, "hashes": hashes})


def train_distributed(
    data_uri: str,
    out_uri: str,
    cfg: RunConfig,
    workers: int = 2,
    use_gpu: bool = False,
    max_failures: int = 2,
    fail_at_step: int | None = None,
    debug: bool = False,
):
    """Train one run on ``workers`` Ray Train workers; resumes from the latest checkpoint.

    Ray must be initialised (cluster.runtime.init). ``fail_at_step`` kills the last
    rank's process once at that step (a test hook); ``debug`` records per-rank weight
    hashes and batch ids under OUT/_debug.
    """
    import ray
    from ray.train import FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if workers < 1:
        raise RunError(f"workers={workers} out of range: must be ≥ 1")
    if cfg.train.batch_size % (workers * cfg.train.micro_batches):
        raise RunError(f"batch_size={cfg.train.batch_size} must divide evenly over {workers} workers × {cfg.train.micro_batches} micro-batches")
    need = workers + 1  # + the Train controller
    have = runtime.cluster_cpus()
    if have < need:
        raise RunError(f"{workers} workers need {need} CPUs (one per worker + the controller) but the cluster declares {have:g}; "
                       "start Ray with more --num-cpus or use fewer --workers")
    if use_gpu and ray.cluster_resources().get("GPU", 0) < workers:
        raise RunError(f"--gpus with {workers} workers needs {workers} GPUs; the cluster has {ray.cluster_resources().get('GPU', 0):g}")
    out = storage.resolve(out_uri)
    run_file = out.join(RUN_FILE)
    record = {"config": cfg.to_dict(), "data": storage.resolve(data_uri).uri, "workers": workers}
    if storage.exists(run_file) and storage.read_json(run_file).get("config") != record["config"]:
        raise RunError(f"{out.uri} holds a run with another configuration; choose a new --out or delete it")
    step = checkpoints.latest_step(out.uri)
    if step is not None and step >= cfg.train.steps:
        return None
    load_data(data_uri, cfg)  # fail fast on a bad dataset, before any actor starts
    storage.write_json(run_file, record)

    server_cls = ray.remote(num_cpus=0)(TokenServer)
    servers = [server_cls.remote(data_uri, cfg.to_dict(), r, workers) for r in range(workers)]
    ray_storage = out.join("ray")
    run_config = RayRunConfig(
        name=out.name or "run",
        storage_path=ray_storage.uri if not out.is_s3 else ray_storage.path,
        storage_filesystem=ray_storage.pa_fs if out.is_s3 else None,
        failure_config=FailureConfig(max_failures=max_failures),
        logging_config=LoggingConfig(log_level="WARNING"),  # no line per report/checkpoint
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "out": out.uri, "data": storage.resolve(data_uri).uri, "servers": servers, "fail_at_step": fail_at_step, "debug": debug},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1} if not use_gpu else None),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=run_config,
    )
    try:
        return trainer.fit()
    finally:
        for s in servers:
            ray.kill(s)
