"""Change from embeddings: per-pixel cosine distance between two mosaics of one model, and its hotspots.

``A`` and ``B`` are two archives (or one archive twice, with two of its mosaics) whose provenance matches (same
checkpoint and preprocessing: distances between two models' embeddings mean nothing, so they are refused). B is read
on A's grid: directly when both share the CRS and pixel size and B's pixels align with A's (the usual case: two jobs
over one cube or one region), else reprojected onto A's grid (nearest neighbour, a warning says so). Distance is
``1 - cos(a, b)`` in ``[0, 2]``, NaN where either has no data.

Hotspots are the pixels whose distance exceeds a threshold, the given one or Otsu's (the threshold that best splits
the distance histogram into two classes; computed from a histogram of every valid pixel, so any size works),
polygonised with :func:`pipeline.mosaic.vectors.polygonize` (4-connected regions; ``min_area_m2`` drops specks).

Outputs in ``out``::

    distance.tif         COG, float32 cosine distance (NaN no data), tags: threshold, method, both sources
    hotspots.parquet     GeoParquet polygons (grid CRS): area_m2, mean_distance, max_distance, threshold, provenance
    quicklook.png        the distance on a colour ramp (0 .. max(2 x threshold, 98th percentile)) with hotspots outlined
    change.json          sources, threshold and how it was chosen, hotspot count and area, changed share
"""

from __future__ import annotations

import json
import logging
from typing import Any

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine

from pipeline import storage
from pipeline.mosaic.archive import check_provenance, open_archive

log = logging.getLogger(__name__)

_BINS = 1024


def _embeddings(url: str, mosaic: str | None, default: str) -> tuple[xr.DataArray, dict[str, Any], str]:
    archive = open_archive(url)
    names = archive.names
    name = mosaic or (names[0] if default == "first" else names[-1])
    if name not in names:
        raise KeyError(f"{url} has no mosaic {name!r} (has {names})")
    return archive.embeddings(name), archive.provenance, name


def _aligned(a: xr.DataArray, b: xr.DataArray) -> bool:
    ta, tb = a.rio.transform(), b.rio.transform()
    if a.rio.crs != b.rio.crs or not (np.isclose(ta.a, tb.a) and np.isclose(ta.e, tb.e)):
        return False
    col, row = ~ta * (tb.c, tb.f)
    return abs(col - round(col)) < 1e-3 and abs(row - round(row)) < 1e-3


def b_on_a_grid(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """B's embeddings on A's grid (NaN where B has none): a lazy window when aligned, else a reprojection."""
    if a.sizes["band"] != b.sizes["band"]:
        raise ValueError(f"A has {a.sizes['band']} channels, B {b.sizes['band']}: not embeddings of one model")
    if _aligned(a, b):
        ta, tb = a.rio.transform(), b.rio.transform()
        col, row = (round(v) for v in ~tb * (ta.c, ta.f))  # A's origin in B's pixels
        h, w = a.sizes["y"], a.sizes["x"]
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + h, b.sizes["y"]), min(col + w, b.sizes["x"])
        if r1 <= r0 or c1 <= c0:
            raise ValueError("the two mosaics do not overlap")
        window = b.isel(y=slice(r0, r1), x=slice(c0, c1)).data
        pad = ((0, 0), (r0 - row, row + h - r1), (c0 - col, col + w - c1))
        data = da.pad(window, pad, mode="constant", constant_values=np.nan) if any(sum(p) for p in pad) else window
        data = data.rechunk(a.data.chunks)
        return a.copy(data=data)
    log.warning("the two mosaics are on different grids: B is reprojected onto A's grid (nearest neighbour)")
    from rasterio.enums import Resampling

    out = b.rio.reproject_match(a, resampling=Resampling.nearest)
    out = out.assign_coords(x=a["x"], y=a["y"])
    if not np.isfinite(out.values).any():
        raise ValueError("the two mosaics do not overlap")
    return out.chunk(dict(zip(a.dims, a.data.chunksize)))


def cosine_distance(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Lazy ``(y, x)`` float32 ``1 - cos(a, b)`` of two ``(band, y, x)`` arrays on one grid (NaN: either missing)."""
    dot = (a * b).sum("band", skipna=False)
    na = np.sqrt((a * a).sum("band", skipna=False))
    nb = np.sqrt((b * b).sum("band", skipna=False))
    dist = (1 - dot / (na * nb).where((na > 0) & (nb > 0))).astype(np.float32)
    dist.attrs = {"long_name": "cosine_distance"}
    return dist


def otsu_threshold(values: da.Array | np.ndarray, bins: int = _BINS) -> float:
    """Otsu's threshold of the finite values (histogram over ``[min, max]``, ``bins`` bins)."""
    arr = da.asarray(values)
    finite = arr[da.isfinite(arr)]
    lo, hi = (float(v) for v in da.compute(finite.min(), finite.max()))
    if not hi > lo:
        return hi
    hist, edges = da.histogram(finite, bins=bins, range=(lo, hi))
    hist = np.asarray(hist.compute(), dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))])


