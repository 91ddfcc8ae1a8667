"""Georeferenced polygons over a GeoTIFF or a Zarr cube -> oriented boxes (:mod:`.boxes`).

Building footprints, vessels or any outlines become the minimum-area rectangles of their convex hulls, in the image's
pixels. The polygons may be in any CRS (reprojected to the image's); polygons that miss the image entirely are an error
naming both extents (the classic wrong-file / CRS-less mistakes), single polygons outside or without area are left
out, counted and reported. An image without georeference cannot place polygons: a clear error.

``path`` is a GeoTIFF (bands mapped and converted by ``image``: e.g. a grey 11-bit band repeated to R, G, B and
scaled to 0-255) or a cube built by ``skypipe cube build`` (its HR group: boxes are an HR task). The scene is one
image, so the split is always spatial: blocks of ``split.block`` pixels, by default one chip.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import shapely

from pipeline.modalities import ModalitySpec

from .boxes import BoxSource, check_classes, class_index, geometries_to_objects
from .cubelabels import Grid, _read_vectors, check_overlap
from .readers import DataReadError, raster_info
from .source import RasterLayer, Scene
from .spec import VectorBoxesSpec
from .splits import seeded_rule

log = logging.getLogger(__name__)


def _geotiff(spec: VectorBoxesSpec, hr: ModalitySpec) -> tuple[Grid, RasterLayer, float]:
    info = raster_info(spec.path)
    if info.crs is None or info.gsd is None:
        raise DataReadError(
            f"{spec.path}: the image has no georeference (CRS / geotransform), so the polygons of {spec.labels} "
            "cannot be placed on it; georeference it (gdal_translate -a_srs)"
        )
    t = info.transform
    if t.b or t.d:
        raise DataReadError(f"{spec.path}: a rotated geotransform is not supported; warp the image north-up first")
    n = hr.num_bands
    if spec.image.bands is not None:
        missing = [b for b in hr.bands if b not in spec.image.bands]
        bad = [i for i in spec.image.bands.values() if not 1 <= i <= info.count]
        if missing or bad:
            raise DataReadError(f"{spec.path}: image.bands must map every model band {list(hr.bands)} to a band "
                                f"1..{info.count}; got {spec.image.bands}")  # fmt: skip
        bands = [spec.image.bands[b] for b in hr.bands]
    elif info.count >= n:
        bands = list(range(1, n + 1))
    elif info.count == 1:
        log.info("%s: one band, repeated as %s", spec.path, list(hr.bands))
        bands = [1] * n
    else:
        raise DataReadError(f"{spec.path}: {info.count} bands for the model's {list(hr.bands)}: map image.bands")
    nodata = spec.image.nodata if spec.image.nodata is not None else info.nodata
    layer = RasterLayer(spec.path, bands, 1.0, info.doy, nodata, spec.image.scale, spec.image.offset)
    return Grid(info.crs, t, info.shape), layer, float(info.gsd)


def _cube(spec: VectorBoxesSpec, hr: ModalitySpec) -> tuple[Grid, object, float]:
    import zarr

    from pipeline.cube.layout import cube_modalities

    from .cube import CubeLabelled, ZarrLayer

    try:
        present = cube_modalities(spec.path)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as err:
        raise DataReadError(f"no Zarr cube at {spec.path} ({err})") from None
    if "hr" not in present or (spec.modalities not in (None, ["hr"])):
        raise DataReadError(f"{spec.path}: object boxes are read from the cube's 'hr' group; it has {present}")
    g = CubeLabelled._group(spec.path, "hr", hr, spec)  # type: ignore[arg-type]
    layer = ZarrLayer(spec.path, "hr", g.bands, g.times, g.doy, 1.0, (0, 0), 1)
    return g.grid, layer, g.gsd


class VectorBoxesSource(BoxSource):
    """One georeferenced image with polygons as boxes; chips of it in spatial blocks per split."""

    def __init__(self, spec: VectorBoxesSpec, split: str, model_specs: Mapping[str, ModalitySpec], train: bool,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(spec, split, train)
        if "hr" not in model_specs:
            raise ValueError(f"{spec.path}: object boxes are an 'hr' task; the model takes only {sorted(model_specs)}")
        hr = model_specs["hr"]
        is_cube = Path(spec.path).is_dir()
        grid, layer, gsd = _cube(spec, hr) if is_cube else _geotiff(spec, hr)
        gdf = _read_vectors(spec.labels)
        if gdf.crs is None:
            raise DataReadError(f"{spec.labels}: the polygons have no CRS; they cannot be placed on {spec.path}")
        label_crs = gdf.crs
        gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)].to_crs(grid.crs)
        check_overlap(tuple(gdf.total_bounds), grid, spec.labels, label_crs)
        if spec.class_column is not None and spec.class_column not in gdf.columns:
            raise DataReadError(f"{spec.labels}: class_column {spec.class_column!r} is not a column of "
                                f"{[c for c in gdf.columns if c != gdf.geometry.name]}")  # fmt: skip
        values = gdf[spec.class_column].astype(str).tolist() if spec.class_column else None
        found = sorted(set(values)) if values is not None else [spec.classes[0] if spec.classes else "object"]
        self.classes = list(spec.classes) if spec.classes is not None else found
        check_classes(self.classes, spec.labels)
        where = [f"{spec.labels} feature {i}" for i in gdf.index]
        names = [class_index(self.classes, v, w) for v, w in zip(values, where)] if values else [0] * len(gdf)
        inverse = ~grid.transform
        pixels = shapely.transform(gdf.geometry.values, lambda xy: np.stack(inverse @ (xy[:, 0], xy[:, 1]), 1))
        objects = geometries_to_objects(np.asarray(pixels), names, [False] * len(gdf), grid.shape, where,
                                        self.skipped)  # fmt: skip
        out = self.plan(model_specs, [gsd])
        side = spec.size * out / gsd
        scene = Scene(Path(spec.path).stem, grid.shape, {(0, "hr"): layer}, side, target=objects,  # type: ignore[dict-item]
                      georef=(grid.crs, grid.transform))  # fmt: skip
        self.scenes = [scene]
        rule = seeded_rule(spec, seed)
        assert rule is not None  # the spec refuses explicit splits
        if rule.block is None:
            rule = rule.model_copy(update={"block": max(1, round(side))})
        self.index(np.ones(1, dtype=bool), seed, None, rule=rule)
