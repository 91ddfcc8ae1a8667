"""Tiny tile stores written through the inference stage's own store API, cut from a real Sentinel-2 chip.

The chip is EPSG:32633. The "model" is a fixed per-pixel linear map of the real S2 band values, so the untiled
output is known exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rasterio
from shared_data import require, shared_path

from pipeline.infer.store import TileManifest, open_or_create_store, tiles_url, write_tile
from pipeline.kinds import get_kind

S2_CHIP = shared_path("eolearn_slovenia/reference_scenes/S2L1C_20150711.tif")

PROVENANCE = {
    "model": "skysense-v2-tiny",
    "code_version": "0.1.0",
    "checkpoint": "tiny.pt",
    "checkpoint_sha256": "a" * 64,
    "preprocessing": {"s2": {"bands": ["B02", "B03", "B04", "B08"], "mean": [0.1] * 4, "std": [0.05] * 4,
                             "units": "reflectance"}},
    "cube": "cube.zarr",
    "time": ["2015-07-01", "2015-07-31"],
}  # fmt: skip


def load_s2_chip() -> tuple[np.ndarray, str, tuple[float, ...]]:
    """``(13, 101, 100)`` float32 reflectances, the CRS WKT and the 6 GDAL-affine coefficients of the chip."""
    require("eolearn_slovenia/reference_scenes/S2L1C_20150711.tif")
    with rasterio.open(S2_CHIP) as src:
        return src.read().astype(np.float32), src.crs.to_wkt(), tuple(src.transform)[:6]


def linear_model(bands_CHW: np.ndarray, n_out: int, seed: int = 0) -> np.ndarray:
    """A per-pixel "model": ``(n_out, H, W)`` = a fixed random linear map of the band values plus a bias."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_out, bands_CHW.shape[0])).astype(np.float32)
    bias = rng.normal(size=(n_out, 1, 1)).astype(np.float32)
    return (np.einsum("oc,chw->ohw", weights, bands_CHW) + bias).astype(np.float32)


def tile_origins(height: int, width: int, tile_size: int, overlap: int) -> np.ndarray:
    """``(N, 2)`` (row, col) origins at stride ``tile_size - overlap``, the last row/column shifted inward."""

    def starts(n: int) -> list[int]:
        if n <= tile_size:
            return [0]
        out = list(range(0, n - tile_size, tile_size - overlap))
        return [*out, n - tile_size]

    return np.array([(r, c) for r in starts(height) for c in starts(width)], dtype=np.int64)


def write_tile_store(
    job_url: str,
    image_CHW: np.ndarray,
    crs: str,
    transform: tuple[float, ...],
    tile_size: int,
    overlap: int,
    *,
    kind: str = "embeddings",
    channels: list[str] | None = None,
    statuses: dict[int, str] | None = None,
    offsets: np.ndarray | None = None,
    valid_HW: np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
    origins: np.ndarray | None = None,
    margin: int = 0,
) -> str:
    """Cut ``image_CHW`` (the untiled model output) into tiles and write ``{job_url}/tiles.zarr`` + manifest.

    Args:
        statuses: ``{tile index: status}``; unlisted tiles are ``done``. Non-done tiles get no data written.
        offsets: ``(N,)`` value added to every pixel of tile ``i`` (simulates per-tile inconsistencies).
        valid_HW: validity of the untiled output (default: all valid).
        origins: tile origins (default :func:`tile_origins`).
        margin: zero-weight band at inner tile edges, stored for the stitcher.

    Returns:
        the tile store URL.
    """
    n_ch, height, width = image_CHW.shape
    origins = tile_origins(height, width, tile_size, overlap) if origins is None else origins
    valid_HW = np.ones((height, width), dtype=np.uint8) if valid_HW is None else valid_HW
    channels = channels or [f"c{i:03d}" for i in range(n_ch)]
    statuses = statuses or {}
    output_kind = get_kind(kind)
    names = output_kind.class_names(n_ch, None if channels[0] == "c000" else channels)
    attrs = {
        "grid": {"crs": crs, "transform": list(transform), "height": height, "width": width},
        **output_kind.store_attrs(names),
        "channels": channels, "tile_size": tile_size, "overlap": overlap, "margin": margin, "context_radius": None,
        "n_tiles": len(origins), "provenance": provenance or PROVENANCE,
    }  # fmt: skip
    url = tiles_url(job_url)
    group = open_or_create_store(url, attrs, np.asarray(origins, dtype=np.int64))
    manifest = TileManifest(job_url)
    s = tile_size
    for i, (r, c) in enumerate(origins.tolist()):
        status = statuses.get(i, "done")
        if status == "done":
            tile = np.full((n_ch, s, s), np.nan, dtype=np.float32)  # the grid may be smaller than a tile
            mask = np.zeros((s, s), dtype=np.uint8)
            h, w = min(s, height - r), min(s, width - c)
            tile[:, :h, :w] = image_CHW[:, r : r + h, c : c + w] + (0 if offsets is None else offsets[i])
            mask[:h, :w] = valid_HW[r : r + h, c : c + w]
            pooled = np.nanmean(np.where(mask > 0, tile, np.nan).reshape(n_ch, -1), axis=1)
            write_tile(group, i, tile, mask, pooled)
        manifest.write({"tile_id": i, "index": i, "origin": [r, c], "status": status})
    return url
