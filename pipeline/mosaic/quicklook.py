"""PNG quicklooks of mosaics: PCA-RGB embeddings, palette class maps with a legend, colour-ramped scalar maps.

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

from pipeline.mosaic.stitch import MOSAIC_VAR, open_mosaic
from pipeline.palette import CLASS_NODATA, PALETTE, hex_to_rgb, palette_for

# Viridis, sampled at 9 evenly spaced points; linear interpolation in between.
_VIRIDIS = ["440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725"]
RAMP = np.stack([np.interp(np.linspace(0, 8, 256), np.arange(9), c) for c in hex_to_rgb(_VIRIDIS).T], 1).astype(
    np.uint8
)

__all__ = ["PALETTE", "RAMP", "colour_classes", "colour_ramp", "pca_rgb", "quicklook", "save_png", "with_legend"]


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


def colour_classes(classes_HW: np.ndarray, nodata: int = CLASS_NODATA, colors: list[str] | None = None) -> np.ndarray:
    """``(H, W, 4)`` RGBA of a uint8 class map (``colors``, else the fixed :data:`PALETTE`); ``nodata`` clear."""
    classes = np.asarray(classes_HW).astype(np.uint8)
    return _rgba(palette_for(colors)[classes], classes != nodata)


def with_legend(rgba_HW4: np.ndarray, names: list[str], colors: list[str] | None = None) -> np.ndarray:
    """The picture with a legend (a colour swatch and the name of every class) on white below it.

    The picture keeps its transparency (no data stays clear); the legend band is opaque.
    """
    from PIL import ImageDraw, ImageFont

    palette = palette_for(colors)
    font = ImageFont.load_default()
    row, pad = 16, 6
    height, width = rgba_HW4.shape[:2]
    text_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in names) + row + 3 * pad
    cols = max(1, min(len(names), max(width, text_w) // text_w))
    rows = -(-len(names) // cols)
    canvas = Image.new("RGBA", (max(width, cols * text_w), height + rows * row + 2 * pad), (0, 0, 0, 0))
    canvas.paste(Image.fromarray(rgba_HW4, mode="RGBA"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, height, canvas.width, canvas.height], fill=(255, 255, 255, 255))
    for i, name in enumerate(names):
        x, y = pad + (i % cols) * text_w, height + pad + (i // cols) * row
        draw.rectangle([x, y + 2, x + row - 4, y + row - 2], fill=tuple(int(v) for v in palette[i]), outline="black")
        draw.text((x + row, y + 2), name, fill="black", font=font)
    return np.asarray(canvas)


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
        return xr.Dataset({MOSAIC_VAR: arr})
    return open_mosaic(url)


STYLES = ("classes", "pca", "ramp")
"""How a quicklook shows values: a class palette with a legend, PCA colours of many channels, a colour ramp."""


def quicklook(mosaic_url: str, png_path: str, style: str | None = None, *, max_size: int = 1024) -> str:
    """Render a mosaic (or a single-band GeoTIFF) as a PNG of at most ``max_size`` pixels on the long side.

    Args:
        mosaic_url: a ``mosaic.zarr`` (or archive mosaic) or a GeoTIFF.
        png_path: output path or fsspec URL.
        style: one of :data:`STYLES`; default from the mosaic's ``product`` attribute: ``classes`` for class
            products (palette + legend), else ``pca`` for several channels and ``ramp`` for one.

    Returns:
        ``png_path``.
    """
    ds = decimate(_open(mosaic_url), max_size)
    var = MOSAIC_VAR if MOSAIC_VAR in ds else "embedding"
    if style is None:
        single = ds.sizes.get("band", 1) == 1
        style = "classes" if ds.attrs.get("product") == "classes" else ("ramp" if single else "pca")
    if style == "classes":
        if "classes" in ds:
            classes = ds["classes"].values
        else:
            v = ds[var].values
            classes = np.where(np.isnan(v).all(0), CLASS_NODATA, np.argmax(np.nan_to_num(v, nan=-np.inf), 0))
        colors = ds.attrs.get("class_colors")
        rgba = colour_classes(classes, colors=colors)
        names = ds.attrs.get("class_names")
        if names:
            rgba = with_legend(rgba, list(names), colors)
    elif style == "ramp":
        arr = ds[var]
        rgba = colour_ramp((arr.isel(band=0) if "band" in arr.dims else arr).values)
    elif style == "pca":
        data = ds[var]
        if "scale" in ds:  # an int8 archive mosaic
            from pipeline.mosaic.quantize import dequantize

            data = dequantize(ds)
        rgba = pca_rgb(data, ds.get("valid"))
    else:
        raise ValueError(f"unknown quicklook style {style!r}; choose one of {list(STYLES)}")
    return save_png(rgba, png_path)
