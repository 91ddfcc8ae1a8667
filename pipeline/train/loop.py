"""The pre-training loop: Ray Train ``TorchTrainer`` workers running the teacher-student step.

:func:`run_loop` on every rank: :func:`setup` (model, distribution, optimiser, restore), then per step
:func:`train_step`: re-seed torch from ``(seed, step, rank)``; set the cosine learning rate of every parameter
group (scaled by its layer-wise factor); ``accumulation`` micro-batches, each a forward of the meta-architecture
(which makes its views on the device; the batch's GCPL region ids go with it) under optional bf16 autocast and a
backward, reducing gradients on the last one only; gradient clipping; AdamW; the EMA teacher update with the cosine
momentum schedule. Rank 0 logs (:func:`log_step`), and every ``checkpoint_every`` steps all ranks gather the full
state and rank 0 writes it (:func:`save_step`, ``state.py``). Starting a job whose storage already holds
checkpoints resumes from the newest one: the data order and RNG are functions of the step, so the resumed curve
continues the interrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import UserError
from pipeline.model import SkySenseV2, create_model

from .data import MixedDataset, StepBatchSampler, batch_region, build_sources, make_loader, to_model_inputs
from .monitor import Monitor, Summary, Timer, expert_load_stats
from .parallel import compile_blocks, distributed, grad_sync, unwrap, wrap_ddp, wrap_fsdp
from .spec import PretrainSpec
from .state import (
    export_model,
    gather_state,
    latest_checkpoint,
    load_training_checkpoint,
    module_prefix,
    restore,
    save_training_checkpoint,
)

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Torch seed of one (step, rank): makes every step's randomness independent of what ran before."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def build_meta_arch(spec: PretrainSpec, world_size: int = 1) -> tuple[nn.Module, SkySenseV2]:
    """The student model (seeded, so every rank starts identical) and the SSL meta-architecture around it.

    Contrastive negatives are gathered across ranks (``distributed``) when there is more than one, unless the
    spec's ``ssl.options`` says otherwise.
    """
    from pipeline.ssl import MultiViewAugment, SSLMetaArch

    torch.manual_seed(spec.seed)
    student = create_model(spec.model.name, **spec.model.overrides)
    cfg = student.config
    augment = MultiViewAugment(cfg.modalities, grid_gsd=cfg.grid_gsd, **spec.ssl.augment)
    options = {"distributed": world_size > 1} | spec.ssl.options
    return SSLMetaArch(student, augment=augment, **options), student


def _all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not distributed() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


@dataclass
class Run:
    """What one rank trains with, built once by :func:`setup` and used by every step."""

    spec: PretrainSpec
    rank: int
    world_size: int
    device: torch.device
    meta: nn.Module  # the meta-architecture itself
    student: SkySenseV2
    model: nn.Module  # the meta-architecture as trained: DDP wrapper, FSDP2-sharded, or itself
    optimizer: torch.optim.Optimizer
    start_step: int
    checkpoint: str | None  # the newest checkpoint: restored from, then each one written
    student_prefix: str

    @property
    def params(self) -> list[nn.Parameter]:
        """Every optimised parameter (gradient clipping)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def num_regions(self) -> int:
        """GCPL regions of the meta-architecture: what the data's region ids must fit."""
        return int(self.meta.gcpl.num_regions)


