"""PNG quicklooks of mosaics: PCA-RGB embeddings, palette class maps, colour-ramped similarity maps.

Everything is decimated to at most ``max_size`` pixels on the long side *before* computing (strided selection of
the lazy mosaic), and the PCA of embeddings is fitted on a random sample of valid pixels, so quicklooks of mosaics
larger than memory cost one pass over the data. No data is transparent (alpha 0).
"""

from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import rioxarray
import xarray as xr
from PIL import Image

from pipeline.mosaic.stitch import CLASS_KINDS, CLASS_NODATA, MOSAIC_VAR, open_mosaic

# Fixed class palette: 20 distinct colours (tab20 order), then golden-ratio hues for classes 20..254.
_TAB20 = [
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
    "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5",
]  # fmt: skip
# Viridis, sampled at 9 evenly spaced points; linear interpolation in between.
_VIRIDIS = ["440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725"]


def _hex(colours: list[str]) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in colours], dtype=np.float64)


def _palette() -> np.ndarray:
    """``(256, 3)`` uint8 class colours; index 255 (no data) is black (and transparent in PNGs)."""
    hues = (np.arange(20, 256) * 0.618033988749895) % 1.0
    sat, val = 0.65, 0.9
    k = (np.array([5, 3, 1])[None] + hues[:, None] * 6) % 6  # HSV -> RGB, vectorised
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    out = np.vstack([_hex(_TAB20), rgb * 255])
    out[CLASS_NODATA] = 0
    return np.round(out).astype(np.uint8)


PALETTE = _palette()
RAMP = np.stack([np.interp(np.linspace(0, 8, 256), np.arange(9), c) for c in _hex(_VIRIDIS).T], 1).astype(np.uint8)


