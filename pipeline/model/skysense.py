"""SkySense V2: the shared backbone plus temporal/multi-modal fusion, behind one feature API.

Every head and every job consumes the model only through :meth:`SkySenseV2.forward_features` or
:meth:`SkySenseV2.forward_intermediates`.

Shapes (B batch, T dates of a modality, Hg x Wg the shared 10 m grid of the tile):

- input ``ModalityInput.x``: (B, T, C_in, H, W) normalised (see ``ModalitySpec.normalize``); (B, C_in, H, W)
  is accepted as T = 1. NaN/inf pixels are zero-filled; mark them invalid in ``valid``.
- ``forward_intermediates(...)[m]``: list of 4 maps (B, T, C_s, H_s, W_s) for stages s = 1..4, where
  C_s = ``dims[s]`` and H_s = H / patch / 2**(merges before stage s).
- ``forward_features(...)[m]``: the stage-4 map (B, T, C4, Hg, Wg).
- ``["fused"]``: (B, D_fusion, Hg, Wg); ``["valid"]``: (B, Hg, Wg) bool, True where any token was valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.modalities import BandMismatchError

from .backbone import SkySenseV2Backbone
from .config import SkySenseConfig
from .fusion import TemporalFusion


@dataclass
class ModalityInput:
    """One modality's batch.

    Attributes:
        x: normalised images (B, T, C, H, W) or (B, C, H, W).
        doy: day of year (B, T), 1..366; 0 or None = unknown.
        valid: validity (B, T, H, W) per pixel or (B, T) per date; None = all valid. A grid token counts as
            valid when at least half of its pixels are.
        gsd: ground sampling distance in metres; None = the modality's nominal GSD.
        bands: band names of ``x`` if known; checked against the model's band order.

    """

    x: Tensor
    doy: Tensor | None = None
    valid: Tensor | None = None
    gsd: float | None = None
    bands: Sequence[str] | None = None


class SkySenseV2(nn.Module):
    """The unified multi-modal foundation model (backbone + fusion).

    Args:
        config: the architecture and the modalities.
        context_radius: None: global attention in backbone stages 3-4 (as pre-trained); else local attention of
            this many grid cells, so tiled inference stitches without seams (same weights either way).
    """

    def __init__(self, config: SkySenseConfig, context_radius: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = SkySenseV2Backbone(
            modalities=config.modalities,
            patch_sizes=config.patch_sizes,
            dims=config.dims,
            depths=config.depths,
            head_dim=config.head_dim,
            mlp_ratio=config.mlp_ratio,
            window_size=config.window_size,
            moe_blocks=config.moe_blocks,
            num_experts=config.num_experts,
            top_k=config.top_k,
            moe_aux_weight=config.moe_aux_weight,
            num_prompts=config.num_prompts,
            grid_gsd=config.grid_gsd,
            drop_path_rate=config.drop_path_rate,
            context_radius=context_radius,
        )
        self.fusion = TemporalFusion(
            in_dim=config.dims[-1],
            dim=config.fusion_dim,
            depth=config.fusion_depth,
            num_heads=config.fusion_heads,
            modality_names=config.modality_names,
            mlp_ratio=config.mlp_ratio,
        )

    @property
    def feature_dims(self) -> dict[str, int]:
        """Channel widths of the feature API outputs: ``stage1..stage4`` and ``fused``."""
        d = {f"stage{i + 1}": c for i, c in enumerate(self.config.dims)}
        d["fused"] = self.config.fusion_dim
        return d

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the backbone blocks."""
        self.backbone.set_grad_checkpointing(enable)

    def _prepare(self, name: str, inp: ModalityInput | Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """Validate one modality's input; returns x (B, T, C, H, W), doy (B, T), valid, gsd."""
        spec = self.config.modality(name)
        if isinstance(inp, Tensor):
            inp = ModalityInput(inp)
        x = inp.x if inp.x.ndim == 5 else inp.x.unsqueeze(1)
        if x.ndim != 5:
            raise ValueError(f"modality {name!r}: expected (B, T, C, H, W) or (B, C, H, W), got {tuple(inp.x.shape)}")
        if inp.bands is not None and tuple(inp.bands) != spec.bands:
            raise BandMismatchError(name, spec.bands, got=list(inp.bands))
        if x.shape[2] != spec.num_bands:
            raise BandMismatchError(name, spec.bands, got=x.shape[2])
        B, T = x.shape[:2]
        doy = inp.doy if inp.doy is not None else torch.zeros(B, T, dtype=torch.long, device=x.device)
        valid = inp.valid
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if valid.shape[:2] != (B, T):
            raise ValueError(f"modality {name!r}: valid has shape {tuple(valid.shape)}, expected ({B}, {T}, ...)")
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return x, doy.long(), valid.bool(), inp.gsd if inp.gsd is not None else spec.gsd

    @staticmethod
    def _grid_valid(valid: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, T) or (B, T, H, W) validity -> (B, T, Hg, Wg): a token is valid if >= half its pixels are."""
        B, T = valid.shape[:2]
        if valid.ndim == 2:
            return valid[:, :, None, None].expand(B, T, *grid)
        frac = F.adaptive_avg_pool2d(valid.flatten(0, 1).float()[:, None], grid)  # (B*T, 1, Hg, Wg)
        return (frac[:, 0] >= 0.5).reshape(B, T, *grid)

    def forward_intermediates(
        self, inputs: Mapping[str, ModalityInput | Tensor], fuse: bool = True
    ) -> dict[str, list[Tensor] | Tensor]:
        """Multi-scale maps of every modality present, plus the fused map.

        Returns:
            ``{modality: [stage1..stage4 maps (B, T, C_s, H_s, W_s)], "fused": (B, D, Hg, Wg),
            "valid": (B, Hg, Wg)}``; ``fused``/``valid`` only when ``fuse``.

        """
        if not inputs:
            raise ValueError(f"no input modality given; the model takes any of {list(self.config.modality_names)}")
        self.backbone.reset_moe_stats()
        out: dict[str, list[Tensor] | Tensor] = {}
        doys: dict[str, Tensor] = {}
        valids: dict[str, Tensor] = {}
        grid: tuple[int, int] | None = None
        for name in self.config.modality_names:
            if name not in inputs:
                continue
            x, doy, valid, gsd = self._prepare(name, inputs[name])
            B, T = x.shape[:2]
            maps = self.backbone(x.flatten(0, 1), name, gsd)
            out[name] = [m.reshape(B, T, *m.shape[1:]) for m in maps]
            this_grid = tuple(maps[-1].shape[-2:])
            if grid is not None and this_grid != grid:
                raise ValueError(
                    f"modalities cover different ground extents: {name!r} gives a {this_grid} token grid, "
                    f"earlier modalities {grid}; every modality of a sample must cover the same tile"
                )
            grid = this_grid  # type: ignore[assignment]
            doys[name] = doy
            valids[name] = self._grid_valid(valid, this_grid)
        unknown = set(inputs) - set(out)
        if unknown:
            raise ValueError(
                f"unknown modalities {sorted(unknown)}; the model takes {list(self.config.modality_names)}"
            )
        if fuse:
            out["fused"] = self.fusion({m: out[m][-1] for m in valids}, doys, valids)  # type: ignore[index]
            out["valid"] = torch.stack([v.any(1) for v in valids.values()], 0).any(0)
        return out

    def forward_features(self, inputs: Mapping[str, ModalityInput | Tensor]) -> dict[str, Tensor]:
        """Stage-4 map per modality (B, T, C4, Hg, Wg), ``fused`` (B, D, Hg, Wg) and ``valid`` (B, Hg, Wg)."""
        inter = self.forward_intermediates(inputs)
        return {k: (v[-1] if isinstance(v, list) else v) for k, v in inter.items()}

    def forward(self, inputs: Mapping[str, ModalityInput | Tensor]) -> Tensor:
        """The fused embedding map (B, D, Hg, Wg)."""
        return self.forward_features(inputs)["fused"]

    def moe_aux_loss(self) -> Tensor:
        """Load-balancing loss of the last forward."""
        return self.backbone.moe_aux_loss()


def create_model(name: str = "skysense_v2_tiny", context_radius: int | None = None, **overrides: object) -> SkySenseV2:
    """Build a named configuration, e.g. ``create_model("skysense_v2_base", drop_path_rate=0.1)``.

    Args:
        name: a key of ``MODEL_CONFIGS``.
        context_radius: stage-3/4 attention context (see :class:`SkySenseV2`); not part of the config.
        **overrides: ``SkySenseConfig`` fields.
    """
    from .config import get_config

    return SkySenseV2(get_config(name, **overrides), context_radius=context_radius)