def setup(spec: PretrainSpec, rank: int, world_size: int, device: torch.device) -> Run:
    """Build the meta-architecture and AdamW on ``device``, distribute them, restore the newest checkpoint if any."""
    from pipeline.ssl.schedules import param_groups

    meta, student = build_meta_arch(spec, world_size)
    student_prefix = module_prefix(meta, student)
    ckpt = latest_checkpoint(spec.storage)
    start_step, states = 0, None
    if ckpt:
        model_state, optim_state, extra = load_training_checkpoint(ckpt)
        start_step, states = int(extra["step"]), (model_state, optim_state)
        log.info("rank %d: resuming from %s (step %d)", rank, ckpt, start_step)
    if spec.activation_checkpointing if spec.activation_checkpointing is not None else spec.use_gpu:
        student.set_grad_checkpointing(True)
    meta.to(device)
    if spec.compile:
        compile_blocks(meta)
    if spec.resolved_parallel() == "fsdp" and distributed():
        model = wrap_fsdp(meta, param_dtype=torch.bfloat16 if spec.resolved_precision() == "bf16" else None)
    else:
        model = wrap_ddp(meta, device)
    o = spec.optim
    groups = param_groups(unwrap(model), lr=o.lr, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=device.type == "cuda" or None)
    if states is not None:
        restore(model, optimizer, *states)
    return Run(spec, rank, world_size, device, meta, student, model, optimizer, start_step, ckpt, student_prefix)


def data_batches(run: Run) -> Iterator[dict[str, Any]]:
    """This rank's collated micro-batches from the run's position on (the data order of ``data.py``)."""
    spec, acc = run.spec, run.spec.accumulation
    sources, weights = build_sources([d.model_dump() for d in spec.data], num_regions=run.num_regions)
    sampler = StepBatchSampler([len(s) for s in sources], weights, spec.micro_batch, run.world_size, run.rank,
                               spec.seed, start=run.start_step * acc, stop=spec.steps * acc,
                               repeat=spec.repeat_batch)  # fmt: skip
    loader = make_loader(MixedDataset(sources), sampler, spec.loader_workers, pin_memory=run.device.type == "cuda",
                         prefetch_factor=spec.prefetch)  # fmt: skip
    return iter(loader)


def train_step(run: Run, batches: Iterator[dict[str, Any]], step: int, timer: Timer) -> tuple[dict[str, float], Any]:
    """One optimiser step on every rank: seed, schedules, accumulated micro-batches, clipping, AdamW, teacher EMA.

    Returns:
        The step's metrics (loss components averaged over ranks, lr, momentum, grad norm, timings) and the last
        micro-batch's meta-architecture outputs.

    Raises:
        FloatingPointError: when a loss is not finite.
    """
    from pipeline.ssl.schedules import cosine_lr, momentum_schedule

    spec, o = run.spec, run.spec.optim
    torch.manual_seed(step_seed(spec.seed, 0 if spec.repeat_batch else step, run.rank))
    lr = cosine_lr(step, base_lr=o.lr, total_steps=spec.steps, warmup_steps=o.warmup_steps, min_lr=o.min_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    momentum = momentum_schedule(step, total_steps=spec.steps, base=spec.ssl.momentum, final=spec.ssl.momentum_end)
    with timer:  # the optimisation only: not the metric reduction, logging or checkpoints
        t0 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        comps, t_data, out = _accumulate(run, batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, o.clip_grad or float("inf"))
        run.optimizer.step()
        unwrap(run.model).update_teacher(momentum)
        step_s = time.perf_counter() - t0
    metrics = _all_mean(comps, run.device)
    if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"step {step}: non-finite loss {metrics}")
    metrics |= {"lr": lr, "momentum": momentum, "grad_norm": float(grad_norm), "step_s": step_s,
                "data_wait_s": t_data, "samples_per_s": spec.batch_size / step_s}  # fmt: skip
    return metrics, out


def _accumulate(run: Run, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float], float, Any]:
    """Forward + backward of ``accumulation`` micro-batches, reducing gradients on the last one only.

    Returns:
        Scalar outputs averaged over the micro-batches (``loss``, ``loss/<component>``), seconds spent waiting for
        data, and the last micro-batch's outputs.
    """
    acc = run.spec.accumulation
    bf16 = run.spec.resolved_precision() == "bf16"
    comps: dict[str, float] = defaultdict(float)
    t_data = 0.0
    for micro in range(acc):
        td = time.perf_counter()
        raw = next(batches)
        batch, region = to_model_inputs(raw, run.device), batch_region(raw, run.device)
        t_data += time.perf_counter() - td
        with grad_sync(run.model, micro == acc - 1):
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = run.model(batch, region=region)
            (out["loss"] / acc).backward()
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                comps[f"loss/{k}" if k != "loss" else "loss"] += float(v.detach()) / acc
    return dict(comps), t_data, out


