"""Fine-tuned checkpoints that carry their task, and small adapter files that name their backbone.

Two forms, both self-describing (the task, its classes and colours, label nodata, the head's settings, the input
modalities, the data provenance and the validation metrics travel inside, as :class:`TaskMeta`):

* **full** (``adapt: full`` or ``partial``: backbone weights changed): a regular ``skypipe.checkpoint/1`` file
  (:mod:`pipeline.model.checkpoint`) whose ``extra`` holds ``task`` (the meta) and ``heads[kind]`` (the head's
  weights, class names and colours, settings). Region jobs and ``skypipe eval`` read it like any checkpoint.
* **adapter** (``adapt: frozen`` or ``lora``: the backbone is unchanged): ``skypipe.adapter/1``, only the head (and
  the LoRA matrices) plus the backbone checkpoint it was trained on, named by path and **sha256**. Loading one with
  a backbone of another sha256 is refused, so a head is never silently run on features it was not trained for. A
  relative backbone path is looked up next to the adapter file first, then from the working directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pipeline import storage
from pipeline.model.checkpoint import FORMAT, checkpoint_sha256, code_version, read_checkpoint, write_payload

ADAPTER_FORMAT = "skypipe.adapter/1"


class AdapterMismatchError(ValueError):
    """An adapter file used with a backbone other than the one it was trained on."""


@dataclass
class TaskMeta:
    """What a fine-tuned model is for (stored in checkpoints and adapters; shown by ``skypipe model info``)."""

    kind: str
    class_names: list[str] | None = None
    class_colors: list[str] | None = None
    label_nodata: list[float] = field(default_factory=list)
    head_config: dict[str, Any] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    adapt: str = "full"
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain data (checkpoints are loaded with ``weights_only``)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskMeta:
        """Inverse of :meth:`to_dict` (unknown keys of newer files are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _head_entry(task: nn.Module, meta: TaskMeta) -> dict[str, Any]:
    head = task.head  # type: ignore[attr-defined]
    return {
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "class_names": meta.class_names, "class_colors": meta.class_colors, "head_config": meta.head_config,
    }  # fmt: skip


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA matrices of ``model`` (what an adapter stores besides the head)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def save_full(task: nn.Module, meta: TaskMeta, path: str, provenance: dict[str, Any] | None = None) -> str:
    """A whole fine-tuned model (backbone + head) as a ``skypipe.checkpoint/1`` file; returns its sha256."""
    from pipeline.model.checkpoint import save_checkpoint

    extra = {"task": meta.to_dict(), "heads": {meta.kind: _head_entry(task, meta)}}
    return save_checkpoint(task.model, path, provenance=provenance, extra=extra)  # type: ignore[arg-type]


def save_adapter(task: nn.Module, meta: TaskMeta, path: str, lora: dict[str, Any] | None = None) -> str:
    """The head (and LoRA matrices with their config) plus the backbone's path and sha256; returns its sha256."""
    if not meta.backbone.get("sha256"):
        raise ValueError("an adapter needs the sha256 of the backbone checkpoint it was trained on")
    payload = {
        "format": ADAPTER_FORMAT, "code_version": code_version(), "task": meta.to_dict(),
        "backbone": dict(meta.backbone), "head": _head_entry(task, meta),
        "lora": None if lora is None else {"config": lora, "state_dict": lora_state(task.model)},  # type: ignore[arg-type]
    }  # fmt: skip
    return write_payload(payload, path)


def read_any(path: str) -> dict[str, Any]:
    """A checkpoint or adapter payload (CRC-checked), by its ``format``."""
    return read_checkpoint(path, formats=(FORMAT, ADAPTER_FORMAT))


def task_meta(payload: dict[str, Any]) -> TaskMeta | None:
    """The task a checkpoint/adapter payload was fine-tuned for, or None for a plain backbone."""
    d = payload.get("task") if payload.get("format") == ADAPTER_FORMAT else (payload.get("extra") or {}).get("task")
    return None if not d else TaskMeta.from_dict(d)


def read_task_meta(path: str) -> TaskMeta | None:
    """The task of the checkpoint or adapter at ``path`` (None for a plain backbone checkpoint)."""
    return task_meta(read_any(path))


def backbone_of(adapter_path: str, payload: dict[str, Any]) -> str:
    """The backbone checkpoint an adapter names, located and checked by sha256.

    Looked for, in order: a file of the backbone's name next to the adapter (adapters and backbones are shipped
    side by side), the recorded path relative to the adapter's folder, the recorded path as it is. The first file
    found must have the recorded sha256.

    Raises:
        FileNotFoundError: the named backbone is nowhere to be found.
        AdapterMismatchError: the file found has another sha256.
    """
    ref = payload["backbone"]
    named = str(ref.get("path", ""))
    folder = storage.parent(adapter_path)
    candidates = list(dict.fromkeys([storage.join(folder, Path(named).name), storage.join(folder, named), named]))
    if "://" in named or Path(named).is_absolute():
        candidates.remove(storage.join(folder, named))
    found = next((c for c in candidates if c and storage.exists(c)), None)
    if found is None:
        raise FileNotFoundError(
            f"{adapter_path}: its backbone checkpoint {named!r} was not found (looked at {candidates}); put it there"
        )
    sha = checkpoint_sha256(found)
    if sha != ref["sha256"]:
        raise AdapterMismatchError(
            f"{adapter_path} was trained on backbone sha256 {ref['sha256'][:12]}..., but {found} has sha256 "
            f"{sha[:12]}...; use the backbone it was trained on, or fine-tune again on this one"
        )
    return found


def inject_lora(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Add LoRA matrices (peft) to the attention projections named in ``config``; returns the model (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=int(config["r"]), lora_alpha=float(config["alpha"]), lora_dropout=float(config["dropout"]),
                      target_modules=config["target_modules"], bias="none")  # fmt: skip
    return inject_adapter_in_model(lora, model)