def _rgba(rgb_HW3: np.ndarray, mask_HW: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 with alpha 255 where ``mask`` and black, transparent elsewhere."""
    out = np.zeros((*mask_HW.shape, 4), dtype=np.uint8)
    out[..., :3] = np.where(mask_HW[..., None], rgb_HW3, 0)
    out[..., 3] = np.where(mask_HW, 255, 0)
    return out


def _stretch(values: np.ndarray, mask: np.ndarray, lo_pct: float = 2, hi_pct: float = 98) -> np.ndarray:
    """Percentile stretch of ``values`` (any shape, last axes matching ``mask``) to ``[0, 1]``."""
    if not mask.any():
        return np.zeros_like(values, dtype=np.float64)
    lo, hi = np.percentile(values[..., mask], [lo_pct, hi_pct], axis=-1)
    lo, hi = np.asarray(lo)[..., None, None], np.asarray(hi)[..., None, None]
    return np.clip((values - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)


def colour_classes(classes_HW: np.ndarray, nodata: int = CLASS_NODATA) -> np.ndarray:
    """``(H, W, 4)`` RGBA of a uint8 class map with the fixed :data:`PALETTE`; ``nodata`` is transparent."""
    classes = np.asarray(classes_HW).astype(np.uint8)
    return _rgba(PALETTE[classes], classes != nodata)


def colour_ramp(values_HW: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``(H, W, 4)`` RGBA of a scalar field on the viridis ramp (default range: 2-98 % percentiles); NaN clear."""
    values = np.asarray(values_HW, dtype=np.float64)
    mask = np.isfinite(values)
    if vmin is None or vmax is None:
        unit = _stretch(np.where(mask, values, 0.0), mask)
    else:
        unit = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return _rgba(RAMP[np.round(np.nan_to_num(unit) * 255).astype(np.uint8)], mask)


def pca_rgb(data: xr.DataArray, valid: xr.DataArray | None = None, n_sample: int = 20000, seed: int = 0) -> np.ndarray:
    """``(H, W, 4)`` RGBA of the first three principal components of a ``(band, y, x)`` (lazy) array.

    The PCA is fitted on at most ``n_sample`` random valid pixels; the projection is computed block-wise, so
    only the 3-band result is ever materialised. Each component gets a 2-98 % percentile stretch. ``valid``
    (``(y, x)``, default: all bands finite) marks the pixels to show.
    """
    from sklearn.decomposition import PCA

    valid_da = data.notnull().all("band") if valid is None else valid > 0
    valid = np.asarray(valid_da.values)  # (H, W)
    iy, ix = np.nonzero(valid)
    if len(iy) == 0:
        return np.zeros((*valid.shape, 4), dtype=np.uint8)
    pick = np.random.default_rng(seed).choice(len(iy), size=min(n_sample, len(iy)), replace=False)
    sample = data.isel(y=xr.DataArray(iy[pick], dims="s"), x=xr.DataArray(ix[pick], dims="s"))
    sample = np.asarray(sample.transpose("s", "band").values, dtype=np.float64)  # (n, C)
    n_comp = min(3, *sample.shape)
    pca = PCA(n_components=n_comp).fit(sample)
    comps = xr.DataArray(pca.components_.astype(np.float32), dims=("pc", "band"))
    mean = xr.DataArray(pca.mean_.astype(np.float32), dims="band")
    proj = xr.dot(data.fillna(0) - mean, comps, dim="band").transpose("pc", "y", "x").values  # (k, H, W)
    proj = np.concatenate([proj, np.zeros((3 - n_comp, *valid.shape), proj.dtype)])
    rgb = _stretch(proj, valid)
    return _rgba(np.round(np.moveaxis(rgb, 0, -1) * 255).astype(np.uint8), valid)


def decimate(obj: xr.DataArray | xr.Dataset, max_size: int = 1024) -> xr.DataArray | xr.Dataset:
    """Strided (nearest) selection so that the long side is at most ``max_size`` pixels; stays lazy."""
    step = max(1, math.ceil(max(obj.sizes["y"], obj.sizes["x"]) / max_size))
    return obj.isel(y=slice(None, None, step), x=slice(None, None, step))


def save_png(rgba_HW4: np.ndarray, png_path: str) -> str:
    """Write an RGBA array as PNG to a local path or fsspec URL."""
    buf = io.BytesIO()
    Image.fromarray(rgba_HW4, mode="RGBA").save(buf, format="PNG", optimize=True)
    fs, path = fsspec.core.url_to_fs(png_path)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return png_path


def _open(url: str) -> xr.Dataset:
    if url.lower().endswith((".tif", ".tiff")):  # e.g. a similarity map COG
        arr = rioxarray.open_rasterio(url, chunks={"band": 1, "y": 512, "x": 512}, masked=True)
        return xr.Dataset({MOSAIC_VAR: arr}, attrs={"kind": "similarity" if arr.sizes["band"] == 1 else ""})
    return open_mosaic(url)


def quicklook(mosaic_url: str, png_path: str, kind: str | None = None, *, max_size: int = 1024) -> str:
    """Render a mosaic (or a single-band GeoTIFF) as a PNG of at most ``max_size`` pixels on the long side.

    Args:
        mosaic_url: a ``mosaic.zarr`` (or archive mosaic) or a GeoTIFF.
        png_path: output path or fsspec URL.
        kind: ``embeddings`` (PCA RGB), ``segmentation`` / ``change`` (palette class map) or ``similarity``
            (viridis ramp); default: the mosaic's ``kind`` attribute.

    Returns:
        ``png_path``.
    """
    ds = decimate(_open(mosaic_url), max_size)
    kind = kind or ds.attrs.get("kind")
    var = MOSAIC_VAR if MOSAIC_VAR in ds else "embedding"
    if kind in CLASS_KINDS:
        if "classes" in ds:
            classes = ds["classes"].values
        else:
            v = ds[var].values
            classes = np.where(np.isnan(v).all(0), CLASS_NODATA, np.argmax(np.nan_to_num(v, nan=-np.inf), 0))
        rgba = colour_classes(classes)
    elif kind == "similarity":
        arr = ds[var]
        rgba = colour_ramp((arr.isel(band=0) if "band" in arr.dims else arr).values)
    elif kind == "embeddings":
        data = ds[var]
        if "scale" in ds:  # an int8 archive mosaic
            from pipeline.mosaic.archive import dequantize

            data = dequantize(ds)
        rgba = pca_rgb(data, ds.get("valid"))
    else:
        raise ValueError(f"unknown quicklook kind {kind!r} for {mosaic_url}")
    return save_png(rgba, png_path)
