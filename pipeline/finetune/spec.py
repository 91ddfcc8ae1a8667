"""The fine-tuning spec: one YAML file per run, validated once here (the loop receives plain values).

Example (``jobs/finetune-rsscn7.yaml``)::

    name: finetune-rsscn7
    task: classification                       # a kind of pipeline.kinds that can be trained
    backbone: ../checkpoints/skysense_v2_tiny_ssl.pt   # a checkpoint, or a model name (random init: a baseline)
    modalities: [hr]
    data: {format: class_folders, path: ../../shared/data/rsscn7, size: 128, gsd: 0.625, scale: [0.5, 2.0],
           split: {fractions: [0.6, 0.15, 0.25]}}
    head: {pooling: attention}
    adapt: {mode: partial, stages: 2, layer_decay: 0.75}
    loss: {name: ce}
    optim: {lr: 1.0e-3, warmup_steps: 20}
    steps: 300
    batch_size: 16
    storage: ../outputs/finetune-rsscn7        # training state, TensorBoard, the best model

Relative paths are resolved against the spec file's folder (data paths by the data spec, the rest here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import UserError
from pipeline.finetune.data.spec import DataSpec, format_errors
from pipeline.finetune.losses import LOSSES
from pipeline.kinds import KINDS, OutputKind, get_kind
from pipeline.modalities import get_modality


class FinetuneSpecError(UserError):
    """An invalid fine-tuning spec; the message names the file, the field and the bad value."""


def _trainable(name: str) -> str:
    kind = get_kind(name)
    if not kind.trainable:
        trainable = sorted(k.name for k in KINDS.values() if k.trainable)
        raise ValueError(f"{name!r} is not a task to fine-tune; choose one of {trainable}")
    return name


def _modality(name: str) -> str:
    get_modality(name)
    return name


def _resolve(value: str, info: ValidationInfo) -> str:
    value = os.path.expandvars(os.path.expanduser(value))
    if "://" in value:
        return value
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    return str((Path(value) if Path(value).is_absolute() else base / value).resolve())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdaptSpec(_Strict):
    """What learns: see :mod:`pipeline.finetune.model` (``frozen``, ``partial``, ``full``, ``lora``)."""

    mode: Literal["frozen", "partial", "full", "lora"] = "full"
    stages: int = Field(2, ge=1, le=4)
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    layer_decay: float = Field(0.75, gt=0, le=1)


class LossSpec(_Strict):
    """Loss name (default: the task's), class weights (``auto``: from the training labels, or one per class)."""

    name: str | None = None
    class_weights: Literal["auto"] | list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; choose one of {list(LOSSES)}")
        return v


class OptimSpec(_Strict):
    """AdamW with a cosine schedule (the pre-training rules: weight decay by rule, layer-wise lr decay)."""

    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    clip_grad: float | None = Field(1.0, gt=0)


class FinetuneSpec(_Strict):
    """A whole fine-tuning run.

    Attributes:
        name: run name (default: the YAML file's stem).
        task: the kind to train (classification, multilabel, segmentation, change, regression).
        backbone: checkpoint path/URL, or a model name for a seeded random init (a baseline).
        modalities: the modalities the model sees (the data must provide them).
        data: one dataset, or several sampled by their ``weight`` (one per batch).
        head: the head's settings (``width`` of dense decoders, ``pooling`` of classifiers).
        adapt: what learns.
        loss: the loss.
        optim: the optimiser and schedule.
        steps: optimiser steps.
        batch_size: samples per step.
        eval_every: steps between validations (and checkpoints of the training state).
        eval_batches: at most this many validation batches per validation (``null``: all).
        context_radius: stage-3/4 local context while training (``null``: global attention, as pre-trained).
        workers, cpus_per_worker, use_gpu: Ray Train scaling (1 CPU worker by default: the local machine).
        max_failures: worker-group restarts after a worker dies (-1: unlimited); each resumes from the last
            training-state checkpoint in ``storage``.
        loader_workers: DataLoader processes per worker.
        storage: training state, TensorBoard logs, ``metrics.jsonl``, the best model.
        out: where the best model is written (default ``<storage>/model.pt``; ``skypipe finetune --out`` overrides).
        seed: seed of the head's initialisation, the data order and augmentation.
    """

    name: str | None = None
    task: Annotated[str, AfterValidator(_trainable)]
    backbone: str = Field(min_length=1)
    modalities: list[Annotated[str, AfterValidator(_modality)]] = Field(min_length=1)
    data: DataSpec | list[DataSpec]
    head: dict[str, Any] = Field(default_factory=dict)
    adapt: AdaptSpec = AdaptSpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_every: int = Field(50, gt=0)
    eval_batches: int | None = Field(None, gt=0)
    context_radius: int | None = Field(None, ge=1)
    workers: int = Field(1, ge=1)
    max_failures: int = Field(3, ge=-1)
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False
    loader_workers: int = Field(0, ge=0)
    storage: str
    out: str | None = None
    seed: int = 0

    @field_validator("backbone", "storage", "out")
    @classmethod
    def _paths(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        from pipeline.model.config import MODEL_CONFIGS

        return v if (info.field_name == "backbone" and v in MODEL_CONFIGS) else _resolve(v, info)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSpec:
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must not repeat, got {self.modalities}")
        if self.loss.name is None:
            return self
        kind = self.kind
        if kind.takes_classes and not kind.multi_label and self.loss.name in ("bce", "mse", "l1"):
            raise ValueError(f"loss {self.loss.name!r} does not fit task {self.task!r} (use ce, dice or ce+dice)")
        if kind.multi_label and self.loss.name != "bce":
            raise ValueError(f"task {self.task!r} is multi-label: use loss bce")
        return self

    @property
    def kind(self) -> OutputKind:
        """The task's kind object."""
        return get_kind(self.task)

    @property
    def datasets(self) -> list[Any]:
        """The data specs as a list."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    @property
    def model_path(self) -> str:
        """Where the best model goes."""
        return self.out or f"{self.storage.rstrip('/')}/model.pt"


def parse_finetune(
    data: Any, source: str = "<finetune spec>", base_dir: str | os.PathLike[str] | None = None
) -> FinetuneSpec:
    """Validate an already-parsed YAML mapping; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise FinetuneSpecError(f"{source}: a fine-tuning spec must be a YAML mapping, got {type(data).__name__}")
    from pipeline.spec import wrong_command

    mixup = wrong_command(data, source, "skypipe finetune")
    if mixup:
        raise FinetuneSpecError(mixup)
    data = dict(data)
    if not data.get("name"):
        data["name"] = Path(source).stem if source != "<finetune spec>" else "finetune"
    context = {"base_dir": str(base_dir) if base_dir is not None else None}
    try:
        return FinetuneSpec.model_validate(data, context=context)
    except ValidationError as err:
        text = format_errors(source, err).replace("invalid data spec", "invalid fine-tuning spec")
        raise FinetuneSpecError(text) from None


def load_finetune(path: str | os.PathLike[str]) -> FinetuneSpec:
    """Read and validate a fine-tuning YAML file; errors name the file, the field and the bad value."""
    p = Path(path)
    if not p.is_file():
        raise FinetuneSpecError(f"fine-tuning spec {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise FinetuneSpecError(f"{path}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    return parse_finetune(data, source=str(path), base_dir=p.parent)
