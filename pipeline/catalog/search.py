"""Search a catalog for the items of each modality over a region and time range.

:func:`search` takes plain values (a :class:`~pipeline.catalog.config.CatalogConfig` from the edge, a region, a
time range); it pages through a STAC API with pystac-client, filters cloud cover server-side with the ``query``
extension when the server conforms to it and always client-side as well (rustac, the local server, ignores
``query``), signs items for catalogs that need it, and returns a :class:`SearchResult`.

For ``kind: local`` catalogs :func:`catalog_api` serves the static catalog on loopback for the duration of a
``with`` block (or uses the catalog's ``url`` when it is already served).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pystac
import pystac_client
from pystac_client.conformance import ConformanceClasses

from pipeline.catalog.config import CatalogConfig, ModalitySource
from pipeline.catalog.signing import Resigner, make_resigner, sign_items

log = logging.getLogger(__name__)

Region = Sequence[float] | dict[str, Any] | str | Path
"""A bbox ``(west, south, east, north)`` in WGS84, a GeoJSON geometry / Feature / FeatureCollection, or a path."""


class EmptySearchError(LookupError):
    """A search found no items for a requested modality; the message says where it looked and what to try."""


def parse_region(region: Region) -> tuple[list[float], dict[str, Any] | None]:
    """``(bbox, geometry)`` of a region; ``geometry`` is ``None`` when the region is a bbox.

    Raises:
        ValueError: malformed bbox or GeoJSON.

    """
    if isinstance(region, (str, Path)) and not _looks_like_bbox(region):
        path = Path(region)
        try:
            region = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"region {path}: cannot read a GeoJSON file ({err})") from None
    if isinstance(region, str):
        region = [float(v) for v in region.split(",")]
    if isinstance(region, dict):
        geom = _geometry(region)
        coords = list(_coords(geom["coordinates"]))
        if not coords:
            raise ValueError("region GeoJSON has no coordinates")
        xs, ys = [c[0] for c in coords], [c[1] for c in coords]
        return [min(xs), min(ys), max(xs), max(ys)], geom
    bbox = [float(v) for v in region]
    if len(bbox) != 4 or bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise ValueError(f"bbox must be west,south,east,north in degrees with west<=east, south<=north; got {bbox}")
    if not (-180 <= bbox[0] <= 180 and -180 <= bbox[2] <= 180 and -90 <= bbox[1] <= 90 and -90 <= bbox[3] <= 90):
        raise ValueError(f"bbox {bbox} is not in WGS84 degrees")
    return bbox, None


def _looks_like_bbox(s: str | Path) -> bool:
    parts = str(s).split(",")
    if len(parts) != 4:
        return False
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return True


def _geometry(obj: dict[str, Any]) -> dict[str, Any]:
    kind = obj.get("type")
    if kind == "Feature":
        return _geometry(obj["geometry"])
    if kind == "FeatureCollection":
        geoms = [_geometry(f) for f in obj.get("features", [])]
        if len(geoms) == 1:
            return geoms[0]
        return {"type": "GeometryCollection", "geometries": geoms}
    if kind in {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString"}:
        return obj
    if kind == "GeometryCollection":
        return obj
    raise ValueError(f"region GeoJSON type {kind!r} is not a geometry, Feature or FeatureCollection")


def _coords(c: Any) -> Iterator[Sequence[float]]:
    if isinstance(c, dict):  # GeometryCollection member
        yield from _coords(c.get("coordinates", [g.get("coordinates") for g in c.get("geometries", [])]))
    elif c and isinstance(c[0], (int, float)):
        yield c
    else:
        for sub in c:
            yield from _coords(sub)


def _day(value: str | date | datetime, end: bool) -> str:
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return f"{value.isoformat()}T23:59:59Z" if end else f"{value.isoformat()}T00:00:00Z"
    if len(value) == 10:  # a bare day covers the whole day
        return _day(date.fromisoformat(value), end)
    return _day(datetime.fromisoformat(value.replace("Z", "+00:00")), end)


def cloud_cover(item: pystac.Item, prop: str | None) -> float | None:
    """The item's cloud cover in percent, or ``None`` when the catalog or item has none."""
    if prop is None:
        return None
    value = item.properties.get(prop)
    return None if value is None else float(value)