def log_step(run: Run, monitor: Monitor, step: int, metrics: dict[str, float], out: Any) -> None:
    """Every ``log_every`` steps and at the end: add the MoE load to ``metrics`` (in place) and log them."""
    spec = run.spec
    if (step + 1) % spec.log_every and step + 1 != spec.steps:
        return
    load = out.get("expert_load")  # (layers, E) token shares of the step's MoE calls (last micro-batch)
    counts = {str(i): row for i, row in enumerate(load)} if torch.is_tensor(load) else None
    metrics |= expert_load_stats(counts or run.student.backbone.tokens_per_expert())
    monitor.log(step + 1, metrics)


def save_step(run: Run, step: int) -> None:
    """Every ``checkpoint_every`` steps and at the end: all ranks gather the state, rank 0 writes it."""
    spec = run.spec
    if (step + 1) % spec.checkpoint_every and step + 1 != spec.steps:
        return
    model_state, optim_state = gather_state(run.model, run.optimizer)
    if run.rank == 0:
        run.checkpoint = save_training_checkpoint(
            spec.storage, step + 1, run.student.config, model_state, optim_state, run.student_prefix,
            extra={"data_position": (step + 1) * spec.accumulation, "world_size": run.world_size,
                   "spec": spec.model_dump(mode="json")},
            provenance=_provenance(spec, step + 1), keep=spec.keep_checkpoints,
        )  # fmt: skip


def export_teacher(run: Run) -> str | None:
    """Rank 0 writes the teacher of the newest checkpoint as ``<storage>/model_teacher.pt``; all ranks wait."""
    model_path = None
    if run.rank == 0 and run.checkpoint:
        model_path = f"{run.spec.storage.rstrip('/')}/model_teacher.pt"
        export_model(run.checkpoint, model_path, which="teacher")
    if distributed():
        dist.barrier()
    return model_path


def run_loop(spec: PretrainSpec, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) on this rank; returns the run's summary metrics (rank 0's are authoritative)."""
    t_start = time.perf_counter()
    run = setup(spec, rank, world_size, device or torch.device("cpu"))
    batches = data_batches(run)
    monitor = Monitor(spec.storage, rank, spec.steps, run.start_step, enabled_bar=progress)
    timer, last = Timer(), {}
    run.model.train()
    for step in range(run.start_step, spec.steps):
        metrics, out = train_step(run, batches, step, timer)
        log_step(run, monitor, step, metrics, out)
        last = metrics
        save_step(run, step)
    monitor.close()
    model_path = export_teacher(run)
    done, per_step = spec.steps - run.start_step, spec.batch_size
    return {
        "steps": spec.steps, "resumed_from": run.start_step, "samples": done * per_step,
        "train_s": timer.total, "wall_s": time.perf_counter() - t_start,
        "samples_per_s": done * per_step / max(timer.total, 1e-9), "final_loss": last.get("loss", float("nan")),
        "checkpoint": run.checkpoint, "model": model_path,
    }  # fmt: skip


def _provenance(spec: PretrainSpec, step: int) -> dict[str, Any]:
    return {
        "training": f"skypipe pretrain {spec.name}: SkySense V2 teacher-student SSL",
        "step": step,
        "data": [f"{d.kind}:{d.path}" for d in spec.data],
        "batch_size": spec.batch_size,
    }


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of every worker (``config = {"spec": PretrainSpec as JSON data}``)."""
    import ray.train
    import ray.train.torch

    spec = PretrainSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(spec.cpus_per_worker)
    logging.basicConfig(level=logging.INFO)
    result = run_loop(spec, ctx.get_world_rank(), ctx.get_world_size(), device, progress=config.get("progress", True))
    if ctx.get_world_rank() == 0:
        with fsspec.open(f"{spec.storage.rstrip('/')}/summary.json", "w") as f:
            json.dump(result, f, indent=1)
    ray.train.report({k: v for k, v in result.items() if v is not None})


