"""Schedules as pure functions of the step (nanoGPT ``get_lr``) and parameter groups built by rule.

The training loop sets, every step::

    for g in optimizer.param_groups:
        g["lr"] = cosine_lr(step, ...) * g["lr_scale"]
        g["weight_decay"] = weight_decay_schedule(step, ...) * g["wd_scale"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from torch import nn


def _cosine(progress: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); clamped outside [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    start_lr: float = 0.0,
) -> float:
    """Linear warm-up from ``start_lr`` to ``base_lr`` over ``warmup_steps``, then cosine to ``min_lr``.

    ``step == warmup_steps`` gives ``base_lr``; ``step >= total_steps`` gives ``min_lr`` (paper: 2e-4 -> 1e-6).
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    return _cosine((step - warmup_steps) / decay_steps, base_lr, min_lr)


def momentum_schedule(step: int, *, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from ``base`` at step 0 to ``final`` at ``total_steps`` (BYOL/DINO)."""
    return _cosine(step / max(total_steps, 1), base, final)


def weight_decay_schedule(step: int, *, total_steps: int, base: float = 0.04, final: float = 0.4) -> float:
    """Weight decay: cosine from ``base`` to ``final`` (DINO); ``base == final`` gives a constant."""
    return _cosine(step / max(total_steps, 1), base, final)


# Parameters that are tokens, scales or biases rather than layer weights, judged by their own (leaf) name: never
# decayed even when 2-D or 3-D (stacked MoE expert biases ``b1``/``b2``, prompts, queries, Swin-V2 logit scales).
_NO_DECAY_LEAF = re.compile(r"token|prompt|embed|queries|prototype|logit_scale|bias|^b\d+$")
# Modules whose weights are not decayed (timm Swin-V2: the continuous position-bias MLP).
_NO_DECAY_MODULE = re.compile(r"(^|\.)cpb_mlp(\.|$)")


def decays(name: str, param: nn.Parameter, owner: nn.Module, owner_name: str = "") -> bool:
    """The weight-decay rule: tensors of layer weights (``ndim >= 2``) decay; norms, biases, tokens don't.

    Args:
        name: the parameter's name inside ``owner`` (e.g. ``weight``, ``prompts.0``, ``b1``).
        param: the parameter.
        owner: the module that directly holds it (embeddings and parameter lists hold tokens).
        owner_name: the owner's qualified name (position-bias networks are not decayed).

    """
    if param.ndim < 2 or isinstance(owner, (nn.Embedding, nn.ParameterList)):
        return False
    return not (_NO_DECAY_LEAF.search(name) or _NO_DECAY_MODULE.search(owner_name))


def skysense_layer_id(name: str, depths: tuple[int, ...], fusion_depth: int) -> int:
    """Depth of a parameter of a SkySense V2 model (or of a module holding one), for layer-wise lr decay.

    0 = tokenizers; backbone block ``k`` (counted over all stages) = ``k + 1``; a stage's transition, output
    norm and prompts sit with the block they feed or follow; fusion block ``j`` = ``sum(depths) + 2 + j``;
    fusion input projection and embeddings one below; everything else (fusion output norm, SSL heads) is the
    top layer ``sum(depths) + fusion_depth + 2`` and keeps the full learning rate.
    """
    starts = [sum(depths[:s]) for s in range(len(depths))]  # blocks before stage s
    n_backbone = sum(depths)
    if m := re.search(r"backbone\.tokenizers\.", name):
        return 0
    if m := re.search(r"backbone\.stages\.(\d+)\.(\d+)\.", name):
        return starts[int(m[1])] + int(m[2]) + 1
    if m := re.search(r"backbone\.transitions\.(\d+)\.", name):  # feeds stage s + 1
        return starts[int(m[1]) + 1] + 1
    if m := re.search(r"backbone\.prompts\.(\d+)", name):  # prompts of stages 3 and 4
        return starts[int(m[1]) + 2] + 1
    if m := re.search(r"backbone\.norms\.(\d+)\.", name):  # output of stage s
        return starts[int(m[1])] + depths[int(m[1])]
    if m := re.search(r"fusion\.blocks\.(\d+)\.", name):
        return n_backbone + 2 + int(m[1])
    if re.search(r"fusion\.(proj|cls_token|modality_embed|doy_embed)", name):
        return n_backbone + 1
    return n_backbone + fusion_depth + 2


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    layer_id: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups by rule: decay per :func:`decays`, lr scaled by ``layer_decay ** (L - depth)``.

    Args:
        model: any module; parameters without ``requires_grad`` are skipped.
        lr: base learning rate (stored as ``lr`` and, relative, as ``lr_scale``).
        weight_decay: base weight decay for decayed groups (``wd_scale`` is 1 or 0).
        layer_decay: layer-wise lr decay (1 = off). The depth comes from ``layer_id``.
        layer_id: parameter name -> depth; by default :func:`skysense_layer_id` with the depths of the first
            ``SkySenseV2`` found in ``model`` (depth 0 for all when there is none).

    Returns:
        One group per (depth, decay) with keys ``params``, ``lr``, ``weight_decay``, ``lr_scale``,
        ``wd_scale``, ``name``.

    """
    if layer_id is None:
        config = next((m.config for m in model.modules() if hasattr(m, "config") and hasattr(m, "backbone")), None)
        if config is None:
            layer_id = lambda name: 0  # noqa: E731
        else:
            depths, fusion_depth = tuple(config.depths), config.fusion_depth
            layer_id = lambda name: skysense_layer_id(name, depths, fusion_depth)  # noqa: E731
    entries: list[tuple[int, bool, nn.Parameter]] = []
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                entries.append((layer_id(full), decays(p_name, p, mod, mod_name), p))
    top = max((e[0] for e in entries), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for depth, decay, p in entries:
        key = (depth, decay)
        if key not in groups:
            scale = layer_decay ** (top - depth)
            groups[key] = {
                "params": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale, "wd_scale": 1.0 if decay else 0.0,
                "name": f"layer{depth}_{'decay' if decay else 'no_decay'}",
            }  # fmt: skip
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
