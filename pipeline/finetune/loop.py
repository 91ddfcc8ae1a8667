"""The fine-tuning loop: Ray Train workers train a task model, validate it, keep the best, resume after a kill.

Per step (every rank): re-seed torch from ``(seed, step, rank)``; the cosine learning rate (scaled per parameter
group by the layer-wise decay); one batch drawn from the training datasets (one dataset per batch, by weight, in
an order that is a pure function of the step: :class:`pipeline.train.data.StepBatchSampler`); forward, the task's
loss, backward, gradient clipping, AdamW. Every ``eval_every`` steps and at the end rank 0 validates
(:func:`pipeline.finetune.evaluate.evaluate`), writes the best model so far to ``<storage>/best.pt`` (a full
checkpoint or an adapter, :mod:`pipeline.finetune.checkpoint`) and the training state to ``<storage>/state.pt``; a
run started again on the same storage continues from that state. Only a run that finished copies the best model to
``spec.model_path``, so a model file there is never the snapshot of an interrupted run. Metrics go to
``<storage>/metrics.jsonl`` and TensorBoard (``<storage>/tb``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipeline import storage
from pipeline.errors import UserError
from pipeline.finetune.checkpoint import TaskMeta, save_adapter, save_full
from pipeline.finetune.data import label_stats, open_dataset
from pipeline.finetune.evaluate import evaluate, predict
from pipeline.finetune.losses import auto_class_weights, make_loss
from pipeline.finetune.model import (
    backbone_sha256,
    build_model,
    load_backbone,
    lora_config,
    set_train_mode,
    trainable_summary,
)
from pipeline.finetune.sample import collate, to_device
from pipeline.finetune.spec import FinetuneSpec
from pipeline.model.checkpoint import read_checkpoint, write_payload
from pipeline.palette import default_colors
from pipeline.ssl.schedules import cosine_lr, param_groups
from pipeline.train.data import MixedDataset, StepBatchSampler
from pipeline.train.loop import step_seed
from pipeline.train.parallel import distributed, unwrap, wrap_ddp

log = logging.getLogger(__name__)

STATE_FORMAT = "skypipe.finetune-state/1"


@dataclass
class Run:
    """Everything one rank needs during training."""

    spec: FinetuneSpec
    task: torch.nn.Module
    model: torch.nn.Module  # the task, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    loss: Any
    train: list[Any]
    val: list[Any]
    class_names: list[str] | None
    meta: TaskMeta
    device: torch.device
    rank: int
    world: int
    start_step: int = 0
    best: float | None = None
    best_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _classes(sources: list[Any]) -> tuple[list[str] | None, list[str] | None]:
    names = [s.classes for s in sources]
    if any(n != names[0] for n in names[1:]):
        raise ValueError(f"the datasets of one task name different classes: {names}")
    colors = next((s.colors for s in sources if getattr(s, "colors", None)), None)
    return names[0], colors


def _class_weights(spec: FinetuneSpec, train: list[Any], n: int | None) -> list[float] | None:
    cw = spec.loss.class_weights
    if cw is None or n is None:
        return None
    if cw == "auto":
        counts = np.zeros(n)
        for source in train:
            stats = label_stats(source)
            for i, c in enumerate(stats["counts"]):
                counts[i] += c
        return auto_class_weights(counts.tolist())
    if len(cw) != n:
        raise ValueError(f"loss.class_weights has {len(cw)} values for {n} classes")
    return list(cw)


def setup(spec: FinetuneSpec, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Run:
    """Data, model (restored from ``<storage>/state.pt`` when there is one), optimiser and loss of one rank."""
    device = device or torch.device("cpu")
    kind = spec.kind
    backbone = load_backbone(spec.backbone, seed=spec.seed, context_radius=spec.context_radius)
    specs = {m: backbone.model.config.modality(m) for m in spec.modalities}
    train = [open_dataset(d, "train", specs, train=True, seed=spec.seed) for d in spec.datasets]
    val = [s for s in (open_dataset(d, "val", specs, train=False, seed=spec.seed) for d in spec.datasets) if len(s)]
    class_names, colors = _classes(train)
    mode = spec.adapt.mode
    lora = lora_config(spec.adapt.rank, spec.adapt.alpha, spec.adapt.dropout) if mode == "lora" else None
    task = build_model(kind, backbone, class_names, dict(spec.head), mode=mode, stages=spec.adapt.stages, lora=lora,
                       seed=spec.seed).to(device)  # fmt: skip
    groups = param_groups(task, lr=spec.optim.lr, weight_decay=spec.optim.weight_decay,
                          layer_decay=spec.adapt.layer_decay)  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=spec.optim.lr)
    n = len(class_names) if class_names else None
    loss = make_loss(spec.loss.name or kind.default_loss, _class_weights(spec, train, n), spec.loss.label_smoothing)
    meta = TaskMeta(
        kind=kind.name, class_names=class_names, class_colors=(colors or default_colors(n)) if n else None,
        label_nodata=sorted({float(v) for d in spec.datasets for v in d.label_nodata}), head_config=task.head_config(),
        modalities=list(spec.modalities), adapt=mode,
        data={"sources": [s.describe() for s in train], "val": [s.describe() for s in val]},
        backbone={"path": backbone.source, "sha256": backbone.sha256},
        training={"steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.optim.lr, "loss": spec.loss.name
                  or kind.default_loss, "lora": lora, "seed": spec.seed, "spec": spec.name},
    )  # fmt: skip
    run = Run(spec, task, task, optimizer, loss, train, val, class_names, meta, device, rank, world)
    _restore(run)
    run.model = wrap_ddp(task, device) if world > 1 else task
    if rank == 0:
        log.info("%s: %s; %d training / %d validation samples", spec.name, trainable_summary(task),
                 sum(len(s) for s in train), sum(len(s) for s in val))  # fmt: skip
    return run


def _state_url(spec: FinetuneSpec) -> str:
    return storage.join(spec.storage, "state.pt")


def _restore(run: Run) -> None:
    url = _state_url(run.spec)
    if not storage.exists(url):
        return
    state = read_checkpoint(url, formats=(STATE_FORMAT,))
    _check_backbone(run.spec, state, run.meta.backbone)
    run.task.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.start_step, run.best, run.best_step = int(state["step"]), state["best"], int(state["best_step"])
    run.history = json.loads(state["history"])
    log.info("resuming %s at step %d (best %s at step %d)", run.spec.name, run.start_step, run.best, run.best_step)


class ResumeMismatchError(UserError):
    """The spec's storage holds a run that was started on another backbone."""


