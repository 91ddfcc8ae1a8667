"""What the viewer shows: the layers found in a job's output folder, an archive, or a classify / change / search output.

Discovery walks the target (three levels deep) and recognises outputs by their own contracts, never by guessing:

* an embedding archive (``archive.json``): searchable by clicking; each mosaic's embedding PCA as an RGB layer;
* a mosaic (``mosaic.zarr``) of embeddings: the embedding PCA; any mosaic whose provenance names a cube that exists:
  the cube's true colour (its modality's quicklook bands at the clearest date);
* GeoTIFFs: a single-band uint8 map with a colour table is a class map (legend from its ``class_names`` tag); a
  single-band float map (similarity, distance) gets a colour ramp over its 2-98 % range; three or four uint8 bands
  are shown as RGB; many-band embedding COGs are left out (their PCA is the picture);
* GeoParquet tables (``polygons.parquet``, ``hotspots.parquet``, ``hits.parquet``, ``tile_labels.parquet`` and any
  other table with a geometry column): vector layers, drawn from GeoJSON in WGS84.

Rasters the target has no COG for (PCA, cube true colour) are rendered once into a cache folder as small RGB COGs
(at most ``max_size`` pixels a side) so the tile server reads every raster layer the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import xarray as xr

log = logging.getLogger(__name__)

_MAX_DEPTH = 3
_SKIP_DIRS = {"tiles.zarr", "manifest", "mosaics", "patches", "index", "cube.zarr"}


@dataclass
class Layer:
    """One layer of the page: ``raster`` (tiles from a COG) or ``vector`` (GeoJSON)."""

    id: str
    title: str
    kind: str  # raster | vector
    path: str
    bounds: list[float]  # WGS84 [west, south, east, north]
    render: dict[str, Any] = field(default_factory=dict)  # tile query parameters (rescale, colormap_name, bidx)
    legend: list[dict[str, str]] = field(default_factory=list)  # [{"name", "color"}]
    visible: bool = True
    group: str = ""

    def public(self) -> dict[str, Any]:
        """What the page gets (no file paths)."""
        out = asdict(self)
        out.pop("path")
        return out


def _wgs84_bounds(crs: Any, bounds: tuple[float, float, float, float]) -> list[float]:
    from rasterio.warp import transform_bounds

    return [float(v) for v in transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)]


def _layer_id(path: str, suffix: str = "") -> str:
    return hashlib.sha1(f"{os.path.abspath(path)}#{suffix}".encode()).hexdigest()[:12]


def raster_layer(path: str, title: str, group: str = "") -> Layer | None:
    """A layer for a GeoTIFF, or ``None`` for rasters the viewer does not draw (many-band embeddings)."""
    with rasterio.open(path) as src:
        bounds = _wgs84_bounds(src.crs, tuple(src.bounds))
        tags = src.tags()
        lid = _layer_id(path)
        if src.count == 1 and src.dtypes[0] == "uint8":
            try:
                cmap = src.colormap(1)
            except ValueError:
                cmap = None
            if cmap:
                names = json.loads(tags.get("class_names", "[]"))
                legend = [{"name": n, "color": "#{:02x}{:02x}{:02x}".format(*cmap[i][:3])} for i, n in enumerate(names)]
                return Layer(lid, title, "raster", path, bounds, {}, legend, group=group)
        if src.count == 1:
            data = src.read(1, out_shape=(min(src.height, 512), min(src.width, 512)), masked=True)
            values = np.asarray(data.compressed(), dtype=np.float64)
            values = values[np.isfinite(values)]
            lo, hi = np.percentile(values, [2, 98]) if len(values) else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1e-6
            render = {"rescale": f"{lo:.6g},{hi:.6g}", "colormap_name": "viridis"}
            return Layer(lid, title, "raster", path, bounds, render, group=group)
        if src.count in (3, 4) and src.dtypes[0] == "uint8":
            return Layer(lid, title, "raster", path, bounds, {"bidx": [1, 2, 3]}, group=group)
    return None


def vector_layer(path: str, title: str, group: str = "") -> Layer | None:
    """A layer for a GeoParquet table with geometries (``None`` when it has none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if b"geo" not in meta:
        return None
    import geopandas as gpd

    frame = gpd.read_parquet(path, columns=["geometry"])
    if frame.empty or frame.crs is None:
        return None
    bounds = [float(v) for v in frame.to_crs("EPSG:4326").total_bounds]
    return Layer(_layer_id(path), title, "vector", path, bounds, group=group)


def rgb_cog(rgba_HW4: np.ndarray, crs: Any, bounds: tuple[float, float, float, float], out: str) -> str:
    """Write an RGBA picture of a grid's extent as a 3-band uint8 COG (nodata 0; valid pixels kept >= 1)."""
    from affine import Affine

    from pipeline.mosaic.cog import dataarray_to_cog

    h, w = rgba_HW4.shape[:2]
    left, bottom, right, top = bounds
    transform = Affine((right - left) / w, 0, left, 0, -(top - bottom) / h, top)
    rgb = np.where(rgba_HW4[..., 3:] > 0, np.maximum(rgba_HW4[..., :3], 1), 0).astype(np.uint8)
    arr = xr.DataArray(np.moveaxis(rgb, -1, 0), dims=("band", "y", "x"),
                       coords={"band": ["red", "green", "blue"], "y": top + transform.e * (np.arange(h) + 0.5),
                               "x": left + transform.a * (np.arange(w) + 0.5)})  # fmt: skip
    arr = arr.rio.write_crs(crs).rio.write_transform(transform)
    return dataarray_to_cog(arr, out, nodata=0, resampling="average", blocksize=256)


def pca_layer(ds: xr.Dataset, title: str, cache: str, key: str, max_size: int, group: str = "") -> Layer:
    """The embedding PCA of a mosaic (stitcher ``data`` or archive ``embedding``) as an RGB COG layer."""
    from pipeline.mosaic.quantize import dequantize
    from pipeline.mosaic.quicklook import decimate, pca_rgb

    small = decimate(ds, max_size).load()  # one read of the decimated pixels; the PCA then runs in memory
    data = dequantize(small) if "embedding" in small else small["data"]
    out = os.path.join(cache, f"pca-{_layer_id(key)}.tif")
    if not os.path.exists(out):
        rgb_cog(pca_rgb(data, small.get("valid")), ds.rio.crs, ds.rio.bounds(), out)
    layer = raster_layer(out, title, group)
    assert layer is not None
    layer.id = _layer_id(key, "pca")
    return layer


def cube_layer(cube_url: str, cache: str, max_size: int) -> Layer | None:
    """True colour (the modality's quicklook bands) of a cube at its clearest date, or ``None``."""
    from pipeline.cube.layout import cube_modalities, open_modality
    from pipeline.modalities import get_modality
    from pipeline.mosaic.quicklook import _stretch, decimate

    try:
        modalities = cube_modalities(cube_url)
    except (OSError, ValueError, KeyError):
        return None
    for name in ("hr", "s2", "s1"):
        if name not in modalities:
            continue
        spec = get_modality(name)
        ds = open_modality(cube_url, name)
        bands = [str(b) for b in ds["band"].values]
        picks = [b for b in (spec.quicklook or ()) if b in bands] or bands[:1]
        valid = ds["valid"].mean(("y", "x")).values
        t = int(np.argmax(valid))
        small = decimate(ds.isel(time=t), max_size)
        rgb = np.asarray(small["data"].sel(band=picks).values, dtype=np.float64)
        if len(picks) == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        ok = np.isfinite(rgb).all(0) & (small["valid"].values > 0)
        unit = _stretch(np.nan_to_num(rgb), ok)
        rgba = np.zeros((*ok.shape, 4), np.uint8)
        rgba[..., :3] = np.round(np.moveaxis(unit, 0, -1) * 255)
        rgba[..., 3] = np.where(ok, 255, 0)
        out = os.path.join(cache, f"cube-{_layer_id(cube_url, name)}.tif")
        if not os.path.exists(out):
            rgb_cog(rgba, ds.rio.crs, ds.rio.bounds(), out)
        layer = raster_layer(out, f"cube {name} ({', '.join(picks)})", "cube")
        if layer is not None:
            layer.id = _layer_id(cube_url, name)
        return layer
    return None


def _walk(root: Path) -> list[Path]:
    out = []

    def visit(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            out.append(entry)
            if entry.is_dir() and depth < _MAX_DEPTH and entry.suffix != ".zarr" and entry.name not in _SKIP_DIRS:
                visit(entry, depth + 1)

    visit(root, 0)
    return out


def discover(target: str, cache: str, *, max_size: int = 2048) -> tuple[list[Layer], list[str]]:
    """The layers of ``target`` (a folder) and the archives in it (searchable on click), in drawing order."""
    from pipeline.mosaic.stitch import open_mosaic

    root = Path(target)
    if not root.is_dir():
        raise FileNotFoundError(f"{target} is not a folder: give a job's output folder, an archive or a classify, "
                                "change or search output folder")  # fmt: skip
    entries = [root, *_walk(root)]
    layers: list[Layer] = []
    archives: list[str] = []
    cubes: set[str] = set()
    for entry in entries:
        rel = "." if entry == root else str(entry.relative_to(root))
        try:
            if entry.is_dir() and (entry / "archive.json").exists():
                from pipeline.mosaic.archive import archive_meta

                meta = archive_meta(str(entry))
                archives.append(str(entry))
                for name in meta["mosaics"]:
                    ds = open_mosaic(str(entry / "mosaics" / f"{name}.zarr"))
                    layers.append(pca_layer(ds, f"embedding PCA ({rel}, mosaic {name})", cache, f"{entry}#{name}",
                                            max_size, "embeddings"))  # fmt: skip
                    cube = (ds.attrs.get("provenance") or {}).get("cube")
                    if cube:
                        cubes.add(str(cube))
            elif entry.suffix == ".zarr" and entry.name == "mosaic.zarr" and (entry / "zarr.json").exists():
                ds = open_mosaic(str(entry))
                cube = (ds.attrs.get("provenance") or {}).get("cube")
                if cube:
                    cubes.add(str(cube))
                if ds.attrs.get("product") == "embeddings" and not (entry.parent / "archive").exists():
                    layers.append(pca_layer(ds, f"embedding PCA ({rel})", cache, str(entry), max_size, "embeddings"))
            elif entry.suffix.lower() in (".tif", ".tiff") and entry.is_file():
                layer = raster_layer(str(entry), rel, "maps")
                if layer is not None:
                    layer.visible = not layer.render.get("colormap_name") or "distance" in entry.name
                    layers.append(layer)
            elif entry.suffix == ".parquet" and entry.is_file() and entry.parent.name not in _SKIP_DIRS:
                layer = vector_layer(str(entry), rel, "vectors")
                if layer is not None:
                    layer.visible = entry.name != "tiles.parquet"  # inference tile footprints: on demand
                    layers.append(layer)
        except (OSError, ValueError, KeyError) as err:  # one unreadable output does not hide the others
            log.warning("viewer: skipping %s: %s", entry, err)
    cube_layers = [c for c in (cube_layer(u, cache, max_size) for u in sorted(cubes)) if c is not None]
    for layer in cube_layers:
        layer.visible = not any(x.group == "embeddings" for x in layers)
    return [*cube_layers, *layers], archives
