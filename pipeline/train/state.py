"""Training checkpoints: the student as a self-describing model checkpoint, plus everything needed to resume.

One file per saved step, ``<storage>/checkpoints/step_0000100.pt``, written with
:func:`pipeline.model.checkpoint.save_checkpoint` (atomic: temp file + move), so ``load_checkpoint`` opens it
as a plain student model. Its ``extra`` holds the rest of the training state:

    meta_arch     the meta-architecture's weights and buffers except the student's (EMA teacher, SSL heads,
                  loss state such as queues or centres)
    optimizer     AdamW state keyed by parameter name (``torch.distributed.checkpoint.state_dict`` format, so
                  DDP, FSDP2 and single-process runs read each other's checkpoints)
    step          optimiser steps done
    data_position micro-batches consumed (the data order is a pure function of it, see ``data.py``)
    spec          the job spec, for provenance

RNG [ours]: every step re-seeds torch from ``(seed, step, rank)``, so no generator state has to be stored and a
resumed run draws exactly what an uninterrupted one would. Full (unsharded) state dicts are gathered to CPU and
written by rank 0; every rank reads the file on resume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pipeline.model.checkpoint import read_checkpoint, save_checkpoint
from pipeline.model.config import SkySenseConfig

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


@dataclass
class Snapshot:
    """A model's config and weights without the module (what ``save_checkpoint`` reads from a model)."""

    config: SkySenseConfig
    weights: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights."""
        return self.weights


def checkpoint_path(storage: str, step: int) -> str:
    """Where the checkpoint of ``step`` lives."""
    return f"{storage.rstrip('/')}/checkpoints/step_{step:07d}.pt"


def list_checkpoints(storage: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the finished checkpoints under ``storage``, oldest first (temp files ignored)."""
    fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/checkpoints")
    if not fs.exists(root):
        return []
    found = []
    for p in fs.ls(root, detail=False):
        m = _STEP_FILE.search(p)
        if m:
            found.append((int(m[1]), p if "://" not in storage else fs.unstrip_protocol(p)))
    return sorted(found)


def latest_checkpoint(storage: str) -> str | None:
    """Path of the newest checkpoint, or None."""
    found = list_checkpoints(storage)
    return found[-1][1] if found else None


def module_prefix(root: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``root`` (``""`` if it is ``root``)."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found inside the meta-architecture")


def split_state(state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(inside prefix with the prefix stripped, everything else)``."""
    p = f"{prefix}." if prefix else ""
    inner = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    rest = {k: v for k, v in state.items() if not k.startswith(p)}
    return inner, rest


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full CPU state dicts of the (possibly DDP/FSDP2-wrapped) model and its optimizer. Collective call."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_checkpoint(
    storage: str,
    step: int,
    config: SkySenseConfig,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    student_prefix: str,
    extra: dict[str, Any],
    provenance: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write the checkpoint of ``step`` (rank 0), then delete all but the newest ``keep``; returns its path."""
    student, rest = split_state(model_state, student_prefix)
    path = checkpoint_path(storage, step)
    fs, _ = fsspec.core.url_to_fs(path)
    fs.makedirs(fs._parent(fsspec.core.url_to_fs(path)[1]), exist_ok=True)
    payload = {"meta_arch": rest, "optimizer": optim_state, "step": step, "student_prefix": student_prefix} | extra
    save_checkpoint(Snapshot(config, student), path, provenance=provenance, extra=payload)  # type: ignore[arg-type]
    for _, old in list_checkpoints(storage)[:-keep]:
        fs.rm(fsspec.core.url_to_fs(old)[1])
    return path


def load_training_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(meta-architecture state, optimizer state, extra)`` of a training checkpoint."""
    payload = read_checkpoint(path)
    extra = payload["extra"]
    prefix = extra.get("student_prefix", "")
    p = f"{prefix}." if prefix else ""
    state = {f"{p}{k}": v for k, v in payload["state_dict"].items()} | extra.pop("meta_arch")
    return state, extra.pop("optimizer"), extra


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
            optim_state: dict[str, Any]) -> None:  # fmt: skip
    """Load full state dicts into the (possibly wrapped) model and optimizer. Collective call.

    The model must match exactly. Optimizer state may lack parameters: AdamW creates state only for parameters
    that have received a gradient, and e.g. the tokenizer of a modality not sampled yet has none.
    """
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    # The loader first creates state for every parameter (one zero-gradient step); drop it again where the
    # checkpoint had none, so such a parameter's first real update uses step 1 as in an uninterrupted run.
    saved = set(optim_state.get("state", {}))
    for name, p in getattr(model, "module", model).named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)


def export_model(path: str, out: str, which: str = "teacher", provenance: dict[str, Any] | None = None) -> str:
    """Write the ``teacher`` (EMA) or ``student`` backbone of a training checkpoint as a plain model checkpoint.

    The teacher is found as the sub-state whose keys mirror the student's (``<prefix>.<student key>``).
    Returns the SHA-256 of the written file.
    """
    payload = read_checkpoint(path)
    config = SkySenseConfig.from_dict(payload["model"])
    student = payload["state_dict"]
    weights = student
    if which == "teacher":
        rest = payload["extra"]["meta_arch"]
        prefixes = {k[: -len(s)] for k in rest for s in student if k.endswith("." + s)}
        matches = [p for p in prefixes if all(p + s in rest for s in student)]
        if len(matches) != 1:
            raise ValueError(f"{path}: cannot find exactly one teacher copy of the student (found {matches})")
        weights = {s: rest[matches[0] + s] for s in student}
    elif which != "student":
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    prov = dict(payload.get("provenance", {})) | {"weights": which, "step": payload["extra"].get("step")}
    return save_checkpoint(Snapshot(config, weights), out, provenance=prov | (provenance or {}))  # type: ignore[arg-type]
