"""Distributed sparse training on Ray Train: N workers, DDP (gloo on CPU, NCCL on CUDA).

Data: one ``TokenServer`` actor per worker, started by the worker on its own node (node
affinity, so batches never cross the network), holds the train rows and serves that rank's
batches by index (``TokenRows``: rank r takes global batches r, r+N, r+2N, … — disjoint and
deterministic). Actors rather than Ray Data's streaming split because a batch is a pure
function of (index, rank): the data position in a checkpoint is one integer, a resumed run
asks for exactly the next batch, and the worker prefetches the next few while it computes.

Every rank runs ``sparsity.train.train`` on identical initial weights (same seed); DDP
averages gradients, so the RMS normalisation, Adam step and top-k projection are identical
on every rank. Rank 0 writes checkpoints (our format, cluster/checkpoints.py) to the run
URI and reports them to Ray; after a worker failure (FailureConfig) every rank restarts
from the latest checkpoint.

Placement: ``spread`` (default) asks Ray for one worker per node where there is room and
packs them where there is not, so a fixed group of N workers that loses a node restarts on
the capacity left, with the same N ranks and so bit-identical weights (a fixed group, not
an elastic one: changing N would change every later batch); ``strict_spread`` insists on
one per node (a run that loses a node waits for another); ``pack`` keeps them together.
Each rank records where it ran: ``RUN/placement/from-{step}-rank-{r}.json`` holds its node
id, its token server's node id and the step it started from, one file per (re)start; rank 0
adds when its setup and its training loop ended (wall clock).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile

from cluster import checkpoints, lease, runtime, storage
from cluster.checkpoints import RUN_FILE
from cluster.local_train import RunError, check_config, check_data, load_data, run_lease
from sparsity.config import RunConfig

PREFETCH = 4
RAY_STRATEGIES = {"spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "pack": "PACK"}  # sparsity.config.PLACEMENTS → Ray's names
PLACEMENT_DIR = "placement"


def torch_backend(use_gpu: bool) -> str:
    """The collective backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if use_gpu else "gloo"


