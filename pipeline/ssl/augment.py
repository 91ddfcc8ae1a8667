"""On-device multi-view augmentation of batched, geo-aligned multi-modal samples.

The loader ships raw samples; every view is made here on the accelerator from the batch of a step:

* **Crops in grid units.** Every modality of a sample is cropped over the SAME ground window: a square of
  ``n`` cells of the shared 10 m grid, i.e. ``n * r`` pixels of a modality with ``r = grid_gsd / gsd``
  (16 for 0.625 m HR, 1 for S2/S1). [ours] Crops keep their native resolution (no resize): the model is
  GSD-aware (its merge schedule and prompts depend on it), spectra are not interpolated, and view cells map to
  source cells one to one, so dense losses match locations exactly. Scale variety comes from the crop side:
  one side per group and step (so views batch together), drawn from an area-fraction range, global views
  larger than local ones; each sample gets its own offset.
* **Dihedral transforms.** One of the 8 rotations/flips per sample and view, the same for all its modalities.
  Crop + rotation + flip is one ``gather`` with per-sample index maps.
* **Photometric.** Colour jitter (brightness, contrast, per-band gain, per date) for optical modalities;
  speckle for SAR: intensity times ``Gamma(L, 1/L)`` is an additive ``10 log10`` of it in dB (``L`` looks;
  [ours] drawn as a sum of ``L`` exponentials so a ``torch.Generator`` controls it).
* **Local views** are placed independently of the global ones (DINO); a pair of views may not overlap, and
  dense losses then skip it (:meth:`CropGeometry.overlap_box`, :meth:`CropGeometry.to_canvas`).
* **Date subsets** of time series and **modality dropout**, both by clearing ``valid``; a sample keeps at
  least one valid date of every modality not dropped and at least one modality with data.

:class:`CropGeometry` records where every view cell comes from, so losses can pair the cells of two views that
cover the same ground (:meth:`CropGeometry.to_canvas`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.modalities import ModalitySpec
from pipeline.model import ModalityInput


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) on ``device``, drawn from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _randint(high: Tensor, generator: torch.Generator | None) -> Tensor:
    """Integers uniform in [0, high) elementwise (``high`` >= 1, long)."""
    return (_rand(high.shape, generator, high.device) * high).long().clamp_max(high - 1)


def dihedral_table(n: int, device: torch.device | None = None) -> Tensor:
    """(8, n, n) long: entry [t, i, j] is the flat index in an n x n crop shown at (i, j) after transform t.

    Transform ``t``: ``torch.rot90(crop, t % 4, dims=(-2, -1))``, then ``flip(dims=(-1,))`` when ``t >= 4``.
    """
    base = torch.arange(n * n, device=device).view(n, n)
    rots = [torch.rot90(base, k, dims=(0, 1)) for k in range(4)]
    return torch.stack(rots + [r.flip(1) for r in rots])


def apply_dihedral(x: Tensor, transform: Tensor) -> Tensor:
    """Apply per-sample transform codes (B,) to a (B, ..., n, n) tensor (reference for tests)."""
    out = [torch.rot90(v, int(t) % 4, dims=(-2, -1)) for v, t in zip(x, transform)]
    return torch.stack([v.flip(-1) if int(t) >= 4 else v for v, t in zip(out, transform)])


@dataclass
class CropGeometry:
    """Where the cells of a batch of views come from in their source tiles (grid units).

    Attributes:
        box: (B, 2) long, top-left source cell (row, col) of each sample's square crop.
        size: crop side ``n`` in grid cells (the same for the batch).
        transform: (B,) long dihedral code (see :func:`dihedral_table`).
        source_size: (Hg, Wg) grid size of the source tiles.

    """

    box: Tensor
    size: int
    transform: Tensor
    source_size: tuple[int, int]

    def index_map(self, ratio: int = 1) -> Tensor:
        """(B, n*r, n*r) flat index into a source raster of ``ratio`` pixels per grid cell of every view pixel."""
        m = self.size * ratio
        local = dihedral_table(m, self.box.device)[self.transform]  # (B, m, m) flat index within the crop
        row = self.box[:, 0, None, None] * ratio + local // m
        col = self.box[:, 1, None, None] * ratio + local % m
        return row * (self.source_size[1] * ratio) + col

    def source_coords(self) -> Tensor:
        """(B, n, n, 2) long: source grid (row, col) of each view cell."""
        idx = self.index_map(1)
        return torch.stack([idx // self.source_size[1], idx % self.source_size[1]], dim=-1)

    def to_canvas(self, feat: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Put view features back where they lie on the source grid (differentiable).

        Args:
            feat: (B, C, n, n) features of the view cells.
            valid: (B, n, n) bool, cells to keep (None = all).

        Returns:
            canvas (B, C, Hg, Wg), zero outside the crop; mask (B, Hg, Wg) bool, True where a valid view cell lies.

        """
        B, C = feat.shape[:2]
        Hg, Wg = self.source_size
        idx = self.index_map(1).flatten(1)  # (B, n*n)
        canvas = feat.new_zeros(B, C, Hg * Wg).scatter(2, idx[:, None].expand(B, C, -1), feat.flatten(2))
        v = torch.ones(B, self.size**2, dtype=torch.bool, device=feat.device) if valid is None else valid.flatten(1)
        mask = torch.zeros(B, Hg * Wg, dtype=torch.bool, device=feat.device).scatter(1, idx, v)
        return canvas.view(B, C, Hg, Wg), mask.view(B, Hg, Wg)

    def overlap_box(self, other: CropGeometry) -> Tensor:
        """The source-grid box both views cover: (B, 4) long ``(row0, col0, row1, col1)``, end-exclusive.

        Empty where ``row1 <= row0`` or ``col1 <= col0``.
        """
        lo = torch.maximum(self.box, other.box)
        hi = torch.minimum(self.box + self.size, other.box + other.size)
        return torch.cat([lo, hi], dim=1)

    def crop(self, x: Tensor, ratio: int) -> Tensor:
        """Crop + transform a (B, T, C, Hg*r, Wg*r) raster (or (B, T, H, W) mask) of ``ratio`` px per cell."""
        B = x.shape[0]
        m = self.size * ratio
        idx = self.index_map(ratio).view(B, 1, m * m)
        flat = x.flatten(-2).flatten(1, -2)  # (B, T*C, H*W)
        out = flat.gather(2, idx.expand(B, flat.shape[1], -1))
        return out.view(*x.shape[:-2], m, m)

    @staticmethod
    def cat(parts: Sequence[CropGeometry]) -> CropGeometry:
        """Concatenate geometries of views of equal size along the batch."""
        if len({p.size for p in parts}) != 1:
            raise ValueError("only views of the same size can be batched together")
        return CropGeometry(
            torch.cat([p.box for p in parts]), parts[0].size, torch.cat([p.transform for p in parts]),
            parts[0].source_size,
        )  # fmt: skip

    def select(self, start: int, stop: int) -> CropGeometry:
        """Samples ``start:stop`` of the batch (e.g. one view of a view-major group)."""
        return CropGeometry(self.box[start:stop], self.size, self.transform[start:stop], self.source_size)


