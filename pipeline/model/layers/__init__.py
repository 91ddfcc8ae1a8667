"""Building blocks of the SkySense V2 backbone: window attention, feed-forward layers, mixture of experts."""

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
    "DropPath",
    "Mlp",
    "MoEFeedForward",
    "SwinV2Block",
    "WindowAttention",
    "drop_path",
    "grouped_mm",
    "moe_loop_reference",
    "reference_window_attention",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]
