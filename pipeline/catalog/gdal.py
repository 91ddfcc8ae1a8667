"""The one GDAL configuration and href -> GDAL path mapping for every asset read (search checks, cube builds, tests).

Every reader opens assets as ``rasterio.open(gdal_path(href))`` inside ``rasterio.Env(**GDAL_ENV)``: the catalog's
:func:`~pipeline.catalog.assets.open_asset`, the cube's header checks (:mod:`pipeline.cube.reader`) and its chunk
reader's dataset pool (:mod:`pipeline.cube.chunk_reader`), so a file that opens in one place opens in all.
"""

from __future__ import annotations

GDAL_ENV: dict[str, str] = {
    # [stack-notes] One HEAD, then ranged GETs: never list the "directory" of a remote file, so no sidecar
    # (.aux.xml, .ovr, .msk) is looked for; on a signed blob store each probe would be a refused round trip.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Belt and braces for the same: only these names are fetched over HTTP/S3 (GDAL compares them without the
    # query string, so signed hrefs pass). Covers every format our catalogs serve: GeoTIFF/COG, JPEG 2000 (Sentinel-2
    # L1C on AWS) and VRT. An extension-less href would need its extension added here.
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.JP2,.vrt,.VRT",
    # 429 / 502 / 503 / 504 are retried (never 403 / 404: those are diagnosed, see pipeline.catalog.diagnose).
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    # Adjacent byte ranges (the neighbouring COG tiles under one cube chunk) are fetched with one GET.
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # Parallel range requests share one HTTP/2 connection where the server speaks HTTP/2 (no effect on HTTP/1.1).
    "GDAL_HTTP_MULTIPLEX": "YES",
    # Not set: VSI_CACHE. It adds a cache of VSI_CACHE_SIZE (25 MB) per open file handle, and the cube's dataset
    # pool keeps up to 2 x workers x assets datasets open (GBs); /vsicurl/ already keeps a process-wide cache of
    # downloaded ranges and GDAL's block cache the decoded tiles, which is what the measured builds used
    # (benchmarks/RESULTS.md).
}
"""GDAL configuration for every asset read: use as ``rasterio.Env(**GDAL_ENV)``."""

_VSI_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/"}


def gdal_path(href: str) -> str:
    """The path GDAL opens for an href: http(s) via ``/vsicurl/``, ``s3://`` via ``/vsis3/``, ``file://`` stripped.

    ``gs://`` and ``az://`` map to ``/vsigs/`` and ``/vsiaz/``; anything else (local paths, ``/vsi...``) is unchanged.
    Explicit rather than left to rasterio's URL parsing, so that GDAL's messages and the path a pool caches are the
    same string for every reader (rasterio maps URLs to exactly these prefixes, so the pixels are odc-stac's).
    """
    if href.startswith(("http://", "https://")):
        return f"/vsicurl/{href}"
    for scheme, prefix in _VSI_PREFIXES.items():
        if href.startswith(scheme):
            return prefix + href.removeprefix(scheme)
    return href.removeprefix("file://")


def href_of(path: str) -> str:
    """The href behind a GDAL path (the inverse of :func:`gdal_path`): ``/vsicurl/http://..`` -> ``http://..``."""
    if path.startswith("/vsicurl/"):
        return path.removeprefix("/vsicurl/")
    for scheme, prefix in _VSI_PREFIXES.items():
        if path.startswith(prefix):
            return scheme + path.removeprefix(prefix)
    return path
