"""Large rasters of known ground sampling distance as training sources: scale-varied random-resized crops.

A *scene* is one raster (an 8-bit RGB scene such as a DOTA image, an 11-bit WorldView pan/MS pair, a uint16 grey
image, or a GeoTIFF of a modality's bands such as an S1 chip) with its native GSD. A sample is a square crop
resampled to ``size`` px at the target ``gsd``, i.e. a crop of ``size * gsd / native_gsd`` source pixels, times a
random zoom factor drawn log-uniformly from ``zoom``: ``(1, 1)`` keeps the declared GSD exact; a wider range
shows the content up to that factor larger or smaller than the declared GSD says, as users' images of unknown or
approximate GSD are [ours]. A scene too small for the crop gives its whole shorter side (the content is then
larger than declared).

Conversion of HR rasters that are not 8-bit RGB to the HR modality's units (8-bit DN 0-255, bands R, G, B)
[ours]:

* ``worldview``: ``ms<i>.tif`` (4 bands B, G, R, NIR, 11-bit DN, ~1 m) + ``pan<i>.tif`` (11-bit DN, 0.5 m) ->
  Brovey pan-sharpening at the pan GSD (``RGB_up * pan / mean(RGB_up)``, with the MS bands R, G, B bilinearly
  upsampled to the pan grid), then the 8-bit stretch below.
* ``grey``: one band (uint16 Atlanta image, pan) -> the 8-bit stretch, replicated to R, G, B.
* 8-bit stretch (:func:`stretch_to_dn`): per band, the 2nd-98th percentile of the valid pixels maps linearly to
  0-255, clipped. 11-bit DN carry no display scaling, and the 8-bit RGB of the other sources (Google Earth
  RSSCN7 / DOTA / LEVIR) is display-stretched imagery; a per-image percentile stretch is how the SpaceNet / solaris
  tutorials make 8-bit RGB of these products.

Samples are normalised with the model's :class:`~pipeline.modalities.ModalitySpec` like every other source
(:func:`~pipeline.train.sources.modality_entry`). A sample's GCPL region is the cell of its crop centre when the
scene is georeferenced, else the source's ``region``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.modalities import GRID_GSD, ModalitySpec, get_modality
from pipeline.ssl.regions import DEFAULT_NUM_REGIONS, resolve_region

from .sources import (
    Region,
    Sample,
    crop_resize,
    list_images,
    modality_entry,
    random_flip,
    read_bands,
    read_georef,
    read_rgb,
    region_tensor,
)

FORMATS = ("rgb", "worldview", "grey", "bands")


def stretch_to_dn(x: np.ndarray, valid: np.ndarray | None = None, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """(C, H, W) values -> uint8 DN: per band, the ``low``-``high`` percentiles of valid pixels map to 0-255."""
    v = np.ones(x.shape[-2:], dtype=bool) if valid is None else valid
    out = np.zeros(x.shape, dtype=np.uint8)
    for i, band in enumerate(x.astype(np.float64)):
        vals = band[v]
        if vals.size == 0:
            continue
        lo, hi = np.percentile(vals, [low, high])
        scaled = (band - lo) / max(hi - lo, 1e-9) * 255.0
        out[i] = np.where(v, np.clip(np.round(scaled), 0, 255), 0).astype(np.uint8)
    return out


def brovey(rgb: np.ndarray, pan: np.ndarray) -> np.ndarray:
    """Brovey pan-sharpening: (3, H, W) RGB on the pan grid times ``pan / mean(RGB)`` (same units in and out)."""
    intensity = rgb.mean(0)
    return rgb * (pan / np.maximum(intensity, 1e-6))[None]


def _read_tif(path: Path) -> tuple[np.ndarray, float | None, float | None]:
    """(C, H, W) float64, the pixel size in the CRS units (None without a CRS) and the nodata value."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            res = float(abs(src.transform.a)) if src.crs is not None else None
            return src.read().astype(np.float64), res, src.nodata


