"""Top-k patch search in an embedding archive: "where else is something like this?".

A query is the patch at a point (``lonlat``), the mean patch vector inside polygons (``geometry``), or a vector from a
file that carries its provenance (``vector``; :func:`read_query_vector`). Prefilters (bounding box in degrees, time
range, mosaic names) select rows before the index is searched (:meth:`.patch_index.PatchIndex.search`).

Outputs of :func:`write_search` in ``out``::

    hits.parquet     GeoParquet in EPSG:4326, one row per hit, best first: rank, score (cosine similarity), mosaic,
                     patch_id, prow, pcol, time_start, time_end, lon, lat, geometry (the patch footprint)
    query.json       the query (kind, point / geometry, mosaic and patch it came from), its vector and the archive's
                     provenance (so it can be passed back with ``--vector``), filters, k, nprobe, timings
    quicklook.png    the archive mosaic with the most hits (PCA colours), hits outlined (brighter = better), the
                     query patch in white
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely

from pipeline import storage
from pipeline.mosaic.archive import archive_meta, check_provenance
from pipeline.mosaic.patch_index import PatchIndex
from pipeline.mosaic.patches import PatchGrid

log = logging.getLogger(__name__)

HITS = "hits.parquet"
QUERY = "query.json"
QUICKLOOK = "quicklook.png"


@dataclass
class SearchResult:
    """Hits of one query and what was asked."""

    hits: gpd.GeoDataFrame
    query: dict[str, Any]
    vector: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


class ArchiveSearcher:
    """An archive opened for searching (index and metadata in memory, reused across queries: the viewer's)."""

    def __init__(self, archive_url: str, *, update: bool = True, break_lease: bool = False) -> None:
        self.url = archive_url
        self.meta = archive_meta(archive_url)
        self.index = PatchIndex.open(archive_url, self.meta, update=update, break_lease=break_lease)
        self.grids = {
            name: PatchGrid.from_json(src["patches"]["grid"])
            for name, src in (self.meta.get("sources") or {}).items()
            if name in self.meta["mosaics"] and "patches" in src
        }
        self._mosaic_rows = self.index.mosaic_of_rows()

    @property
    def provenance(self) -> dict[str, Any]:
        """The archive's provenance (model, checkpoint sha256, preprocessing)."""
        return self.meta["provenance"]

    def _time_of(self, name: str) -> tuple[str | None, str | None]:
        times = [*(self._mosaic_time(name) or []), None, None]
        return times[0], times[1]

    def _mosaic_time(self, name: str) -> list[str] | None:
        src = (self.meta.get("sources") or {}).get(name) or {}
        return (src.get("patches") or {}).get("time")

    def _rows_of(self, name: str, prow: np.ndarray, pcol: np.ndarray) -> np.ndarray:
        """Metadata rows of patches ``(prow, pcol)`` of mosaic ``name`` (-1 where the patch has no row)."""
        sel = np.flatnonzero(self._mosaic_rows == name)
        out = np.full(len(prow), -1, dtype=np.int64)
        if not len(sel):
            return out
        cols = self.grids[name].cols
        key = self.index.columns["prow"][sel].astype(np.int64) * cols + self.index.columns["pcol"][sel].astype(np.int64)
        order = np.argsort(key)
        want = np.asarray(prow, np.int64) * cols + np.asarray(pcol, np.int64)
        pos = np.clip(np.searchsorted(key[order], want), 0, len(order) - 1)
        found = key[order][pos] == want
        out[found] = sel[order][pos][found]
        return out

    def _mosaics(self, mosaics: list[str] | None) -> list[str]:
        names = list(self.meta["mosaics"])
        if not mosaics:
            return names
        unknown = [m for m in mosaics if m not in names]
        if unknown:
            raise KeyError(f"{self.url} has no mosaic(s) {unknown} (has {names})")
        return list(mosaics)

    def point_query(self, lon: float, lat: float, mosaics: list[str] | None = None) -> tuple[np.ndarray, dict]:
        """The stored vector of the patch at ``(lon, lat)`` (the first listed mosaic that has one)."""
        problems = []
        for name in self._mosaics(mosaics):
            grid = self.grids[name]
            x, y = pyproj.Transformer.from_crs("EPSG:4326", grid.crs, always_xy=True).transform(lon, lat)
            cell = grid.locate(x, y)
            if cell is None:
                problems.append(f"{name}: outside")
                continue
            row = self._rows_of(name, np.array([cell[0]]), np.array([cell[1]]))[0]
            if row < 0:
                problems.append(f"{name}: patch {cell} has no embedding (no data there)")
                continue
            vec = self.index.vectors(np.array([row]))[0]
            return vec, {"kind": "point", "lonlat": [lon, lat], "mosaic": name, "prow": cell[0], "pcol": cell[1],
                         "row": int(row)}  # fmt: skip
        bounds = self.bounds()
        raise ValueError(
            f"lon/lat ({lon}, {lat}) has no patch in {self.url} ({'; '.join(problems)}); the archive covers "
            f"lon {bounds[0]:.4f}..{bounds[2]:.4f}, lat {bounds[1]:.4f}..{bounds[3]:.4f}"
        )

    def geometry_query(self, geometry: Any, crs: Any, mosaics: list[str] | None = None) -> tuple[np.ndarray, dict]:
        """Mean of the (unit-length) vectors of the patches whose centres lie inside ``geometry``."""
        geom = gpd.GeoSeries([geometry], crs=crs or "EPSG:4326").to_crs("EPSG:4326").iloc[0]
        names = self._mosaics(mosaics)
        lon, lat = self.index.columns["lon"], self.index.columns["lat"]
        cand = np.flatnonzero(np.isin(self._mosaic_rows, names))
        minx, miny, maxx, maxy = geom.bounds
        cand = cand[(lon[cand] >= minx) & (lon[cand] <= maxx) & (lat[cand] >= miny) & (lat[cand] <= maxy)]
        inside = cand[shapely.contains_xy(geom, lon[cand], lat[cand])] if len(cand) else cand
        if len(inside) == 0:
            raise ValueError(f"no patch centre of {self.url} lies inside the query geometry (bounds {geom.bounds})")
        vecs = self.index.vectors(inside)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs.mean(axis=0), {"kind": "geometry", "geometry": shapely.geometry.mapping(geom),
                                   "patches": len(inside)}  # fmt: skip

    def bounds(self) -> tuple[float, float, float, float]:
        """WGS84 bounds of the patch centres."""
        lon, lat = self.index.columns["lon"], self.index.columns["lat"]
        if not len(lon):
            return (np.nan,) * 4
        return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())

    def mask(
        self, *, bbox: tuple[float, float, float, float] | None = None, time_range: tuple[str, str] | None = None,
        mosaics: list[str] | None = None,
    ) -> np.ndarray | None:  # fmt: skip
        """Rows that pass the prefilters (``None``: no filter)."""
        if bbox is None and time_range is None and not mosaics:
            return None
        keep = np.ones(self.index.size, dtype=bool)
        if mosaics:
            keep &= np.isin(self._mosaic_rows, self._mosaics(mosaics))
        if bbox is not None:
            minx, miny, maxx, maxy = bbox
            if minx > maxx or miny > maxy:
                raise ValueError(f"bbox {list(bbox)} is not [min lon, min lat, max lon, max lat]")
            lon, lat = self.index.columns["lon"], self.index.columns["lat"]
            keep &= (lon >= minx) & (lon <= maxx) & (lat >= miny) & (lat <= maxy)
        if time_range is not None:
            t0, t1 = (pd.Timestamp(t) for t in time_range)
            ok = []
            for name in self.meta["mosaics"]:
                start, end = self._time_of(name)
                ok.append(name if start is None or (pd.Timestamp(start) <= t1 and pd.Timestamp(end or start) >= t0)
                          else None)  # fmt: skip
            keep &= np.isin(self._mosaic_rows, [n for n in ok if n])
        return keep

    def search(
        self, vector: np.ndarray, k: int = 100, *, bbox: tuple[float, float, float, float] | None = None,
        time_range: tuple[str, str] | None = None, mosaics: list[str] | None = None, nprobe: int | None = None,
        query: dict[str, Any] | None = None,
    ) -> SearchResult:  # fmt: skip
        """Top-``k`` patches most similar to ``vector`` that pass the filters."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        start = time.perf_counter()
        mask = self.mask(bbox=bbox, time_range=time_range, mosaics=mosaics)
        filtered = time.perf_counter()
        scores, rows = self.index.search(np.asarray(vector, np.float32)[None], k, mask=mask, nprobe=nprobe)
        searched = time.perf_counter()
        scores, rows = scores[0], rows[0]
        ok = rows >= 0
        hits = self.hits(rows[ok], scores[ok])
        query = {**(query or {}), "k": k, "bbox": bbox, "time": time_range, "mosaics": mosaics,
                 "nprobe": int(nprobe or self.index.state["nprobe"]),
                 "selected_rows": int(mask.sum()) if mask is not None else self.index.size}  # fmt: skip
        seconds = {"filter": filtered - start, "search": searched - filtered, "results": time.perf_counter() - searched,
                   "index_load": self.index.load_seconds}  # fmt: skip
        return SearchResult(hits, query, np.asarray(vector, np.float32), seconds)

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> gpd.GeoDataFrame:
        """The result table of metadata ``rows`` (EPSG:4326 footprints)."""
        names = self._mosaic_rows[rows] if len(rows) else np.zeros(0, object)
        prow = self.index.columns["prow"][rows].astype(np.int64)
        pcol = self.index.columns["pcol"][rows].astype(np.int64)
        geoms = np.empty(len(rows), dtype=object)
        for name in np.unique(names):
            sel = names == name
            grid = self.grids[name]
            boxes = grid.boxes(prow[sel], pcol[sel])
            geoms[sel] = gpd.GeoSeries(boxes, crs=grid.crs).to_crs("EPSG:4326").values
        times = [self._time_of(n) for n in names]
        frame = pd.DataFrame({
            "rank": np.arange(1, len(rows) + 1), "score": scores.astype(np.float32), "mosaic": names.astype(str),
            "patch_id": prow * np.array([self.grids[n].cols for n in names], dtype=np.int64).reshape(-1) + pcol,
            "prow": prow, "pcol": pcol, "time_start": [t[0] for t in times], "time_end": [t[1] for t in times],
            "lon": self.index.columns["lon"][rows], "lat": self.index.columns["lat"][rows],
        })  # fmt: skip
        return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326", index=frame.index))


def read_query_vector(path: str, provenance: dict[str, Any], *, trust: bool = False) -> tuple[np.ndarray, dict]:
    """A query vector from a file, checked against the archive's provenance.

    ``.json`` files (``query.json`` of an earlier search, or ``{"vector": [...], "provenance": {...}}``) carry their
    provenance, which must match (:class:`~pipeline.mosaic.archive.ProvenanceError` otherwise). ``.npy`` files carry
    none: they are refused unless ``trust`` (the caller vouches for the model).
    """
    if str(path).lower().endswith(".json"):
        obj = storage.read_json(path)
        if "vector" not in obj:
            raise ValueError(f"{path} holds no 'vector' (expected a query.json or {{'vector', 'provenance'}})")
        prov = obj.get("provenance")
        if prov is None and not trust:
            raise ValueError(f"{path} has no 'provenance': add the model's, or pass --trust-vector to compare anyway")
        if prov is not None:
            check_provenance(provenance, prov, what=f"query vector {path}", against="the archive")
        return np.asarray(obj["vector"], np.float32), {"kind": "vector", "file": str(path)}
    if not trust:
        raise ValueError(
            f"{path} carries no provenance, so it may come from another model; use a query.json written by "
            "`skypipe archive search`, or pass --trust-vector"
        )
    import io

    vec = np.load(io.BytesIO(storage.read_bytes(path)))
    return np.asarray(vec, np.float32).reshape(-1), {"kind": "vector", "file": str(path), "trusted": True}


def read_geometry(path: str) -> tuple[Any, Any]:
    """The union of the features of a vector file and its CRS."""
    frame = gpd.read_file(path) if not str(path).endswith(".parquet") else gpd.read_parquet(path)
    if frame.empty:
        raise ValueError(f"{path} holds no feature")
    return shapely.union_all(frame.geometry.values), frame.crs


def write_search(searcher: ArchiveSearcher, result: SearchResult, out_dir: str, *, quicklook: bool = True) -> dict:
    """Write ``hits.parquet``, ``query.json`` and ``quicklook.png`` of one search into ``out_dir``."""
    from pipeline.mosaic.tables import write_geoparquet

    paths = {"hits": storage.join(out_dir, HITS), "query": storage.join(out_dir, QUERY)}
    write_geoparquet(result.hits, paths["hits"])
    storage.write_json(paths["query"], {
        "query": result.query, "vector": result.vector.tolist(), "provenance": searcher.provenance,
        "archive": searcher.url, "hits": len(result.hits), "seconds": result.seconds,
    }, indent=1)  # fmt: skip
    if quicklook and len(result.hits):
        paths["quicklook"] = hits_quicklook(searcher, result, storage.join(out_dir, QUICKLOOK))
    return paths


def hits_quicklook(searcher: ArchiveSearcher, result: SearchResult, png: str, max_size: int = 384) -> str:
    """The mosaic with most hits in PCA colours, hits outlined on top (rank 1 brightest), the query patch in white."""
    from PIL import Image, ImageDraw

    from pipeline.mosaic.quantize import dequantize
    from pipeline.mosaic.quicklook import decimate, pca_rgb, save_png
    from pipeline.mosaic.stitch import open_mosaic

    name = result.hits["mosaic"].value_counts().index[0]
    ds = open_mosaic(storage.join(searcher.url, "mosaics", f"{name}.zarr"))
    small = decimate(ds, max_size).load()  # one read of the (decimated) int8 pixels; the PCA then runs in memory
    step = max(1, -(-max(ds.sizes["y"], ds.sizes["x"]) // max_size))
    img = Image.fromarray(pca_rgb(dequantize(small), small.get("valid")), mode="RGBA")
    draw = ImageDraw.Draw(img)
    grid = searcher.grids[name]
    sel = result.hits[result.hits["mosaic"] == name]
    n = max(len(result.hits), 1)
    for rank, prow, pcol in zip(sel["rank"], sel["prow"], sel["pcol"]):
        shade = int(255 - 200 * (rank - 1) / n)
        r0, c0 = prow * grid.size / step, pcol * grid.size / step
        side = max(grid.size / step, 2)
        draw.rectangle([c0, r0, c0 + side, r0 + side], outline=(255, shade, 0, 255), width=2 if rank <= 10 else 1)
    q = result.query
    if q.get("kind") == "point" and q.get("mosaic") == name:
        r0, c0 = q["prow"] * grid.size / step, q["pcol"] * grid.size / step
        side = max(grid.size / step, 2)
        draw.rectangle([c0 - 2, r0 - 2, c0 + side + 2, r0 + side + 2], outline=(255, 255, 255, 255), width=2)
    return save_png(np.asarray(img), png)


def search_archive(
    archive_url: str, out_dir: str, *, lonlat: tuple[float, float] | None = None, geometry: str | None = None,
    vector: str | None = None, trust_vector: bool = False, k: int = 100,
    bbox: tuple[float, float, float, float] | None = None, time_range: tuple[str, str] | None = None,
    mosaics: list[str] | None = None, nprobe: int | None = None, quicklook: bool = True,
) -> tuple[SearchResult, dict]:  # fmt: skip
    """``skypipe archive search``: one query (one of ``lonlat``, ``geometry``, ``vector``), written to ``out_dir``.

    Returns:
        the result and the written paths.
    """
    if sum(v is not None for v in (lonlat, geometry, vector)) != 1:
        raise ValueError("give exactly one of --lonlat, --geometry or --vector")
    searcher = ArchiveSearcher(archive_url)
    if lonlat is not None:
        vec, query = searcher.point_query(*lonlat, mosaics=mosaics)
    elif geometry is not None:
        geom, crs = read_geometry(geometry)
        vec, query = searcher.geometry_query(geom, crs, mosaics=mosaics)
        query["file"] = str(geometry)
    else:
        vec, query = read_query_vector(vector, searcher.provenance, trust=trust_vector)
    result = searcher.search(vec, k, bbox=bbox, time_range=time_range, mosaics=mosaics, nprobe=nprobe, query=query)
    return result, write_search(searcher, result, out_dir, quicklook=quicklook)