def restore_proj_epsg(items: Sequence[pystac.Item]) -> None:
    """Put ``proj:epsg`` back from ``proj:code`` (pystac 1.15 drops it on read; stackstac 0.5 only reads it)."""
    for item in items:
        code = item.properties.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            item.properties["proj:epsg"] = int(code.split(":", 1)[1])


@dataclass
class SearchResult:
    """Items found per modality, sorted by datetime.

    Attributes:
        catalog: catalog name.
        url: STAC API root that answered.
        bbox: search bbox (WGS84).
        start: start of the time range (ISO 8601).
        end: end of the time range (ISO 8601).
        items: modality -> items, oldest first.
        sources: modality -> its catalog source (collection, assets, scale...).
        max_cloud: the cloud-cover limit applied, if any.
        dropped_cloudy: modality -> number of items removed by the client-side cloud filter.
        resigner: re-sign hook for signed catalogs (``None`` otherwise): pass ``resigner.fresh`` as
            ``patch_url`` to ``odc.stac.load`` and as ``resign`` to :func:`pipeline.catalog.assets.open_asset`.

    """

    catalog: str
    url: str
    bbox: list[float]
    start: str
    end: str
    items: dict[str, list[pystac.Item]]
    sources: dict[str, ModalitySource]
    max_cloud: float | None = None
    dropped_cloudy: dict[str, int] = field(default_factory=dict)
    resigner: Resigner | None = None

    def summary(self) -> str:
        """A table: items per modality, date range, cloud cover min / median / max."""
        head = (
            f"catalog {self.catalog} ({self.url})\n"
            f"bbox {', '.join(f'{v:.4f}' for v in self.bbox)}   {self.start} .. {self.end}"
            + (f"   max cloud {self.max_cloud:g}%" if self.max_cloud is not None else "")
        )
        rows = [("modality", "collection", "level", "items", "first", "last", "cloud min/med/max %")]
        for name, items in self.items.items():
            src = self.sources[name]
            dates = [it.datetime for it in items if it.datetime is not None]
            clouds = [c for c in (cloud_cover(it, src.cloud_cover_property) for it in items) if c is not None]
            cloud = f"{min(clouds):.0f}/{statistics.median(clouds):.0f}/{max(clouds):.0f}" if clouds else "-"
            dropped = self.dropped_cloudy.get(name, 0)
            rows.append((
                name,
                src.collection,
                src.processing_level or "-",
                f"{len(items)}" + (f" (+{dropped} cloudy)" if dropped else ""),
                min(dates).date().isoformat() if dates else "-",
                max(dates).date().isoformat() if dates else "-",
                cloud,
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([head, *lines])


@contextlib.contextmanager
def catalog_api(catalog: CatalogConfig, url: str | None = None) -> Iterator[str]:
    """The STAC API root of a catalog: ``url``, else the catalog's ``url``, else a loopback server of its ``path``."""
    if url or catalog.url:
        yield str(url or catalog.url)
        return
    from pipeline.catalog.serve import LocalStacServer  # local: only local catalogs start processes

    with LocalStacServer(catalog.local_path()) as srv:
        yield srv.url


def search(
    catalog: CatalogConfig,
    *,
    region: Region,
    start: str | date | datetime,
    end: str | date | datetime,
    modalities: Sequence[str],
    max_cloud: float | None = None,
    url: str | None = None,
    limit: int = 100,
    max_items: int | None = None,
    sign_href: Any = None,
) -> SearchResult:
    """Search ``catalog`` for each modality's items intersecting ``region`` in ``[start, end]``.

    Args:
        catalog: the catalog definition.
        region: bbox, GeoJSON geometry/Feature(Collection) or GeoJSON file (see :data:`Region`).
        start: first day or time (a bare ``YYYY-MM-DD`` end covers the whole day).
        end: last day or time.
        modalities: our modality names, e.g. ``["s2", "s1"]``.
        max_cloud: keep items with cloud cover <= this percentage (modalities with a ``cloud_cover_property``).
        url: STAC API root to use instead of the catalog's (e.g. a running ``skypipe catalog serve``). A ``local``
            catalog without one is served only for the search; its items' hrefs then point at the local files (keep
            a :class:`~pipeline.catalog.serve.LocalStacServer` running and pass its ``url`` to read over HTTP).
        limit: page size requested from the API.
        max_items: stop after this many items per modality.
        sign_href: signing function for signed catalogs (default: the catalog's signing mode's).

    Raises:
        EmptySearchError: a requested modality has no items.

    """
    bbox, geometry = parse_region(region)
    t0, t1 = _day(start, end=False), _day(end, end=True)
    if t0 > t1:
        raise ValueError(f"start {t0} is after end {t1}")
    sources = {m: catalog.source(m) for m in modalities}
    resigner = make_resigner(catalog.signing, sign_href)
    with contextlib.ExitStack() as stack:
        api_url, server = url or catalog.url, None
        if not api_url:
            from pipeline.catalog.serve import LocalStacServer  # local: only local catalogs start processes

            server = stack.enter_context(LocalStacServer(catalog.local_path()))
            api_url = server.url
        client = pystac_client.Client.open(api_url)
        use_query = catalog.query_extension
        if use_query is None:
            use_query = client.conforms_to(ConformanceClasses.QUERY)
        result = SearchResult(catalog.name, api_url, bbox, t0, t1, {}, sources, max_cloud, resigner=resigner)
        for name, src in sources.items():
            result.items[name], result.dropped_cloudy[name] = _search_one(
                client, src, bbox, geometry, f"{t0}/{t1}", max_cloud, use_query, limit, max_items
            )
            if not result.items[name]:
                raise EmptySearchError(_empty_message(catalog, name, src, result, api_url))
        if server is not None:  # the temporary server stops here: point the hrefs back at the local files
            for items in result.items.values():
                for item in items:
                    for asset in item.assets.values():
                        asset.href = server.local_href(asset.href)
    if resigner is not None:
        result.items = {m: sign_items(items, resigner.sign_href) for m, items in result.items.items()}
    return result


def _search_one(
    client: pystac_client.Client,
    src: ModalitySource,
    bbox: list[float],
    geometry: dict[str, Any] | None,
    interval: str,
    max_cloud: float | None,
    use_query: bool,
    limit: int,
    max_items: int | None,
) -> tuple[list[pystac.Item], int]:
    kwargs: dict[str, Any] = {"collections": [src.collection], "datetime": interval, "limit": limit}
    kwargs["intersects" if geometry else "bbox"] = geometry or bbox
    cloud_prop = src.cloud_cover_property if max_cloud is not None else None
    if cloud_prop and use_query:
        kwargs["query"] = {cloud_prop: {"lte": max_cloud}}
    items, dropped = [], 0
    for item in client.search(**kwargs).items():
        cc = cloud_cover(item, cloud_prop)
        if cloud_prop and cc is not None and cc > max_cloud:  # type: ignore[operator]
            dropped += 1
            continue
        items.append(item)
        if max_items is not None and len(items) >= max_items:
            break
    items.sort(key=lambda it: (it.datetime or datetime.min.replace(tzinfo=timezone.utc), it.id))
    log.debug("%s: %d items (%d dropped as cloudy)", src.collection, len(items), dropped)
    return items, dropped


def _empty_message(catalog: CatalogConfig, name: str, src: ModalitySource, res: SearchResult, url: str) -> str:
    tries = ["widen the date range", "enlarge the region"]
    if res.dropped_cloudy.get(name):
        tries.insert(0, f"raise the cloud limit ({res.dropped_cloudy[name]} items were cloudier than {res.max_cloud}%)")
    if catalog.kind == "local":
        tries.append("check that the local catalog was built (`skypipe catalog build-local`) and covers this region")
    return (
        f"no {name} items in catalog {catalog.name!r} ({url}), collection {src.collection!r}, "
        f"bbox {[round(v, 5) for v in res.bbox]}, {res.start} .. {res.end}"
        + (f", cloud cover <= {res.max_cloud}%" if res.max_cloud is not None and src.cloud_cover_property else "")
        + ". Try to: "
        + "; ".join(tries)
        + "."
    )
