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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.modalities import ModalitySpec

from .layers.attention import Block
from .layers.local_attention import LocalGrid
from .layers.mlp import Mlp
from .layers.moe import MoEFeedForward
from .layers.patch_merging import AdaptiveTransition, merge_schedule, to_nchw, to_nhwc
from .layers.window_attention import SwinV2Block


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
    """Shared multi-modal hierarchical backbone (stages 1-2 window attention, 3-4 global attention + prompts)."""

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
    ) -> None:
        super().__init__()
        if moe_blocks > depths[2] + depths[3]:
            raise ValueError(
                f"moe_blocks={moe_blocks} reaches into the window-attention stages; max {depths[2] + depths[3]}"
            )
        self.modality_names = tuple(m.name for m in modalities)
        self.patch_sizes = dict(patch_sizes)
        self.dims = tuple(dims)
        self.grid_gsd = grid_gsd
        self.num_prompts = num_prompts
        self.grad_checkpointing = False
        self.context_radius: int | None = None  # None: global attention in stages 3-4 (as pre-trained)

        self.tokenizers = nn.ModuleDict(
            {m.name: PatchEmbed(m.num_bands, dims[0], patch_sizes[m.name]) for m in modalities}
        )
        total = sum(depths)
        drop_rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # python: works on meta
        moe_ffn = partial(MoEFeedForward, num_experts=num_experts, top_k=top_k, aux_loss_weight=moe_aux_weight)

        def ffn_for(block_idx: int) -> Callable[..., nn.Module]:
            return moe_ffn if block_idx >= total - moe_blocks else Mlp

        stages: list[nn.ModuleList] = []
        i = 0
        for s, (dim, depth) in enumerate(zip(dims, depths)):
            heads = dim // head_dim
            blocks: list[nn.Module] = []
            for j in range(depth):
                if s < 2:
                    shift = 0 if j % 2 == 0 else window_size // 2
                    blocks.append(
                        SwinV2Block(dim, heads, window_size=window_size, shift_size=shift, mlp_ratio=mlp_ratio,
                                    drop_path=drop_rates[i], mlp_layer=Mlp)
                    )  # fmt: skip
                else:
                    blocks.append(Block(dim, heads, mlp_ratio, drop_path=drop_rates[i], ffn_layer=ffn_for(i)))
                i += 1
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.transitions = nn.ModuleList(AdaptiveTransition(dims[s], dims[s + 1]) for s in range(3))
        # Prompt tokens for stages 3 and 4: (num_modalities, num_prompts, C) each.
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(self.modality_names), num_prompts, dims[s])) for s in (2, 3)]
        )
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

    def set_context_radius(self, radius: int | None) -> None:
        """Limit stages 3-4 to neighbourhood attention of ``radius`` grid cells (None: global, the default).

        Local context makes every output a function of its neighbourhood only, so tiled region inference stitches
        without seams (see :mod:`pipeline.model.layers.local_attention`). The radius counts stage-3/4 tokens.
        """
        if radius is not None and radius < 1:
            raise ValueError(f"context radius must be >= 1 token, got {radius}")
        self.context_radius = radius

    def merges_for(self, modality: str, gsd: float) -> tuple[bool, ...]:
        """APM schedule for one input (see :func:`merge_schedule`)."""
        return merge_schedule(gsd, self.patch_sizes[modality], self.grid_gsd)

    def _run(self, block: nn.Module, *args: Tensor | LocalGrid | None) -> Tensor:
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
        for s, blocks in enumerate(self.stages):
            if s > 0:
                x = self.transitions[s - 1](x, merges[s - 1])
            if s < 2:
                for blk in blocks:
                    x = self._run(blk, x)  # (N, H, W, C)
            else:
                N, H, W, C = x.shape
                prompts = self.prompts[s - 2][m].to(x.dtype).expand(N, -1, -1)  # (N, P, C)
                t = torch.cat([prompts, x.reshape(N, H * W, C)], dim=1)  # (N, P + H*W, C)
                r = self.context_radius
                local = None if r is None else LocalGrid(H, W, self.num_prompts, r)
                for blk in blocks:
                    t = self._run(blk, t, None, local)
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
