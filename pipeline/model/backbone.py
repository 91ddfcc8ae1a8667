"""The shared SkySense V2 backbone: per-modality tokenizers, then one stack of 4 stages for every modality.

Data flow for one image batch of one modality (shapes for an input of H x W pixels, patch size p):

    tokenizer[modality]        (N, C_in, H, W)  -> (N, H/p, W/p, C1)
    stage 1: Swin-V2 blocks    window attention, shifted every other block
    transition 1 (APM)         merge 2x2 or project  -> C2
    stage 2: Swin-V2 blocks
    transition 2 (APM)                                -> C3
    stage 3: global blocks     [4 prompts of modality] + tokens; prompts dropped at the end
    transition 3 (APM)                                -> C4
    stage 4: global blocks     same, with the stage-4 prompts

The feed-forward of the last ``moe_blocks`` blocks is a mixture of experts. Which APM branch a token map
takes is decided by its ground footprint (``merge_schedule``), so no code path branches on a modality's name.

The blocks of each stage are injected (:class:`StageBlocks`, one per stage); :func:`default_stage_blocks` is the
layout above. A stage's blocks take either the token map (N, H, W, C) or, when the stage is ``prompted``, the
sequence [prompts] + tokens (N, P + H*W, C) with its :class:`TokenGrid`: that is data of the stage, not of its index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.modalities import ModalitySpec

from .layers.attention import Block, context_attention
from .layers.local_attention import TokenGrid
from .layers.mlp import Mlp
from .layers.moe import MoEFeedForward
from .layers.patch_merging import AdaptiveTransition, merge_schedule, to_nchw, to_nhwc
from .layers.window_attention import SwinV2Block


class BlockFactory(Protocol):
    """Builds block ``index`` (0-based, within its stage) of a stage of width ``dim``."""

    def __call__(self, dim: int, num_heads: int, index: int, drop_path: float) -> nn.Module:
        """The block, e.g. a ``SwinV2Block`` or a ``Block`` with the stage's attention and feed-forward."""
        ...


@dataclass(frozen=True)
class StageBlocks:
    """How one backbone stage builds its blocks, and which tokens they take.

    Attributes:
        block: called once per block as ``block(dim=, num_heads=, index=, drop_path=)``.
        prompted: False: blocks map the token map (N, H, W, C) to itself (window stages). True: the stage gets
            learnable prompt tokens per modality; blocks are called as ``blk(t, None, grid)`` on the sequence
            ``t`` = [prompts] + tokens (N, P + H*W, C) with its :class:`TokenGrid`; prompts are dropped at the end.
    """

    block: BlockFactory
    prompted: bool = False


def default_stage_blocks(
    depths: Sequence[int],
    *,
    window_size: int = 8,
    mlp_ratio: float = 4.0,
    moe_blocks: int = 6,
    num_experts: int = 8,
    top_k: int = 1,
    moe_aux_weight: float = 0.01,
    context_radius: int | None = None,
) -> tuple[StageBlocks, ...]:
    """The SkySense V2 layout: Swin-V2 window stages 1-2, prompted stages 3-4, MoE in the last blocks.

    Args:
        depths: blocks per stage (4 stages).
        window_size: Swin-V2 window of stages 1-2; every other block is shifted by half a window.
        mlp_ratio: feed-forward hidden width relative to the stage width.
        moe_blocks: the last ``moe_blocks`` blocks of the network (all in stages 3-4) use ``MoEFeedForward``.
        num_experts, top_k, moe_aux_weight: the mixture of experts.
        context_radius: None: global attention in stages 3-4 (as pre-trained); else local neighbourhood attention
            of this many grid cells (tiled inference without seams, :mod:`.layers.local_attention`).

    Returns:
        One :class:`StageBlocks` per stage.
    """
    if moe_blocks > depths[2] + depths[3]:
        raise ValueError(
            f"moe_blocks={moe_blocks} reaches into the window-attention stages; max {depths[2] + depths[3]}"
        )
    attn_layer = context_attention(context_radius)
    moe_ffn = partial(MoEFeedForward, num_experts=num_experts, top_k=top_k, aux_loss_weight=moe_aux_weight)
    first_moe = sum(depths) - moe_blocks  # network-wide index of the first MoE block

    def window_block(dim: int, num_heads: int, index: int, drop_path: float) -> nn.Module:
        shift = 0 if index % 2 == 0 else window_size // 2
        return SwinV2Block(dim, num_heads, window_size=window_size, shift_size=shift, mlp_ratio=mlp_ratio,
                           drop_path=drop_path, mlp_layer=Mlp)  # fmt: skip

    def global_stage(first: int) -> StageBlocks:  # ``first``: network-wide index of the stage's first block
        def block(dim: int, num_heads: int, index: int, drop_path: float) -> nn.Module:
            ffn = moe_ffn if first + index >= first_moe else Mlp
            return Block(dim, num_heads, mlp_ratio, drop_path=drop_path, ffn_layer=ffn, attn_layer=attn_layer)

        return StageBlocks(block, prompted=True)

    window = StageBlocks(window_block)
    return window, window, global_stage(sum(depths[:2])), global_stage(sum(depths[:3]))


