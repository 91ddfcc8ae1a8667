"""Building blocks of the SkySense V2 backbone: window, global and local attention, feed-forward layers, MoE."""

from .attention import Attention, Block, LocalAttention
from .local_attention import LocalGrid, TokenGrid
from .mlp import DropPath, Mlp, drop_path
from .moe import MoEFeedForward, grouped_mm, moe_loop_reference
from .window_attention import (
    SwinV2Block,
    WindowAttention,
    reference_window_attention,
    window_attention_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LocalAttention",
    "LocalGrid",
    "Mlp",
    "MoEFeedForward",
    "SwinV2Block",
    "TokenGrid",
    "WindowAttention",
    "drop_path",
    "grouped_mm",
    "moe_loop_reference",
    "reference_window_attention",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
