"""The model an inference job runs: a checkpoint (or a named random-init model) wrapped for the output kind.

``checkpoint`` is a checkpoint path / fsspec URL (:mod:`pipeline.model.checkpoint`), a fine-tuning adapter
(:mod:`pipeline.finetune.checkpoint`: a head, maybe LoRA matrices, and the backbone checkpoint it names by sha256),
or a bare model name such as ``skysense_v2_tiny``, which means random weights from a fixed seed (a demo of the code
path, not a model: the provenance says so). Trained heads travel in the checkpoint's ``extra["heads"][kind]``, either
as a head state dict or as ``{"state_dict": ..., "class_names": [...], "class_colors": [...], "head_config": ...}``;
a fine-tuned checkpoint also says which kind it was trained for (``extra["task"]``), which a job then need not
repeat.

The driver (which only describes the model: channels, classes, identity) and every actor (which builds it) go
through the same :func:`resolve_task`, so both always agree on the model, its head and its classes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

from pipeline.finetune.checkpoint import ADAPTER_FORMAT, TaskMeta, backbone_of, inject_lora, read_any, task_meta
from pipeline.kinds import OutputKind, get_kind
from pipeline.model.checkpoint import checkpoint_sha256, code_version, read_checkpoint
from pipeline.model.config import MODEL_CONFIGS, SkySenseConfig, get_config
from pipeline.model.heads import TaskModel, build_task
from pipeline.model.skysense import SkySenseV2

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
DEFAULT_MODEL = "skysense_v2_tiny"


def is_model_name(checkpoint: str) -> bool:
    """True for a named configuration that is not also an existing file."""
    if checkpoint not in MODEL_CONFIGS:
        return False
    fs, path = fsspec.core.url_to_fs(checkpoint)
    return not fs.exists(path)


def _random_init_id(config: SkySenseConfig) -> str:
    blob = json.dumps({"config": config.to_dict(), "seed": RANDOM_INIT_SEED}, sort_keys=True, default=str)
    return "random-init:" + hashlib.sha256(blob.encode()).hexdigest()


def _not_found(checkpoint: str) -> FileNotFoundError:
    close = difflib.get_close_matches(checkpoint, list(MODEL_CONFIGS), n=1)
    hint = f"did you mean the model name {close[0]!r}? " if close else ""
    return FileNotFoundError(
        f"checkpoint {checkpoint!r} not found; {hint}give a checkpoint file or one of the model names "
        f"{sorted(MODEL_CONFIGS)} (random weights)"
    )


@dataclass
class ResolvedTask:
    """A job's model and head, resolved from its checkpoint without building the network.

    Attributes:
        config: the architecture and modalities.
        kind: the output kind.
        checkpoint: what the job named (path/URL or model name).
        checkpoint_sha256: identity of the weights (a hash of config + seed for a random init).
        random_init: no trained weights at all.
        code_version: skypipe version that wrote the checkpoint.
        num_classes, class_names, class_colors: classes of a class-score kind (None for continuous ones).
        head_state: trained head weights for the kind, if the checkpoint carries them.
        head_config: the trained head's settings (width, pooling, ...).
        state_dict: backbone + fusion weights (None for a random init).
        lora: LoRA config and matrices of an adapter (None otherwise).
        meta: the task a fine-tuned checkpoint or adapter was trained for (None for a plain backbone).
    """

    config: SkySenseConfig
    kind: OutputKind
    checkpoint: str
    checkpoint_sha256: str
    random_init: bool
    code_version: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    class_colors: list[str] | None = None
    head_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    head_config: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    lora: dict[str, Any] | None = field(default=None, repr=False)
    meta: TaskMeta | None = None

    @property
    def channels(self) -> list[str]:
        """Output channel names: the class names, or the kind's channel names (built on the meta device)."""
        with torch.device("meta"):
            return list(self._task(SkySenseV2(self.config), quiet=True).channel_names)

    def preprocessing(self, modalities: list[str]) -> dict[str, dict[str, Any]]:
        """Band order, normalisation and units of each used modality (tile-store provenance)."""
        out = {}
        for name in modalities:
            m = self.config.modality(name)
            out[name] = {"bands": list(m.bands), "mean": list(m.mean), "std": list(m.std), "units": m.units}
        return out

    def _task(self, model: SkySenseV2, quiet: bool = False) -> TaskModel:
        return build_task(
            self.kind, model, num_classes=self.num_classes, class_names=self.class_names,
            head_state=self.head_state if not quiet else None, quiet=quiet, head_config=self.head_config,
        )  # fmt: skip

    def build(self, context_radius: int | None = None) -> TaskModel:
        """The runnable task model (eval mode, on CPU) with stage-3/4 context ``context_radius``."""
        if self.random_init:
            log.warning("checkpoint %r is a model name: random weights (seed %d)", self.checkpoint, RANDOM_INIT_SEED)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = SkySenseV2(self.config, context_radius=context_radius)
        else:
            model = SkySenseV2(self.config, context_radius=context_radius)
            model.load_state_dict(self.state_dict or {}, strict=True)
        if self.lora is not None:
            inject_lora(model, self.lora["config"])
            missing, unexpected = model.load_state_dict(self.lora["state_dict"], strict=False)
            if unexpected or any("lora_" in k for k in missing):
                raise ValueError(f"{self.checkpoint}: its LoRA matrices do not fit the backbone's layers")
        return self._task(model).eval()