def dota_gsd(image: Path) -> float | None:
    """GSD from a DOTA label file's ``gsd:`` header (``<root>/labelTxt/<stem>.txt`` beside ``<root>/images/``)."""
    label = image.parent.parent / "labelTxt" / f"{image.stem}.txt"
    if not label.is_file():
        return None
    for line in label.read_text().splitlines()[:4]:
        if line.startswith("gsd:"):
            try:
                return float(line.split(":", 1)[1])
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class Scene:
    """One raster: where it is, how it is read, its native GSD and its size."""

    path: Path
    format: str
    gsd: float
    shape: tuple[int, int]
    pan: Path | None = None  # the pan file of a worldview pair


@lru_cache(maxsize=64)
def load_scene(scene: Scene, spec: ModalitySpec) -> np.ndarray:
    """(C, H, W) float32 in ``spec``'s units (read and converted once per process)."""
    if scene.format == "rgb":
        return read_rgb(scene.path).astype(np.float32)
    if scene.format == "bands":
        return read_bands(scene.path, spec)
    if scene.format == "grey":
        band, _, nodata = _read_tif(scene.path)
        valid = np.isfinite(band[0]) & (band[0] != nodata if nodata is not None else True)
        return np.repeat(stretch_to_dn(band[:1], valid), 3, axis=0).astype(np.float32)
    if scene.format == "worldview":
        ms, _, _ = _read_tif(scene.path)
        pan, _, _ = _read_tif(scene.pan)  # type: ignore[arg-type]
        rgb = torch.from_numpy(ms[[2, 1, 0]])[None]  # B, G, R, NIR -> R, G, B
        up = F.interpolate(rgb, size=pan.shape[-2:], mode="bilinear", align_corners=False)[0].numpy()
        return stretch_to_dn(brovey(up, pan[0])).astype(np.float32)
    raise ValueError(f"unknown scene format {scene.format!r}; known: {FORMATS}")


