"""The model a fine-tuning run trains: a backbone (checkpoint or seeded random init) plus the task's head, adapted.

Adaptation modes (``adapt.mode``):

* ``frozen``: only the head learns (the backbone and fusion stay as pre-trained; run in eval mode, so no dropout
  or stochastic depth); the result is saved as a small adapter that names its backbone by sha256;
* ``partial``: the head, the fusion module and the last ``adapt.stages`` backbone stages learn;
* ``full``: everything learns;
* ``lora``: the backbone and fusion stay frozen and low-rank adapters (peft LoRA, rank ``adapt.rank``) are added to
  the attention projections; the head and the adapters learn, and are saved as an adapter file.

Every mode uses the pre-training optimiser rules (:func:`pipeline.ssl.schedules.param_groups`: weight decay by
rule, layer-wise learning-rate decay ``adapt.layer_decay``), with the head at the top layer's full rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.kinds import OutputKind
from pipeline.model.config import MODEL_CONFIGS, get_config
from pipeline.model.heads import TaskModel, build_task
from pipeline.model.skysense import SkySenseV2

log = logging.getLogger(__name__)

AdaptMode = Literal["frozen", "partial", "full", "lora"]
LORA_TARGETS = r".*\.attn\.(qkv|proj)$"
"""Linear layers that get LoRA adapters (a peft regex over module names): the attention input and output projections
of every block, window attention (stages 1-2), global/local attention (stages 3-4) and fusion; not the tokenizers'
or transitions' projections."""


@dataclass(frozen=True)
class Backbone:
    """Where the backbone came from: a checkpoint (path + sha256) or a seeded random init of a named model."""

    model: SkySenseV2
    source: str
    sha256: str | None

    @property
    def random_init(self) -> bool:
        """No pre-trained weights (a baseline)."""
        return self.sha256 is None


def _is_random_init(name_or_path: str) -> bool:
    from pipeline.infer.task import is_model_name

    return is_model_name(name_or_path) or name_or_path in MODEL_CONFIGS


def backbone_sha256(name_or_path: str) -> str | None:
    """The identity :func:`load_backbone` gives ``name_or_path``: its checkpoint's sha256, None for a random init."""
    from pipeline.model.checkpoint import checkpoint_sha256

    return None if _is_random_init(name_or_path) else checkpoint_sha256(name_or_path)


def load_backbone(name_or_path: str, seed: int = 0, context_radius: int | None = None) -> Backbone:
    """A pre-trained checkpoint, or (for a model name) a random init seeded with ``seed`` (the baseline).

    ``context_radius`` sets the stage-3/4 context (None: global attention, as pre-trained).
    """
    from pipeline.model.checkpoint import load_checkpoint

    if _is_random_init(name_or_path):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SkySenseV2(get_config(name_or_path), context_radius=context_radius)
        return Backbone(model, name_or_path, None)
    model, _ = load_checkpoint(name_or_path, context_radius=context_radius)
    return Backbone(model, name_or_path, backbone_sha256(name_or_path))


def build_model(
    kind: OutputKind,
    backbone: Backbone,
    class_names: list[str] | None,
    head_config: dict[str, Any],
    *,
    mode: AdaptMode,
    stages: int = 2,
    lora: dict[str, Any] | None = None,
    seed: int = 0,
) -> TaskModel:
    """The task model with its trainable parts set by ``mode`` (see the module docstring)."""
    task = build_task(kind, backbone.model, len(class_names) if class_names else None, class_names, seed=seed,
                      quiet=True, head_config=head_config)  # fmt: skip
    adapt(task, mode, stages=stages, lora=lora)
    return task


def adapt(task: TaskModel, mode: AdaptMode, *, stages: int = 2, lora: dict[str, Any] | None = None) -> None:
    """Set which parameters learn (in place); LoRA matrices are injected for ``mode == "lora"``."""
    model = task.model
    if mode == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if mode == "partial":
        if not 1 <= stages <= len(model.backbone.stages):
            raise ValueError(f"adapt.stages must be 1..{len(model.backbone.stages)}, got {stages}")
        first = len(model.backbone.stages) - stages
        for s in range(first, len(model.backbone.stages)):
            model.backbone.stages[s].requires_grad_(True)
            model.backbone.norms[s].requires_grad_(True)
            if s > 0:
                model.backbone.transitions[s - 1].requires_grad_(True)
        model.backbone.prompts.requires_grad_(True)
        model.fusion.requires_grad_(True)
    elif mode == "lora":
        from pipeline.finetune.checkpoint import inject_lora

        if lora is None:
            raise ValueError("adapt.mode lora needs the LoRA settings (rank, alpha)")
        inject_lora(model, lora)  # peft marks only the lora_* matrices trainable among the model's parameters
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    elif mode != "frozen":
        raise ValueError(f"adapt.mode must be frozen, partial, full or lora, got {mode!r}")


def lora_config(rank: int, alpha: float | None = None, dropout: float = 0.0) -> dict[str, Any]:
    """Plain-data LoRA settings (stored in adapter files)."""
    return {"r": rank, "alpha": float(alpha if alpha is not None else 2 * rank), "dropout": dropout,
            "target_modules": LORA_TARGETS}  # fmt: skip


def set_train_mode(task: TaskModel, mode: AdaptMode) -> None:
    """Training mode for the parts that learn; a frozen backbone stays in eval mode (no dropout, no drop path)."""
    task.train()
    if mode in ("frozen", "lora"):
        task.model.eval()


def trainable_summary(task: nn.Module) -> str:
    """``N of M parameters learn (x %)``."""
    total = sum(p.numel() for p in task.parameters())
    train = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return f"{train:,} of {total:,} parameters learn ({100 * train / max(total, 1):.1f} %)"