def _head(extra: dict[str, Any], kind: str) -> dict[str, Any]:
    entry = (extra.get("heads") or {}).get(kind)
    if entry is None:
        return {}
    if isinstance(entry, dict) and "state_dict" in entry:
        return entry
    return {"state_dict": entry}


def checkpoint_kind(checkpoint: str | None) -> str | None:
    """The kind a fine-tuned checkpoint or adapter was trained for (None: a plain backbone or a model name)."""
    if not checkpoint or is_model_name(checkpoint):
        return None
    fs, path = fsspec.core.url_to_fs(checkpoint)
    if not fs.exists(path):
        raise _not_found(checkpoint)
    meta = task_meta(read_any(checkpoint))
    return None if meta is None else meta.kind


def _check_kind(checkpoint: str, kind: OutputKind, meta: TaskMeta | None) -> None:
    if meta is not None and kind.name != meta.kind and kind.trainable:
        raise ValueError(
            f"{checkpoint} is a fine-tuned {meta.kind} model, but the job asks for output.kind {kind.name!r}; drop "
            f"output.kind (the checkpoint decides) or set it to {meta.kind!r} (or 'embeddings' for its backbone)"
        )


def resolve_task(
    checkpoint: str | None,
    kind: str | OutputKind | None,
    num_classes: int | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
) -> ResolvedTask:
    """Read the job's checkpoint (or model name) and decide the model, the head and the classes.

    ``kind`` None takes the kind a fine-tuned checkpoint was trained for (else ``embeddings``). Classes come from
    the checkpoint's trained head when it has one for the kind, else from the job spec (``num_classes`` /
    ``class_names``), else from the kind's defaults.

    Raises:
        FileNotFoundError: neither a checkpoint nor a model name (the message suggests the closest name), or the
            backbone an adapter names is missing.
        ValueError: a class count or names that contradict the trained head, an output kind other than the one
            the checkpoint was fine-tuned for, an adapter used with another backbone.
    """
    checkpoint = checkpoint or DEFAULT_MODEL
    if is_model_name(checkpoint):
        config = get_config(checkpoint)
        out = ResolvedTask(config, get_kind(kind or "embeddings"), checkpoint, _random_init_id(config), True,
                           code_version())  # fmt: skip
        head: dict[str, Any] = {}
    else:
        fs, path = fsspec.core.url_to_fs(checkpoint)
        if not fs.exists(path):
            raise _not_found(checkpoint)
        payload = read_any(checkpoint)
        meta = task_meta(payload)
        chosen = get_kind(kind or (meta.kind if meta else "embeddings"))
        _check_kind(checkpoint, chosen, meta)
        if payload["format"] == ADAPTER_FORMAT:
            backbone = read_checkpoint(backbone_of(checkpoint, payload))
            model_dict, state = backbone["model"], backbone["state_dict"]
            head = payload["head"] if meta is not None and chosen.name == meta.kind else {}
            lora = payload.get("lora")
        else:
            model_dict, state, lora = payload["model"], payload["state_dict"], None
            head = _head(payload.get("extra") or {}, chosen.name)
        out = ResolvedTask(
            SkySenseConfig.from_dict(model_dict), chosen, checkpoint, checkpoint_sha256(checkpoint), False,
            str(payload.get("code_version", "")), state_dict=state, lora=lora, meta=meta,
        )  # fmt: skip
    kind = out.kind
    out.head_state = head.get("state_dict")
    out.head_config = dict(head.get("head_config") or {})
    stored = head.get("class_names")
    weight = (out.head_state or {}).get("classifier.weight")
    trained_n = len(stored) if stored else (int(weight.shape[0]) if weight is not None else None)
    if trained_n is not None and num_classes is not None and num_classes != trained_n:
        raise ValueError(
            f"output.num_classes is {num_classes} but the checkpoint's trained {kind.name} head has {trained_n} "
            "classes; drop output.num_classes (the head decides) or use another checkpoint"
        )
    names = list(class_names) if class_names else stored
    out.class_names = kind.class_names(num_classes or trained_n, names)
    out.num_classes = None if out.class_names is None else len(out.class_names)
    out.class_colors = head.get("class_colors") if out.class_names else None
    return out