def find_scenes(root: str | Path, format: str, native_gsd: float | None = None, glob: str | None = None) -> list[Scene]:
    """The scenes under ``root``: every image (or ``glob`` match), worldview ``ms<i>``/``pan<i>`` pairs as one.

    The native GSD is ``native_gsd`` when given, else a DOTA label header's, else the GeoTIFF's pixel size.

    Raises:
        FileNotFoundError: nothing found.
        ValueError: a scene whose GSD is unknown.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown scene format {format!r}; known: {FORMATS}")
    root = Path(root)
    files = sorted(p for p in root.rglob(glob) if p.is_file()) if glob else list_images(root)
    if format == "worldview":
        files = [p for p in files if p.name.startswith("ms") and (p.parent / f"pan{p.name[2:]}").exists()]
    if not files:
        raise FileNotFoundError(f"no {format} scenes under {root}" + (f" matching {glob!r}" if glob else ""))
    scenes = []
    for p in files:
        pan = p.parent / f"pan{p.name[2:]}" if format == "worldview" else None
        size_from = pan or p
        shape, res = _shape_and_res(size_from)
        gsd = native_gsd or dota_gsd(p) or res
        if not gsd:
            raise ValueError(f"{p}: the GSD is unknown (no CRS, no DOTA label header): give native_gsd")
        scenes.append(Scene(p, format, float(gsd), shape, pan))
    return scenes


def _shape_and_res(path: Path) -> tuple[tuple[int, int], float | None]:
    if path.suffix.lower() not in (".tif", ".tiff"):
        from PIL import Image

        with Image.open(path) as im:
            return (im.height, im.width), None
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return (src.height, src.width), (float(abs(src.transform.a)) if src.crs is not None else None)


class SceneSource:
    """Scale-varied crops of scenes at a target GSD (see the module docstring).

    Args:
        root: folder searched recursively.
        format: ``rgb``, ``worldview``, ``grey`` (HR conversions) or ``bands`` (a GeoTIFF of ``modality``'s bands).
        size: output side in pixels; ``size * gsd`` must be a whole number of 10 m grid cells.
        gsd: declared output GSD (default: the modality's).
        zoom: range of the random zoom factor on the crop side (log-uniform; ``(1, 1)``: exact GSD).
        native_gsd: GSD of every scene (default: from a DOTA label header or the GeoTIFF transform).
        glob: file pattern (default: every image file).
        modality: the model modality the samples feed (``hr`` for the HR formats).
        region: location of scenes without georeference (see :data:`~pipeline.train.sources.Region`).
        num_regions: GCPL regions of the job.

    """

    def __init__(self, root: str | Path, format: str = "rgb", size: int = 128, gsd: float | None = None,
                 zoom: tuple[float, float] = (1.0, 1.0), native_gsd: float | None = None, glob: str | None = None,
                 modality: str = "hr", region: Region = None,
                 num_regions: int = DEFAULT_NUM_REGIONS) -> None:  # fmt: skip
        self.spec = get_modality(modality)
        if format != "bands" and self.spec.bands != ("R", "G", "B"):
            raise ValueError(f"scene format {format!r} makes R, G, B images; modality {modality!r} needs bands")
        self.size, self.gsd = size, float(gsd or self.spec.gsd)
        cells = size * self.gsd / GRID_GSD
        if abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
            raise ValueError(f"{size} px at {self.gsd:g} m is not a whole number of {GRID_GSD:g} m grid cells")
        if not 0 < zoom[0] <= zoom[1]:
            raise ValueError(f"zoom must be (low, high) with 0 < low <= high, got {zoom}")
        self.zoom = (float(zoom[0]), float(zoom[1]))
        self.scenes = find_scenes(root, format, native_gsd, glob)
        self.modalities = (self.spec.name,)
        self.region, self.num_regions = resolve_region(region, num_regions), num_regions
        # A scene contributes as many indices as exact-GSD crops fit in it, so large scenes are drawn more often.
        counts = [max(1, (s.shape[0] * s.shape[1]) // max(1, round(self.side(s)) ** 2)) for s in self.scenes]
        self.starts = np.cumsum([0, *counts])

    def side(self, scene: Scene, zoom: float = 1.0) -> float:
        """Crop side in source pixels for ``zoom`` (before clamping to the scene)."""
        return self.size * self.gsd / scene.gsd * zoom

    def __len__(self) -> int:
        return int(self.starts[-1])

    def scene_of(self, index: int) -> Scene:
        """The scene behind sample ``index``."""
        return self.scenes[int(np.searchsorted(self.starts, index, side="right")) - 1]

    def get(self, index: int, rng: np.random.Generator | None = None) -> Sample:
        """A random crop (zoom, position, flips from ``rng``); without ``rng`` the centre crop at zoom 1."""
        scene = self.scene_of(index)
        x = torch.from_numpy(load_scene(scene, self.spec))[None]  # (1, C, H, W)
        H, W = x.shape[-2:]
        lo, hi = self.zoom
        z = math.exp(rng.uniform(math.log(lo), math.log(hi))) if rng is not None else min(max(1.0, lo), hi)
        side = max(1, min(round(self.side(scene, z)), H, W))
        if rng is not None:
            top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        else:
            top, left = (H - side) // 2, (W - side) // 2
        out = crop_resize(x, (top, left, side, side), self.size)
        if rng is not None:
            out = random_flip(out, rng)
        if self.spec.bands == ("R", "G", "B"):
            out = out.clamp(0, 255)  # bilinear overshoot of 8-bit data
        georef = read_georef(scene.pan or scene.path)
        region = self.region if georef is None else georef.region(top + side / 2, left + side / 2, self.num_regions)
        return {self.spec.name: modality_entry(out, self.spec, self.gsd), "region": region_tensor(region)}


__all__: Sequence[str] = ["FORMATS", "Scene", "SceneSource", "brovey", "find_scenes", "load_scene", "stretch_to_dn"]