class PatchEmbed(nn.Module):
    """Tokenizer of one modality: non-overlapping p x p patches -> C1 channels, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, H/p, W/p, C1)."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the tokenizer patch size {self.patch_size}")
        return self.norm(to_nhwc(self.proj(x)))


class SkySenseV2Backbone(nn.Module):
    """Shared multi-modal hierarchical backbone (stages 1-2 window attention, 3-4 global attention + prompts).

    Args:
        modalities: input modalities (one tokenizer and one set of prompt tokens each).
        patch_sizes: tokenizer patch size per modality.
        dims: channel width of each stage.
        depths: blocks per stage.
        head_dim: attention head width (heads = dim // head_dim).
        mlp_ratio, window_size, moe_blocks, num_experts, top_k, moe_aux_weight: the default blocks
            (:func:`default_stage_blocks`); unused when ``stage_blocks`` is given.
        num_prompts: prompt tokens per modality in each prompted stage.
        grid_gsd: footprint in metres of one stage-3/4 token (decides the APM schedule).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        context_radius: None: global attention in stages 3-4 (as pre-trained); else local attention of this many
            grid cells, for tiled inference without seams. Selects the default blocks' attention, so it cannot be
            combined with ``stage_blocks``.
        stage_blocks: one :class:`StageBlocks` per stage; None: :func:`default_stage_blocks`.
    """

    def __init__(
        self,
        *,
        modalities: Sequence[ModalitySpec],
        patch_sizes: dict[str, int],
        dims: Sequence[int],
        depths: Sequence[int],
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        window_size: int = 8,
        moe_blocks: int = 6,
        num_experts: int = 8,
        top_k: int = 1,
        moe_aux_weight: float = 0.01,
        num_prompts: int = 4,
        grid_gsd: float = 10.0,
        drop_path_rate: float = 0.0,
        context_radius: int | None = None,
        stage_blocks: Sequence[StageBlocks] | None = None,
    ) -> None:
        super().__init__()
        if stage_blocks is None:
            stage_blocks = default_stage_blocks(
                depths, window_size=window_size, mlp_ratio=mlp_ratio, moe_blocks=moe_blocks, num_experts=num_experts,
                top_k=top_k, moe_aux_weight=moe_aux_weight, context_radius=context_radius,
            )  # fmt: skip
        elif context_radius is not None:
            raise ValueError(
                "context_radius selects the attention of the default stage blocks; with stage_blocks, build them "
                "with it instead (default_stage_blocks(..., context_radius=r))"
            )
        if len(stage_blocks) != len(depths) or len(dims) != len(depths):
            raise ValueError(f"{len(stage_blocks)} stage_blocks, {len(dims)} dims, {len(depths)} depths: need one each")
        self.modality_names = tuple(m.name for m in modalities)
        self.patch_sizes = dict(patch_sizes)
        self.dims = tuple(dims)
        self.grid_gsd = grid_gsd
        self.num_prompts = num_prompts
        self.grad_checkpointing = False
        self.context_radius = context_radius  # None: global attention in stages 3-4 (as pre-trained)
        self.prompted = tuple(sb.prompted for sb in stage_blocks)

        self.tokenizers = nn.ModuleDict(
            {m.name: PatchEmbed(m.num_bands, dims[0], patch_sizes[m.name]) for m in modalities}
        )
        total = sum(depths)
        drop_rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # python: works on meta
        stages: list[nn.ModuleList] = []
        i = 0
        for dim, depth, sb in zip(dims, depths, stage_blocks):
            heads = dim // head_dim
            stages.append(
                nn.ModuleList(
                    sb.block(dim=dim, num_heads=heads, index=j, drop_path=drop_rates[i + j]) for j in range(depth)
                )
            )
            i += depth
        self.stages = nn.ModuleList(stages)
        self.transitions = nn.ModuleList(AdaptiveTransition(dims[s], dims[s + 1]) for s in range(len(dims) - 1))
        # Prompt tokens of each prompted stage, in stage order: (num_modalities, num_prompts, C) each.
        self.prompts = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(len(self.modality_names), num_prompts, dims[s]))
                for s, p in enumerate(self.prompted)
                if p
            ]
        )
        # Stage -> its entry in ``prompts`` (None: a window stage without prompts).
        slots = iter(range(len(self.prompts)))
        self._prompt_slot = tuple(next(slots) if p else None for p in self.prompted)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)  # per-stage output norms (feature API)
        # MoE statistics of every backbone call since the last reset: one call per modality per model forward,
        # so a single layer attribute (last call only) would see the last modality alone.
        self._moe_aux: list[Tensor] = []
        self._moe_counts: dict[str, Tensor] = {}
        # (name, layer) of every MoE layer, found once: the per-call stats collection is on the hot path.
        self._moe_named = [(n, m) for n, m in self.named_modules() if isinstance(m, MoEFeedForward)]
        self._init_weights()

    def _init_weights(self) -> None:
        for p in self.prompts:
            nn.init.trunc_normal_(p, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory (training)."""
        self.grad_checkpointing = enable

    def merges_for(self, modality: str, gsd: float) -> tuple[bool, ...]:
        """APM schedule for one input (see :func:`merge_schedule`)."""
        return merge_schedule(gsd, self.patch_sizes[modality], self.grid_gsd)

    def _run(self, block: nn.Module, *args: Tensor | TokenGrid | None) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, modality: str, gsd: float) -> list[Tensor]:
        """Run one modality's images through all 4 stages.

        Args:
            x: normalised images (N, C_in, H, W) of modality ``modality``.
            modality: key of the tokenizer and prompt tokens.
            gsd: ground sampling distance of ``x`` in metres (decides the APM schedule).

        Returns:
            Four maps (N, C_s, H_s, W_s), s = 1..4, each after the stage's output LayerNorm.

        """
        merges = self.merges_for(modality, gsd)
        m = self.modality_names.index(modality)
        x = self.tokenizers[modality](x)  # (N, H1, W1, C1)
        outs: list[Tensor] = []
        for s, (blocks, slot) in enumerate(zip(self.stages, self._prompt_slot)):
            if s > 0:
                x = self.transitions[s - 1](x, merges[s - 1])
            if slot is None:
                for blk in blocks:
                    x = self._run(blk, x)  # (N, H, W, C)
            else:
                N, H, W, C = x.shape
                prompts = self.prompts[slot][m].to(x.dtype).expand(N, -1, -1)  # (N, P, C)
                t = torch.cat([prompts, x.reshape(N, H * W, C)], dim=1)  # (N, P + H*W, C)
                grid = TokenGrid(H, W, self.num_prompts)
                for blk in blocks:
                    t = self._run(blk, t, None, grid)
                x = t[:, self.num_prompts :].reshape(N, H, W, C)  # prompts dropped at the end of the stage
            outs.append(to_nchw(self.norms[s](x)))
        self._collect_moe_stats()
        return outs

    def reset_moe_stats(self) -> None:
        """Forget the MoE losses/counts collected so far (called at the start of every model forward)."""
        self._moe_aux = []
        self._moe_counts = {}

    def _collect_moe_stats(self) -> None:
        for name, layer in self._moe_named:
            if layer.aux_loss is not None:
                self._moe_aux.append(layer.aux_loss)
            prev = self._moe_counts.get(name)
            counts = layer.tokens_per_expert.detach().clone()
            self._moe_counts[name] = counts if prev is None else prev + counts

    def moe_layers(self) -> list[MoEFeedForward]:
        """All mixture-of-experts feed-forward layers, in depth order."""
        return [m for _, m in self._moe_named]

    def moe_aux_loss(self) -> Tensor:
        """Sum of the load-balancing losses of every layer and every backbone call since the last reset."""
        return torch.stack(self._moe_aux).sum() if self._moe_aux else torch.zeros(())

    def tokens_per_expert(self) -> dict[str, Tensor]:
        """Per-layer token counts (E,) summed over the backbone calls since the last reset, keyed by module name."""
        return {name: counts.clone() for name, counts in self._moe_counts.items()}
