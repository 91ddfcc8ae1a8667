"""The int8 codec of archive mosaics: per-channel affine quantization (error bound: :mod:`pipeline.mosaic.archive`)."""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr

QNODATA = -128
"""The int8 code of "no data"."""


def quantize(emb: xr.DataArray) -> xr.Dataset:
    """Per-channel int8 quantization of a lazy ``(band, y, x)`` float array (one extra pass for min / max).

    Returns:
        ``embedding`` (band, y, x) int8 with -128 where NaN, and ``scale`` / ``zero_point`` (band,) float64.
    """
    lo, hi = dask.compute(emb.min(dim=("y", "x"), skipna=True), emb.max(dim=("y", "x"), skipna=True))
    lo, hi = np.nan_to_num(lo.values.astype(np.float64)), np.nan_to_num(hi.values.astype(np.float64))
    scale = np.where(hi > lo, (hi - lo) / 254.0, 1.0)
    zero_point = -127.0 - lo / scale  # x = scale * (q - zero_point)
    s = xr.DataArray(scale, dims="band")
    z = xr.DataArray(zero_point, dims="band")
    q = (emb / s + z).round().clip(-127, 127).fillna(QNODATA).astype(np.int8)
    q.attrs = {"long_name": "int8 embedding", "nodata": QNODATA, "dequantize": "scale * (q - zero_point)"}
    return xr.Dataset({"embedding": q, "scale": s, "zero_point": z})  # float64: (band,) only


def dequantize(ds: xr.Dataset) -> xr.DataArray:
    """Float32 ``(band, y, x)`` embeddings of an archive mosaic (lazy), NaN where there is no data."""
    emb = ds["embedding"]
    if emb.dtype != np.int8:
        return emb.astype(np.float32)
    scale = ds["scale"].astype(np.float64)
    offset = (-scale * ds["zero_point"]).astype(np.float32)  # x = q * scale + offset, in float32 per block
    out = (emb.astype(np.float32) * scale.astype(np.float32) + offset).where(emb != QNODATA)
    return out.astype(np.float32).transpose("band", "y", "x")