class TokenServer:
    """Holds the train rows of a dataset and serves one rank's batches by index."""

    def __init__(self, data_uri: str, cfg_dict: dict, rank: int, world: int):
        from sparsity.batches import TokenRows

        cfg = RunConfig.from_dict(cfg_dict)
        rows, _, _ = load_data(data_uri, cfg)
        self.rows = TokenRows(rows, cfg.train.batch_size // world // cfg.train.micro_batches, seed=cfg.train.seed, rank=rank, world=world)

    def batch(self, i: int):
        return self.rows(i).numpy(), i * self.rows.world + self.rows.rank  # (tokens, global batch id)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _local_server(data_uri: str, cfg_dict: dict, rank: int, world: int):
    """A TokenServer on the calling worker's node (hard affinity: if the node goes, the
    worker goes with it and its restart makes a new one)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    cls = ray.remote(num_cpus=0)(TokenServer)
    return cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(data_uri, cfg_dict, rank, world)


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
    import time

    import ray.train
    import ray.train.torch
    import torch

    from sparsity import train as train_lib

    t_worker_start = time.time()  # wall clock, comparable across processes on one host (benchmarks/distributed.py)
    cfg = RunConfig.from_dict(config["cfg"])
    # torch on as many threads as the CPUs Ray gave this worker (--cpus-per-worker), no more:
    # more would contend with the other workers on the node.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = config["out"]
    device = ray.train.torch.get_device()
    state = checkpoints.load(out) if checkpoints.latest_step(out) is not None else None
    debug = config.get("debug")
    seen: list[int] | None = [] if debug else None
    hashes: list[str] = []
    server = _local_server(config["data"], config["cfg"], rank, world)
    batches = _Prefetcher(server, seen)
    node = ray.get_runtime_context().get_node_id()
    placed = storage.resolve(out).join(PLACEMENT_DIR, f"from-{state.step if state else 0}-rank-{rank}.json")
    where = {"rank": rank, "world": world, "node_id": node, "token_server_node_id": ray.get(server.node_id.remote()),
             "start_step": state.step if state else 0, "device": str(device), "backend": config.get("backend"),
             "cpus": cpus, "torch_threads": torch.get_num_threads(), "t_worker_start": t_worker_start}
    storage.write_json(placed, where)

    def wrap(model):
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict] = []

    def report(m: dict) -> None:
        history.append(m)

    def save(files: dict[str, bytes], step: int) -> None:
        last: dict = {}
        for m in history:  # the latest value of every metric (a step's val_loss and loss come in separate reports)
            last.update(m)
        metrics = {**last, "step": step}
        if rank != 0:
            ray.train.report(metrics)
            return
        lease.check_owner(storage.resolve(out).join(checkpoints.LEASE_FILE), config["owner"])  # the driver still owns the run
        checkpoints.save(out, files, step, keep=cfg.train.milestones)
        checkpoints.write_metrics(out, history, state.step if state is not None else 0)  # keeps what earlier attempts stored
        # Ray's checkpoint is only a pointer to ours; report uploads it before it returns
        # (SYNC), so the local copy is removed right after.
        with tempfile.TemporaryDirectory(prefix="csp-report-") as tmp:
            with open(os.path.join(tmp, "csp_checkpoint.json"), "w") as f:
                json.dump({"step": step, "uri": storage.resolve(out).join(checkpoints.CHECKPOINTS, checkpoints.step_dir(step)).uri}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def on_step(step: int, model) -> None:
        if debug:
            h = hashlib.sha256()
            for p in model.parameters():
                h.update(p.detach().cpu().numpy().tobytes())
            hashes.append(f"{step}:{h.hexdigest()[:16]}")

    from cluster.data import load_rows
    from sparsity.batches import FixedBatches

    val = load_rows(config["data"], "val", max_rows=cfg.train.eval_batches * cfg.train.batch_size)[:, : cfg.model.block_size + 1]
    t_ready = time.time()
    train_lib.train(cfg, batches, device, report, state=state, save=save, wrap=wrap, on_step=on_step,
                    val_batches=FixedBatches(val, cfg.train.batch_size, cfg.train.eval_batches))
    if rank == 0:  # when setup ended and the loop ended: where a run's time outside its steps goes
        storage.write_json(placed, {**where, "t_ready": t_ready, "t_loop_end": time.time()})
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
    debug: bool = False,
    placement: str = "spread",
    take_over: bool = False,
    owner: str | None = None,
    cpus_per_worker: int = 1,
):
    """Train one run on ``workers`` Ray Train workers; resumes from the latest checkpoint.

    Ray must be initialised (cluster.runtime.init). ``debug`` (or CSP_TRAIN_DEBUG=1)
    records per-rank weight hashes and batch ids under OUT/_debug. This process holds the
    run's lease (RUN/lease.json) while Ray Train runs, through its worker restarts;
    ``owner`` names the holder (a sweep trial passes its own, so a retried trial re-takes it).
    """
    debug = debug or os.environ.get("CSP_TRAIN_DEBUG") == "1"
    import ray

    if workers < 1:
        raise RunError(f"workers={workers} out of range: must be ≥ 1")
    if placement not in RAY_STRATEGIES:
        raise RunError(f"placement={placement!r}: choose one of {', '.join(RAY_STRATEGIES)}")
    if cfg.train.batch_size % (workers * cfg.train.micro_batches):
        raise RunError(f"batch_size={cfg.train.batch_size} must divide evenly over {workers} workers × {cfg.train.micro_batches} micro-batches")
    if cpus_per_worker < 1:
        raise RunError(f"cpus_per_worker={cpus_per_worker} out of range: must be ≥ 1")
    need = workers * cpus_per_worker  # the Train controller takes no CPU (Ray Train v2 pins it to this driver's node)
    have = runtime.cluster_cpus()
    if have < need:
        raise RunError(f"{workers} workers need {need} CPUs ({cpus_per_worker} per worker) but the cluster declares {have:g}; "
                       "start Ray with more --num-cpus or use fewer --workers")
    if placement == "strict_spread" and len(runtime.alive_nodes()) < workers:
        raise RunError(f"placement strict_spread needs {workers} nodes (one per worker) but the cluster has {len(runtime.alive_nodes())}; "
                       "use --placement spread or fewer --workers")
    if use_gpu and ray.cluster_resources().get("GPU", 0) < workers:
        raise RunError(f"--gpus with {workers} workers needs {workers} GPUs; the cluster has {ray.cluster_resources().get('GPU', 0):g}")
    out = storage.resolve(out_uri)
    record = {"config": cfg.to_dict(), "data": storage.resolve(data_uri).uri, "workers": workers}
    check_config(out, record["config"])
    step = checkpoints.latest_step(out.uri)
    if step is not None and step >= cfg.train.steps:
        return None
    check_data(data_uri, cfg)  # fail fast on a bad dataset, before the lease and before any actor starts
    with run_lease(out, f"csp train --workers {workers}", take_over, owner) as held:
        check_config(out, record["config"])
        storage.write_json(out.join(RUN_FILE), record)
        return _fit(out, data_uri, cfg, workers, use_gpu, max_failures, debug, placement, held.owner, cpus_per_worker)


def _fit(out: storage.Location, data_uri: str, cfg: RunConfig, workers: int, use_gpu: bool, max_failures: int, debug: bool,
         placement: str, owner: str, cpus_per_worker: int = 1):
    from ray.train import FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
        train_loop_config={"cfg": cfg.to_dict(), "out": out.uri, "data": storage.resolve(data_uri).uri,
                           "debug": debug, "backend": torch_backend(use_gpu), "owner": owner},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker} if not use_gpu else None,
                                     placement_strategy=RAY_STRATEGIES[placement]),
        torch_config=TorchConfig(backend=torch_backend(use_gpu)),
        run_config=run_config,
    )
    return runtime.train_fit(trainer.fit)
