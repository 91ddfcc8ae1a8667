"""Detections of a region: the tiles' boxes merged across tile borders, as oriented polygons in GeoParquet.

``detections.parquet`` (:func:`write_detections_table`), one row per object, in the tile store's CRS::

    class, class_id        class name and index
    score                  the detection's score (class probability x centerness, square-rooted)
    tile_id, partial       the tile it came from; whether its box reached into the tile's inner edge band
    cx, cy                 box centre in the CRS
    width_m, height_m      box sides in metres (CRS units)
    angle_deg              rotation of the width side from the grid's +x (east) towards +y rows (south), in degrees
    job, kind, model, code_version, checkpoint, checkpoint_sha256, time_start, time_end   provenance
    geometry               the oriented box as a Polygon

Merging [ours]: neighbouring tiles overlap, so an object there is detected by each tile that sees it, and an object
on a tile's edge is cut: that tile sees only a part of it. A global walk over every tile's boxes keeps one per
object: boxes are taken whole ones first (a box is *partial* when it comes within the store's blending margin of an
inner tile edge, an edge shared with a neighbour), then by score (ties by tile and rank in the tile); a kept box
suppresses a later box of its class whose rotated IoU with it is above the head's NMS threshold, or a later partial
box more than half of which it covers (a cut piece of the object it is). The walk is
:func:`pipeline.geometry.suppress` (STR-tree candidates, exact polygon clipping), so a region's boxes merge in one
pass. Objects larger than the tiles' overlap can still be cut in two: choose ``tiles.overlap`` above the largest
object. The result depends only on the set of tiles' boxes, so a resumed job writes the same table.

Also here: per-class counts for the run summary, and the quicklook: boxes drawn over an RGB picture of the scene.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely
from affine import Affine

from pipeline.geometry import obb_to_polygons, suppress
from pipeline.infer.store import TileStore, open_tile_store, output_of, read_detections
from pipeline.mosaic.tables import provenance_columns, write_geoparquet
from pipeline.palette import default_colors, hex_to_rgb

DETECTIONS = "detections.parquet"
COVER = 0.5
"""A partial box is suppressed by a kept box covering more than this share of its area."""
DEFAULT_IOU = 0.1


def partial_boxes(store: TileStore, boxes: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """``(N,)`` whether each box (output-grid pixels) reaches into its tile's inner edge band (``store.margin``).

    Inner edges are the tile's footprint edges that are not the grid's own edges (a neighbour sees past them).
    """
    if not len(boxes):
        return np.zeros(0, dtype=bool)
    corners = obb_to_polygons(boxes)
    lo, hi = corners.min(1), corners.max(1)  # (N, 2): x (col), y (row)
    band = max(store.margin, 1)
    out = np.zeros(len(boxes), dtype=bool)
    for t in np.unique(tiles).tolist():
        r0, r1, c0, c1 = store.footprint(t)
        m = tiles == t
        near = np.zeros(int(m.sum()), dtype=bool)
        if c0 > 0:
            near |= lo[m, 0] < c0 + band
        if c1 < store.width:
            near |= hi[m, 0] > c1 - band
        if r0 > 0:
            near |= lo[m, 1] < r0 + band
        if r1 < store.height:
            near |= hi[m, 1] > r1 - band
        out[m] = near
    return out


def merge(store: TileStore, dets: pd.DataFrame, iou: float) -> pd.DataFrame:
    """The tiles' detections with cross-tile duplicates and cut pieces removed (see the module docstring)."""
    boxes = dets[["cx", "cy", "w", "h", "angle"]].to_numpy(dtype=np.float64)
    tiles = dets["tile_id"].to_numpy()
    part = partial_boxes(store, boxes, tiles)
    order = np.lexsort((dets["det"].to_numpy(), tiles, -dets["score"].to_numpy(np.float64), part))
    keep = suppress(boxes, order, iou, dets["class_id"].to_numpy(), partial=part, cover_threshold=COVER)
    out = dets.iloc[np.sort(keep)].copy()
    out["partial"] = part[np.sort(keep)]
    return out.reset_index(drop=True)


