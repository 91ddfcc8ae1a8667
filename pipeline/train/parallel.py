"""Distributing the meta-architecture: DDP for small/base, FSDP2 (``fully_shard``) for huge, per-block compile.

DDP wraps the whole meta-architecture, so its ``forward(batch)`` is the one DDP call per micro-batch; the EMA
teacher's parameters do not require gradients, so DDP neither reduces nor waits for them.
``find_unused_parameters`` is on because a batch only exercises the tokenizers and prompts of the modalities it
holds; ``broadcast_buffers`` is off because losses own and synchronise their own state.

FSDP2 shards every transformer block (student and teacher alike, so the EMA runs on matching local shards) and
then the root; parameters outside blocks (tokenizers, transitions, prompts, heads) live in the root group.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeline.model.layers.attention import Block
from pipeline.model.layers.window_attention import SwinV2Block

BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, SwinV2Block)


def distributed() -> bool:
    """Whether a process group is up with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over ``module`` when running distributed, else ``module`` itself."""
    if not distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; its replacement still syncs at init
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)


def wrap_fsdp(module: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root (in place; returns ``module``).

    ``param_dtype`` (e.g. bf16) makes FSDP all-gather and compute in that dtype while keeping fp32 master
    weights and fp32 gradient reduction.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for sub in list(module.modules()):
        if isinstance(sub, BLOCK_TYPES):
            fully_shard(sub, **kwargs)
    fully_shard(module, **kwargs)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The meta-architecture inside a DDP wrapper (FSDP2 modules are not wrappers)."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of non-final accumulation micro-batches (DDP ``no_sync`` / FSDP2 flag)."""
    if enabled:
        yield
        return
    if hasattr(module, "no_sync"):
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` every transformer block in place (torchtitan style); returns how many were compiled."""
    n = 0
    for sub in module.modules():
        if isinstance(sub, BLOCK_TYPES):
            sub.compile()
            n += 1
    return n