@dataclass
class ViewGroup:
    """``num_views`` views of a batch of B samples, concatenated view-major (row ``v * B + b``)."""

    inputs: dict[str, ModalityInput]
    geometry: CropGeometry
    num_views: int

    @property
    def batch_size(self) -> int:
        """B, samples per view."""
        return self.geometry.box.shape[0] // self.num_views

    def view_geometry(self, v: int) -> CropGeometry:
        """Geometry of view ``v``."""
        B = self.batch_size
        return self.geometry.select(v * B, (v + 1) * B)


class MultiViewAugment:
    """Global and local views of a multi-modal batch, made on the batch's device.

    Args:
        modalities: specs of the modalities that may appear (nominal GSD, SAR std for speckle in dB).
        grid_gsd: metres per cell of the shared grid.
        num_global, num_local: views per group (local may be 0).
        global_scale, local_scale: crop area as a fraction of the tile, (min, max).
        min_size: smallest crop side in grid cells.
        optical, sar: names of the modalities that get colour jitter / speckle (default: by each spec's
            ``family``).
        color_jitter: (brightness, contrast, band gain) amplitudes in normalised units; ``p_color`` per sample.
        speckle_looks: ``L`` of the multiplicative Gamma speckle; ``p_speckle`` per sample.
        date_drop: probability of masking each date of a time series.
        modality_drop: probability of masking a whole modality of a sample.

    """

    def __init__(
        self,
        modalities: Sequence[ModalitySpec],
        *,
        grid_gsd: float = 10.0,
        num_global: int = 2,
        num_local: int = 4,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.1, 0.35),
        min_size: int = 2,
        optical: Sequence[str] | None = None,
        sar: Sequence[str] | None = None,
        color_jitter: tuple[float, float, float] = (0.2, 0.2, 0.1),
        p_color: float = 0.8,
        speckle_looks: int = 4,
        p_speckle: float = 0.5,
        date_drop: float = 0.3,
        modality_drop: float = 0.15,
    ) -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need >= 1 global and >= 0 local views, got {num_global} / {num_local}")
        self.specs = {m.name: m for m in modalities}
        self.grid_gsd = grid_gsd
        self.num_global, self.num_local = num_global, num_local
        self.global_scale, self.local_scale, self.min_size = global_scale, local_scale, min_size
        by_family = {f: tuple(n for n, m in self.specs.items() if m.family == f) for f in ("optical", "sar")}
        self.optical = tuple(optical) if optical is not None else by_family["optical"]
        self.sar = tuple(sar) if sar is not None else by_family["sar"]
        self.color_jitter, self.p_color = color_jitter, p_color
        self.speckle_looks, self.p_speckle = speckle_looks, p_speckle
        self.date_drop, self.modality_drop = date_drop, modality_drop

    def ratio(self, name: str, inp: ModalityInput) -> int:
        """Pixels of modality ``name`` per grid cell."""
        gsd = inp.gsd if inp.gsd is not None else self.specs[name].gsd
        r = self.grid_gsd / gsd
        if abs(r - round(r)) > 1e-6 or r < 1:
            raise ValueError(f"modality {name!r}: grid gsd {self.grid_gsd} is not an integer multiple of gsd {gsd}")
        return round(r)

    def source_grid(self, batch: Mapping[str, ModalityInput]) -> tuple[int, int]:
        """(Hg, Wg) of the batch; every modality must cover the same ground."""
        grids = {}
        for name, inp in batch.items():
            r, (H, W) = self.ratio(name, inp), inp.x.shape[-2:]
            if H % r or W % r:
                raise ValueError(f"modality {name!r}: {H}x{W} px is not a whole number of {r}-px grid cells")
            grids[name] = (H // r, W // r)
        if len(set(grids.values())) != 1:
            raise ValueError(f"modalities cover different ground extents (grid cells): {grids}")
        return next(iter(grids.values()))

    def random_size(self, grid: tuple[int, int], scale: tuple[float, float], g: torch.Generator | None) -> int:
        """A crop side in grid cells whose area is a random fraction in ``scale`` of the tile."""
        s = scale[0] + (scale[1] - scale[0]) * float(_rand((), g, torch.device("cpu") if g is None else g.device))
        return int(min(max(round(math.sqrt(s * grid[0] * grid[1])), self.min_size), min(grid)))

    @staticmethod
    def random_geometry(
        B: int, grid: tuple[int, int], n: int, g: torch.Generator | None, device: torch.device
    ) -> CropGeometry:
        """Square crops of side ``n`` at per-sample random offsets with per-sample random dihedral transforms."""
        high = torch.tensor([grid[0] - n + 1, grid[1] - n + 1], device=device).expand(B, 2)
        return CropGeometry(_randint(high, g), n, _randint(torch.full((B,), 8, device=device), g), grid)

    def view(
        self, batch: Mapping[str, ModalityInput], geom: CropGeometry, g: torch.Generator | None
    ) -> dict[str, ModalityInput]:
        """One augmented view of every sample over ``geom``."""
        out: dict[str, ModalityInput] = {}
        for name, inp in batch.items():
            x = inp.x if inp.x.ndim == 5 else inp.x.unsqueeze(1)  # (B, T, C, H, W)
            B, T = x.shape[:2]
            r = self.ratio(name, inp)
            x = torch.nan_to_num(geom.crop(x, r), nan=0.0, posinf=0.0, neginf=0.0)  # as the model: before jitter
            valid = inp.valid
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
            elif valid.ndim == 4:
                valid = geom.crop(valid, r)
            if name in self.optical:
                x = self._color(x, g)
            if name in self.sar:
                x = self._speckle(x, self.specs[name], g)
            if T > 1 and self.date_drop > 0:
                valid = self._drop_dates(valid, g)
            out[name] = ModalityInput(x, doy=inp.doy, valid=valid, gsd=inp.gsd, bands=inp.bands)
        return self._drop_modalities(out, g)

    def _color(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        """Brightness, contrast and per-band gain per (sample, date), in normalised units."""
        B, T, C = x.shape[:3]
        bright, contrast, gain = self.color_jitter
        u = _rand((B, T, C + 2), g, x.device) * 2 - 1  # U[-1, 1)
        on = (_rand((B, 1, 1), g, x.device) < self.p_color).to(x.dtype)
        b = (bright * u[..., 0] * on[..., 0])[..., None, None, None]
        c = (1 + contrast * u[..., 1] * on[..., 0])[..., None, None, None]
        k = (1 + gain * u[..., 2:] * on)[..., None, None]  # (B, T, C, 1, 1)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return ((x - mean) * c + mean) * k + b

    def _speckle(self, x: Tensor, spec: ModalitySpec, g: torch.Generator | None) -> Tensor:
        """Add ``10 log10(Gamma(L, 1/L))`` dB (divided by the band std: ``x`` is normalised dB)."""
        L = self.speckle_looks
        gamma = -torch.log1p(-_rand((L, *x.shape), g, x.device)).sum(0) / L  # Gamma(L, 1/L), mean 1
        on = (_rand((x.shape[0], 1, 1, 1, 1), g, x.device) < self.p_speckle).to(x.dtype)
        std = torch.as_tensor(spec.std, dtype=x.dtype, device=x.device)[:, None, None]
        return x + on * 10 * torch.log10(gamma.clamp_min(1e-6)) / std

    def _drop_dates(self, valid: Tensor, g: torch.Generator | None) -> Tensor:
        """Mask each date with probability ``date_drop``, keeping one valid date where there was one."""
        has = valid.flatten(2).any(-1) if valid.ndim == 4 else valid  # (B, T)
        u = _rand(has.shape, g, valid.device)
        keep = u >= self.date_drop
        lost = ~(has & keep).any(1) & has.any(1)
        rescue = torch.nn.functional.one_hot((u * has).argmax(1), has.shape[1]).bool() & lost[:, None]
        keep = keep | rescue
        return valid & (keep[..., None, None] if valid.ndim == 4 else keep)

    def _drop_modalities(self, views: dict[str, ModalityInput], g: torch.Generator | None) -> dict[str, ModalityInput]:
        """Clear ``valid`` of a modality with probability ``modality_drop``; never all modalities with data."""
        if self.modality_drop <= 0 or len(views) < 2:
            return views
        names = list(views)
        has = torch.stack([views[n].valid.flatten(1).any(1) for n in names], 1)  # (B, M)
        u = _rand(has.shape, g, has.device)
        drop = (u < self.modality_drop) & has
        lost = ~(has & ~drop).any(1) & has.any(1)
        rescue = torch.nn.functional.one_hot((u * has).argmax(1), len(names)).bool() & lost[:, None]
        drop = drop & ~rescue
        for i, n in enumerate(names):
            v = views[n].valid
            keep = ~drop[:, i].view(-1, *([1] * (v.ndim - 1)))
            views[n] = ModalityInput(views[n].x, views[n].doy, v & keep, views[n].gsd, views[n].bands)
        return views

    def __call__(
        self, batch: Mapping[str, ModalityInput], generator: torch.Generator | None = None
    ) -> tuple[ViewGroup, ViewGroup | None]:
        """Global and local view groups of ``batch`` (local is None when ``num_local == 0``)."""
        grid = self.source_grid(batch)
        first = next(iter(batch.values())).x
        B, device = first.shape[0], first.device
        groups: list[ViewGroup | None] = []
        for num, scale in ((self.num_global, self.global_scale), (self.num_local, self.local_scale)):
            if num == 0:
                groups.append(None)
                continue
            n = self.random_size(grid, scale, generator)
            geoms = [self.random_geometry(B, grid, n, generator, device) for _ in range(num)]
            views = [self.view(batch, gm, generator) for gm in geoms]
            groups.append(ViewGroup(concat_inputs(views), CropGeometry.cat(geoms), num))
        return groups[0], groups[1]  # type: ignore[return-value]


def concat_inputs(views: Sequence[Mapping[str, ModalityInput]]) -> dict[str, ModalityInput]:
    """Concatenate views with the same modalities along the batch (view-major)."""
    out = {}
    for name, first in views[0].items():
        parts = [v[name] for v in views]
        doy = None if first.doy is None else torch.cat([p.doy for p in parts])
        out[name] = ModalityInput(
            torch.cat([p.x for p in parts]), doy, torch.cat([p.valid for p in parts]), first.gsd, first.bands
        )
    return out
