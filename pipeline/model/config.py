"""Typed model configuration and the named SkySense V2 configurations.

``skysense_v2_huge`` is the paper configuration (see ``shared/reference/skysense_v2.md`` section 2): dims
352/704/1408/2816, depths 2/2/18/2, head dim 32, MLP ratio 4, window 8, MoE with 8 experts (top-1) in the
last 6 blocks. ``tiny``/``small``/``base`` follow the same pattern at smaller widths [ours].
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pipeline.modalities import DEFAULT_MODALITIES, GRID_GSD, ModalitySpec

_DEFAULTS = tuple(DEFAULT_MODALITIES.values())


@dataclass(frozen=True)
class SkySenseConfig:
    """Everything needed to rebuild a SkySense V2 model (stored inside checkpoints).

    Attributes:
        name: configuration name, e.g. ``skysense_v2_base``.
        dims: channel width of each of the 4 stages.
        depths: number of blocks per stage; stages 1-2 use shifted-window attention, 3-4 global attention.
        head_dim: attention head width (heads = dim // head_dim).
        mlp_ratio: hidden width of the feed-forward layers relative to the stage width.
        window_size: Swin-V2 window size of stages 1-2.
        moe_blocks: the last ``moe_blocks`` blocks of the network use a mixture-of-experts feed-forward.
        num_experts: experts per MoE layer.
        top_k: experts per token.
        moe_aux_weight: weight of the Switch load-balancing loss of every MoE layer.
        num_prompts: learnable prompt tokens per modality prepended in stages 3 and 4.
        patch_sizes: tokenizer patch size per modality (pixels).
        grid_gsd: footprint in metres of one token of the shared stage-3/4 grid.
        modalities: input modalities (band order, units, normalisation), in fusion order.
        fusion_dim, fusion_depth, fusion_heads: the temporal/multi-modal fusion transformer.
        drop_path_rate: stochastic depth, linearly increasing over the backbone blocks.

    """

    name: str = "custom"
    dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    head_dim: int = 32
    mlp_ratio: float = 4.0
    window_size: int = 8
    moe_blocks: int = 6
    num_experts: int = 8
    top_k: int = 1
    moe_aux_weight: float = 0.01
    num_prompts: int = 4
    patch_sizes: dict[str, int] = field(default_factory=lambda: {m.name: m.patch_size for m in _DEFAULTS})
    grid_gsd: float = GRID_GSD
    modalities: tuple[ModalitySpec, ...] = tuple(DEFAULT_MODALITIES.values())
    fusion_dim: int = 384
    fusion_depth: int = 2
    fusion_heads: int = 6
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.dims) != 4 or len(self.depths) != 4:
            raise ValueError(f"{self.name}: dims and depths need 4 stages, got {self.dims} / {self.depths}")
        for d in self.dims:
            if d % self.head_dim:
                raise ValueError(f"{self.name}: stage width {d} is not a multiple of head_dim {self.head_dim}")
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(f"{self.name}: fusion_dim {self.fusion_dim} not divisible by {self.fusion_heads} heads")
        if not 0 <= self.moe_blocks <= sum(self.depths):
            raise ValueError(f"{self.name}: moe_blocks={self.moe_blocks} outside 0..{sum(self.depths)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{self.name}: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        missing = [m.name for m in self.modalities if m.name not in self.patch_sizes]
        if missing:
            raise ValueError(f"{self.name}: no patch size for modalities {missing}")

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Modality keys in fusion order."""
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str) -> ModalitySpec:
        """The spec of modality ``name`` with a clear error for unknown names."""
        for m in self.modalities:
            if m.name == name:
                return m
        raise ValueError(f"model {self.name!r} has no modality {name!r}; it knows {list(self.modality_names)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML/checkpoint safe)."""
        d = asdict(self)
        d["dims"] = list(self.dims)
        d["depths"] = list(self.depths)
        d["modalities"] = [m.to_dict() for m in self.modalities]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkySenseConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer checkpoint format)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (checkpoint from a newer skypipe?)")
        d = dict(d)
        d["dims"] = tuple(d["dims"])
        d["depths"] = tuple(d["depths"])
        d["modalities"] = tuple(ModalitySpec.from_dict(m) for m in d["modalities"])
        return cls(**d)


MODEL_CONFIGS: dict[str, SkySenseConfig] = {
    # CPU tests and the embedded demo.
    "skysense_v2_tiny": SkySenseConfig(
        name="skysense_v2_tiny", dims=(32, 64, 128, 256), depths=(2, 2, 2, 2), moe_blocks=2,
        fusion_dim=128, fusion_depth=1, fusion_heads=4,
    ),
    "skysense_v2_small": SkySenseConfig(
        name="skysense_v2_small", dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), moe_blocks=4,
        fusion_dim=384, fusion_depth=2, fusion_heads=6,
    ),
    "skysense_v2_base": SkySenseConfig(
        name="skysense_v2_base", dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), moe_blocks=6,
        fusion_dim=512, fusion_depth=4, fusion_heads=8,
    ),
    # The paper configuration. [ours] fusion: 27 blocks at width 1024 (~343 M) to match the ~347 M fusion
    # module reported for V2; its exact shape is not public.
    "skysense_v2_huge": SkySenseConfig(
        name="skysense_v2_huge", dims=(352, 704, 1408, 2816), depths=(2, 2, 18, 2), moe_blocks=6,
        fusion_dim=1024, fusion_depth=27, fusion_heads=16,
    ),
}  # fmt: skip


def unknown_model_message(name: str) -> str:
    """One line naming the closest configuration name, if any, and all of them (for every place that takes a name)."""
    close = difflib.get_close_matches(name, MODEL_CONFIGS, n=1) or [c for c in MODEL_CONFIGS if c.endswith(f"_{name}")]
    hint = f"; did you mean {close[0]!r}? Available: " if close else "; available: "
    return f"unknown model {name!r}{hint}{', '.join(sorted(MODEL_CONFIGS))}"


def get_config(name: str, **overrides: Any) -> SkySenseConfig:
    """A named configuration with keyword overrides (e.g. ``depths=(1, 1, 1, 1)`` for tests)."""
    try:
        base = MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(unknown_model_message(name)) from None
    for key in ("dims", "depths"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(base, **overrides)