def embedding_change(
    a_url: str, b_url: str, out_dir: str, *, a_mosaic: str | None = None, b_mosaic: str | None = None,
    threshold: float | None = None, min_area_m2: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """``skypipe archive change``: distance COG, hotspot polygons and a quicklook of two mosaics (module docstring).

    With ``a_url == b_url`` and no mosaic names, A is the archive's first mosaic and B its last.

    Raises:
        ProvenanceError: the two come from different checkpoints or preprocessing.
        ValueError: they do not overlap, or are one and the same mosaic.
    """
    from pipeline.mosaic.areas import pixel_area_m2
    from pipeline.mosaic.cog import dataarray_to_cog
    from pipeline.mosaic.quicklook import colour_ramp, decimate, save_png
    from pipeline.mosaic.tables import provenance_columns, write_geoparquet
    from pipeline.mosaic.vectors import polygonize

    emb_a, prov_a, name_a = _embeddings(a_url, a_mosaic, "first")
    emb_b, prov_b, name_b = _embeddings(b_url, b_mosaic, "first" if b_url != a_url else "last")
    check_provenance(prov_a, prov_b, what=f"B ({b_url})", against=f"A ({a_url})")
    if a_url == b_url and name_a == name_b:
        raise ValueError(f"A and B are the same mosaic {name_a!r} of {a_url}: name two with --a-mosaic/--b-mosaic")
    dist = cosine_distance(emb_a, b_on_a_grid(emb_a, emb_b))
    dist = dist.rio.write_crs(emb_a.rio.crs).rio.write_transform(emb_a.rio.transform())
    dist_np = dist.values  # one pass; the map is (y, x) float32
    if not np.isfinite(dist_np).any():
        raise ValueError("A and B have no pixel with data in common")
    method = "given" if threshold is not None else "otsu"
    threshold = float(threshold) if threshold is not None else otsu_threshold(dist_np)
    sources = {"a": {"archive": a_url, "mosaic": name_a}, "b": {"archive": b_url, "mosaic": name_b}}
    tags = {"threshold": str(threshold), "method": method, "sources": json.dumps(sources),
            "provenance": json.dumps(prov_a, default=str)}  # fmt: skip
    out = {"distance": dataarray_to_cog(dist, storage.join(out_dir, "distance.tif"), descriptions=["cosine_distance"],
                                        tags=tags)}  # fmt: skip
    transform = Affine(*tuple(emb_a.rio.transform())[:6])
    changed = np.where(np.isfinite(dist_np), np.where(dist_np > threshold, 1, 255), 255).astype(np.uint8)
    changed[changed == 1] = 0  # class 0 = change; everything else is no data for the polygoniser
    _, geoms, pixels = polygonize(changed, transform)
    area = pixels * pixel_area_m2(emb_a.rio.crs, transform)
    keep = area >= min_area_m2
    geoms, area = geoms[keep], area[keep]
    stats = _zonal(dist_np, geoms, transform)
    frame = pd.DataFrame({"area_m2": area, "mean_distance": stats[:, 0], "max_distance": stats[:, 1],
                          "threshold": threshold, **provenance_columns(prov_a, kind="embedding-change")})  # fmt: skip
    table = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geoms, crs=emb_a.rio.crs, index=frame.index))
    out["hotspots"] = write_geoparquet(table, storage.join(out_dir, "hotspots.parquet"))
    out["quicklook"] = _quicklook(dist, threshold, changed, storage.join(out_dir, "quicklook.png"), colour_ramp,
                                  decimate, save_png)  # fmt: skip
    valid = np.isfinite(dist_np)
    summary = {
        "sources": sources, "threshold": threshold, "method": method, "hotspots": len(table),
        "hotspot_area_m2": float(area.sum()), "changed_share": float((dist_np[valid] > threshold).mean()),
        "distance": {"median": float(np.median(dist_np[valid])), "p98": float(np.percentile(dist_np[valid], 98)),
                     "max": float(dist_np[valid].max())},
        "provenance": prov_a,
    }  # fmt: skip
    storage.write_json(storage.join(out_dir, "change.json"), summary, indent=1)
    out["summary"] = storage.join(out_dir, "change.json")
    return {**summary, "outputs": out}


def _zonal(dist: np.ndarray, geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """``(n, 2)`` mean and max distance inside each polygon."""
    from rasterio.features import rasterize

    if not len(geoms):
        return np.zeros((0, 2))
    labels = rasterize(((g, i + 1) for i, g in enumerate(geoms)), out_shape=dist.shape, transform=transform,
                       fill=0, dtype="int32")  # fmt: skip
    ok = labels > 0
    lab, val = labels[ok] - 1, dist[ok]
    n = len(geoms)
    count = np.bincount(lab, minlength=n)
    mean = np.bincount(lab, weights=val, minlength=n) / np.maximum(count, 1)
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, lab, val)
    return np.stack([mean, mx], axis=1)


def _quicklook(dist, threshold, changed, png, colour_ramp, decimate, save_png) -> str:
    small = np.asarray(decimate(dist, 1024).values)
    step = max(1, -(-max(dist.shape) // 1024))
    vmax = max(2 * threshold, float(np.nanpercentile(small, 98)) if np.isfinite(small).any() else 1.0)
    rgba = colour_ramp(small, 0.0, vmax)
    hot = changed[::step, ::step] == 0
    edge = hot & ~(np.roll(hot, 1, 0) & np.roll(hot, -1, 0) & np.roll(hot, 1, 1) & np.roll(hot, -1, 1))
    rgba[edge] = (255, 0, 0, 255)  # hotspot outlines in red
    return save_png(rgba, png)