def to_map(store: TileStore, dets: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Polygons in the store's CRS and the map columns (centre, sides in metres, angle) of grid-pixel boxes."""
    t = store.transform
    boxes = dets[["cx", "cy", "w", "h", "angle"]].to_numpy(dtype=np.float64)
    corners = obb_to_polygons(boxes)  # (N, 4, 2) grid pixels
    xs, ys = t @ (corners[..., 0], corners[..., 1])
    cx, cy = t @ (boxes[:, 0], boxes[:, 1])
    cols = {"cx": np.asarray(cx), "cy": np.asarray(cy), "width_m": boxes[:, 2] * abs(t.a),
            "height_m": boxes[:, 3] * abs(t.e), "angle_deg": np.degrees(boxes[:, 4])}  # fmt: skip
    return shapely.polygons(np.stack([xs, ys], -1)), cols


def detections_table(tiles_url: str, *, job: str | None = None) -> gpd.GeoDataFrame:
    """The merged detections of a tile store of a box product (columns in the module docstring).

    Raises:
        ValueError: the store is not a box product, or has no CRS (detections could not be placed on a map).
    """
    store = open_tile_store(tiles_url)
    names = store.class_names or []
    if store.product != "boxes":
        raise ValueError(f"{tiles_url} holds a {store.product!r} product, not object boxes")
    if not store.crs:
        raise ValueError(f"{tiles_url}: the output grid has no CRS; detections cannot be placed on a map")
    dets, meta = read_detections(output_of(tiles_url), store.done.tolist())
    merged = merge(store, dets, float(meta.get("nms_iou", DEFAULT_IOU)))
    polygons, cols = to_map(store, merged)
    class_id = merged["class_id"].to_numpy(np.int64)
    columns: dict[str, Any] = {
        "class": [names[c] if 0 <= c < len(names) else str(c) for c in class_id.tolist()],
        "class_id": class_id, "score": merged["score"].to_numpy(np.float32), "tile_id": merged["tile_id"].to_numpy(),
        "partial": merged["partial"].to_numpy(bool), **cols,
        **provenance_columns(store.provenance, kind=store.kind, job=job),
    }  # fmt: skip
    table = gpd.GeoDataFrame(pd.DataFrame(columns, index=pd.RangeIndex(len(merged))), geometry=polygons, crs=store.crs)
    table.attrs["class_names"] = list(names)
    table.attrs["class_colors"] = list(store.class_colors or default_colors(len(names)))
    return table


def write_detections_table(tiles_url: str, out_url: str, *, job: str | None = None) -> tuple[str, dict[str, int]]:
    """Write :func:`detections_table` of ``tiles_url`` as GeoParquet at ``out_url``; returns it and the counts."""
    table = detections_table(tiles_url, job=job)
    write_geoparquet(table, out_url)
    return out_url, class_counts(table["class"], table.attrs["class_names"])


def class_counts(classes: pd.Series | list[str], names: list[str]) -> dict[str, int]:
    """Objects per class, every class listed (zero included), in class order."""
    counts = pd.Series(list(classes), dtype=object).value_counts()
    return {n: int(counts.get(n, 0)) for n in names}


def read_class_counts(url: str, names: list[str] | None = None) -> dict[str, int]:
    """Objects per class of a written ``detections.parquet`` (classes in the order ``names``, else as found)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        classes = pq.read_table(f, columns=["class"]).column(0).to_pylist()
    return class_counts(classes, names if names is not None else sorted(set(classes)))


def format_counts(counts: Mapping[str, int]) -> list[str]:
    """Summary lines: objects per class and the total."""
    width = max([5, *(len(n) for n in counts)])
    lines = [f"{'class':<{width}}  {'objects':>8}"]
    lines += [f"{name:<{width}}  {n:>8,}" for name, n in counts.items()]
    lines.append(f"{'total':<{width}}  {sum(counts.values()):>8,}")
    return lines


def draw_detections(rgb_HW3: np.ndarray, transform: Affine, table: gpd.GeoDataFrame, names: list[str],
                    colors: list[str] | None = None, width: int = 2) -> np.ndarray:  # fmt: skip
    """``(H, W, 4)`` RGBA: the picture with every box outlined in its class's colour.

    Args:
        rgb_HW3: the picture (uint8).
        transform: pixel -> CRS transform of the picture (the table's CRS).
        table: a :func:`detections_table`.
        names, colors: the classes and their ``#rrggbb`` colours (default: the shared palette).
        width: outline width in pixels.
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.asarray(rgb_HW3, dtype=np.uint8)).convert("RGBA")
    draw = ImageDraw.Draw(img)
    palette = hex_to_rgb(colors or default_colors(len(names)))
    inverse = ~transform
    for geom, c in zip(table.geometry, table["class_id"].tolist()):
        x, y = shapely.get_coordinates(geom).T
        cols, rows = inverse @ (x, y)
        ring = [(float(a), float(b)) for a, b in zip(cols, rows)]
        colour = (*(int(v) for v in palette[c % len(palette)]), 255)
        draw.line(ring, fill=colour, width=max(1, width), joint="curve")
    return np.asarray(img)