def _check_backbone(spec: FinetuneSpec, state: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a saved ``state`` trained on another backbone than ``current`` (``{"path", "sha256"}``).

    The state holds the whole task model, backbone included: resuming it after ``backbone:`` changed would train on
    the old weights and label the result with the new checkpoint's sha256.
    """
    saved = state.get("backbone") or {}
    if not saved:
        log.warning("%s: the saved state does not record its backbone (written before it did); resuming", spec.storage)
        return
    sha = current.get("sha256")
    if saved.get("sha256") != sha or (sha is None and saved.get("path") != current.get("path")):
        was, now = str(saved.get("sha256") or saved.get("path"))[:12], str(sha or current.get("path"))[:12]
        raise ResumeMismatchError(
            f"{spec.storage} holds a run started on another backbone ({was}, now {now}): set a new `storage` in the"
            " spec, or delete that folder to start over"
        )


def check_resumable(spec: FinetuneSpec) -> None:
    """On the driver, before Ray starts: the check that ``_restore`` makes on every rank, as a one-line error."""
    url = _state_url(spec)
    if not storage.exists(url):
        return
    current = {"path": spec.backbone, "sha256": backbone_sha256(spec.backbone)}
    _check_backbone(spec, read_checkpoint(url, formats=(STATE_FORMAT,)), current)


def _save_state(run: Run, step: int) -> None:
    payload = {
        "format": STATE_FORMAT, "step": step, "best": run.best, "best_step": run.best_step,
        "backbone": dict(run.meta.backbone),
        "history": json.dumps(run.history), "model": {k: v.detach().cpu() for k, v in run.task.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
    }  # fmt: skip
    write_payload(payload, _state_url(run.spec))


def _batches(run: Run) -> Any:
    spec = run.spec
    sampler = StepBatchSampler([len(s) for s in run.train], [d.weight for d in spec.datasets], spec.batch_size,
                               run.world, run.rank, spec.seed, start=run.start_step, stop=spec.steps)  # fmt: skip
    loader = DataLoader(MixedDataset(run.train), batch_sampler=sampler, num_workers=spec.loader_workers,
                        collate_fn=collate, pin_memory=run.device.type == "cuda")  # fmt: skip
    return iter(loader)


def train_step(run: Run, step: int, batch: dict[str, Any]) -> dict[str, float]:
    """One optimiser step on ``batch``; returns the step's loss, learning rate and gradient norm."""
    spec, o = run.spec, run.spec.optim
    torch.manual_seed(step_seed(spec.seed, step, run.rank))
    lr = cosine_lr(step, base_lr=o.lr, total_steps=spec.steps, warmup_steps=o.warmup_steps, min_lr=o.min_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    set_train_mode(run.task, spec.adapt.mode)
    run.optimizer.zero_grad(set_to_none=True)
    out = predict(run.model, batch, run.device)
    loss = run.loss(out, to_device(batch["label"], run.device))
    loss.backward()
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    grad = torch.nn.utils.clip_grad_norm_(params, o.clip_grad or float("inf"))
    run.optimizer.step()
    value = float(loss.detach())
    if not np.isfinite(value):
        raise FloatingPointError(f"step {step}: non-finite loss {value}")
    return {"loss": value, "lr": lr, "grad_norm": float(grad)}


def validate(run: Run, step: int) -> dict[str, Any]:
    """Score the model on the validation data; keep it when it is the best so far (rank 0 writes)."""
    if not run.val:
        return {}
    metric = evaluate(unwrap(run.model), run.spec.kind, run.val, class_names=run.class_names, device=run.device,
                      batch_size=run.spec.batch_size, max_batches=run.spec.eval_batches)  # fmt: skip
    result = metric.compute()
    name, value = result["headline"], float(result["overall"][result["headline"]])
    better = value < run.best if name == "rmse" and run.best is not None else run.best is None or value > run.best
    if better:
        run.best, run.best_step = value, step
        run.meta.metrics = {"val": {**result["overall"], "step": step}}
        if run.rank == 0:
            export(run)
    return {f"val/{name}": value, "val/best": run.best}


def _best_url(spec: FinetuneSpec) -> str:
    return storage.join(spec.storage, "best.pt")


def export(run: Run) -> str:
    """Write the current model as the best so far: an adapter for frozen / LoRA runs on a checkpoint, else full."""
    mode, path = run.spec.adapt.mode, _best_url(run.spec)
    run.meta.training = {**run.meta.training, "step": run.best_step}
    if mode in ("frozen", "lora") and run.meta.backbone.get("sha256"):
        save_adapter(run.task, run.meta, path, lora=run.meta.training.get("lora"))
    else:
        save_full(run.task, run.meta, path, provenance={"training": f"skypipe finetune {run.spec.name}"})
    return path


def run_loop(spec: FinetuneSpec, rank: int = 0, world: int = 1, device: torch.device | None = None,
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) on this rank; returns the run's summary (rank 0's is authoritative)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    run = setup(spec, rank, world, device)
    writer = SummaryWriter(storage.join(spec.storage, "tb")) if rank == 0 and "://" not in spec.storage else None
    bar = tqdm(total=spec.steps, initial=run.start_step, desc=spec.name, unit="step", disable=not progress or rank)
    batches = _batches(run)
    last: dict[str, float] = {}
    losses = []
    for step in range(run.start_step, spec.steps):
        last = train_step(run, step, next(batches))
        losses.append(last["loss"])
        done = step + 1
        if done % spec.eval_every == 0 or done == spec.steps:
            last |= validate(run, done)
            run.history.append({"step": done, **last})
            if rank == 0:
                _save_state(run, done)
                _log(spec, writer, done, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
    bar.close()
    if rank == 0 and not run.val:  # nothing to choose by: the last model is the model
        run.best_step = spec.steps
        export(run)
    if rank == 0:  # finished: the best model becomes the run's model
        storage.write_bytes(spec.model_path, storage.read_bytes(_best_url(spec)))
    if writer is not None:
        writer.close()
    if distributed():
        dist.barrier()
    return {"steps": spec.steps, "resumed_from": run.start_step, "best": run.best, "best_step": run.best_step,
            "metric": run.meta.metrics, "model": spec.model_path, "seconds": time.perf_counter() - t0,
            "final_loss": last.get("loss"), "losses": losses}  # fmt: skip


def _log(spec: FinetuneSpec, writer: Any, step: int, values: dict[str, float]) -> None:
    line = json.dumps({"step": step, **values})
    url = storage.join(spec.storage, "metrics.jsonl")
    old = storage.read_bytes(url) if storage.exists(url) else b""
    storage.write_bytes(url, old + line.encode() + b"\n", fsync=False)
    if writer is not None:
        for k, v in values.items():
            if v is not None:
                writer.add_scalar(k, v, step)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of every worker (``config = {"spec": FinetuneSpec as JSON data}``)."""
    import ray.train
    import ray.train.torch

    spec = FinetuneSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(spec.cpus_per_worker)
    logging.basicConfig(level=logging.INFO)
    result = run_loop(spec, ctx.get_world_rank(), ctx.get_world_size(), device, progress=config.get("progress", True))
    if ctx.get_world_rank() == 0:
        storage.write_json(storage.join(spec.storage, "summary.json"), result, indent=1)
    ray.train.report({"steps": result["steps"]})


def run_finetune(spec: FinetuneSpec, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job on Ray Train (local Ray on 127.0.0.1 unless ``RAY_ADDRESS`` is set)."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported: loopback only
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import fit, init_local_ray, require_data

    require_data([str(d.path) for d in spec.datasets])
    check_resumable(spec)
    summary_url = storage.join(spec.storage, "summary.json")
    storage.remove(summary_url)
    init_local_ray(num_cpus=spec.workers * spec.cpus_per_worker, num_gpus=spec.workers if spec.use_gpu else None)
    local = "://" not in spec.storage
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "progress": progress},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(name=spec.name, storage_path=f"{spec.storage}/ray" if local else spec.storage,
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )  # fmt: skip
    fit(trainer)  # raises if a worker failed
    return storage.read_json(summary_url)