def init_local_ray(num_cpus: int, num_gpus: int | None = None) -> None:
    """Start an embedded Ray on loopback (see ``shared/reference/stack-notes.md``) unless one is connected."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # address="local": a new embedded Ray even when a `ray start` instance runs on this machine (Ray would join it)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address="127.0.0.1",
             include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=True)  # fmt: skip


def require_data(paths: list[str], spec_path: str = "data") -> None:
    """Refuse, on the driver before Ray starts, a spec whose data paths do not exist (one line, exit 2).

    Without it the error surfaces in every worker, as Ray's tracebacks, once per worker-group restart. Skipped when
    ``RAY_ADDRESS`` names a cluster: the driver may not see the workers' file systems or credentials, and
    :func:`fit` still reports the workers' error in one line.
    """
    from pipeline import storage

    if os.environ.get("RAY_ADDRESS"):
        return
    for i, path in enumerate(paths):
        if not storage.exists(path):
            raise UserError(f"{spec_path}[{i}].path: {path} not found; fix the path in the spec")


def fit(trainer: Any) -> None:
    """``trainer.fit()``, raising a worker's user error again on the driver (one line and exit 2 on the CLI).

    User errors are a missing data folder, a file that does not hold what the spec says, a backbone mismatch.

    [ours] Ray Train wraps every worker exception in a ``WorkerGroupError`` whose message is the worker's
    traceback; ``worker_failures`` keeps the exceptions themselves (a ``RayTaskError`` keeps the original in
    ``cause``).
    """
    from ray.train import WorkerGroupError

    try:
        trainer.fit()
    except WorkerGroupError as err:
        for failure in err.worker_failures.values():
            exc: BaseException | None = failure
            while exc is not None and not isinstance(exc, (UserError, FileNotFoundError)):
                exc = getattr(exc, "cause", None) or exc.__cause__
            if exc is not None:
                raise exc from err
        raise


def run_pretrain(spec: PretrainSpec, progress: bool = True, on_start: Callable[[], None] | None = None) -> Summary:
    """Run (or resume) a pre-training job on Ray Train and return its summary."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    fs, path = fsspec.core.url_to_fs(f"{spec.storage.rstrip('/')}/summary.json")
    if fs.exists(path):
        fs.rm(path)
    require_data([d.path for d in spec.data])
    gpus = spec.workers if spec.use_gpu else None
    init_local_ray(num_cpus=max(spec.workers * spec.cpus_per_worker, 1), num_gpus=gpus)
    if on_start:
        on_start()
    local = "://" not in spec.storage
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "progress": progress},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        # A dead worker (node lost, OOM, preempted) restarts the whole worker group, up to max_failures times; every
        # rank's train_worker then resumes from the last checkpoint in spec.storage (pipeline.train.state), so the
        # curve continues where that checkpoint left it.
        run_config=RunConfig(name=spec.name, storage_path=f"{spec.storage}/ray" if local else spec.storage,
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )  # fmt: skip
    fit(trainer)  # raises if a worker failed
    # [ours] Ray Train keeps metrics only alongside Ray checkpoints; ours live in storage, so rank 0 writes the
    # run's summary there and the driver reads it back.
    with fsspec.open(f"{spec.storage.rstrip('/')}/summary.json", "r") as f:
        m = json.load(f)
    return Summary(
        steps=int(m["steps"]), resumed_from=int(m["resumed_from"]), samples=int(m["samples"]),
        wall_s=time.perf_counter() - t0, train_s=float(m["train_s"]), samples_per_s=float(m["samples_per_s"]),
        final_loss=float(m["final_loss"]), checkpoint=m.get("checkpoint"), model=m.get("model"), storage=spec.storage,
    )  # fmt: skip
