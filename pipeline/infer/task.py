"""The model an inference job runs: a checkpoint (or a named random-init model) wrapped for the output kind.

``checkpoint`` is a checkpoint path / fsspec URL (:mod:`pipeline.model.checkpoint`), or a bare model name such as
``skysense_v2_tiny``, which means random weights from a fixed seed (a demo of the code path, not a model: the
provenance says so). Trained heads travel in the checkpoint's ``extra["heads"][kind]``, either as a head state
dict or as ``{"state_dict": ..., "class_names": [...]}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from pipeline.model.checkpoint import checkpoint_sha256, code_version, load_checkpoint, read_checkpoint
from pipeline.model.config import MODEL_CONFIGS, SkySenseConfig, get_config
from pipeline.model.heads import TaskModel, build_task
from pipeline.model.skysense import SkySenseV2

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
DEFAULT_MODEL = "skysense_v2_tiny"


@dataclass(frozen=True)
class TaskInfo:
    """What the driver needs to know about a job's model without loading its weights."""

    config: SkySenseConfig
    checkpoint: str
    checkpoint_sha256: str
    random_init: bool
    kind: str
    channels: list[str]
    num_classes: int | None
    class_names: list[str] | None
    code_version: str

    def preprocessing(self, modalities: list[str]) -> dict[str, dict[str, Any]]:
        """Band order, normalisation and units of each used modality (tile-store provenance)."""
        out = {}
        for name in modalities:
            m = self.config.modality(name)
            out[name] = {"bands": list(m.bands), "mean": list(m.mean), "std": list(m.std), "units": m.units}
        return out


def is_model_name(checkpoint: str) -> bool:
    """True for a named configuration that is not also an existing file."""
    if checkpoint not in MODEL_CONFIGS:
        return False
    fs, path = fsspec.core.url_to_fs(checkpoint)
    return not fs.exists(path)


def _random_init_id(config: SkySenseConfig) -> str:
    blob = json.dumps({"config": config.to_dict(), "seed": RANDOM_INIT_SEED}, sort_keys=True, default=str)
    return "random-init:" + hashlib.sha256(blob.encode()).hexdigest()


def _head(extra: dict[str, Any], kind: str) -> tuple[dict[str, torch.Tensor] | None, list[str] | None]:
    entry = (extra.get("heads") or {}).get(kind)
    if entry is None:
        return None, None
    if isinstance(entry, dict) and "state_dict" in entry:
        return entry["state_dict"], entry.get("class_names")
    return entry, None


def _num_classes(state: dict[str, torch.Tensor] | None, class_names: list[str] | None) -> int | None:
    if class_names:
        return len(class_names)
    weight = (state or {}).get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else None


def describe_task(
    checkpoint: str | None, kind: str, num_classes: int | None = None, class_names: list[str] | None = None
) -> TaskInfo:
    """Config, output channels and identity of the job's model (the weights are built on the meta device)."""
    checkpoint = checkpoint or DEFAULT_MODEL
    if is_model_name(checkpoint):
        config, extra, sha, random_init = get_config(checkpoint), {}, "", True
        sha = _random_init_id(config)
        version = code_version()
    else:
        payload = read_checkpoint(checkpoint)
        config = SkySenseConfig.from_dict(payload["model"])
        extra, sha, random_init = payload.get("extra") or {}, checkpoint_sha256(checkpoint), False
        version = str(payload.get("code_version", ""))
    state, stored_names = _head(extra, kind)
    class_names = class_names or stored_names
    num_classes = num_classes or _num_classes(state, class_names)
    with torch.device("meta"):
        task = build_task(kind, SkySenseV2(config), num_classes=num_classes, class_names=class_names)
    return TaskInfo(
        config=config,
        checkpoint=checkpoint,
        checkpoint_sha256=sha,
        random_init=random_init,
        kind=kind,
        channels=list(task.channel_names),
        num_classes=num_classes if kind != "embeddings" else None,
        class_names=class_names,
        code_version=version,
    )


def load_task(
    checkpoint: str | None, kind: str, num_classes: int | None = None, class_names: list[str] | None = None
) -> TaskModel:
    """The runnable task model (eval mode, on CPU)."""
    checkpoint = checkpoint or DEFAULT_MODEL
    if is_model_name(checkpoint):
        log.warning("checkpoint %r is a model name: random weights (seed %d)", checkpoint, RANDOM_INIT_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = SkySenseV2(get_config(checkpoint))
        extra: dict[str, Any] = {}
    else:
        model, payload = load_checkpoint(checkpoint)
        extra = payload.get("extra") or {}
    state, stored_names = _head(extra, kind)
    class_names = class_names or stored_names
    task = build_task(
        kind, model, num_classes=num_classes or _num_classes(state, class_names), class_names=class_names,
        head_state=state,
    )  # fmt: skip
    return task.eval()
