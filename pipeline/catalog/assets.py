"""Opening STAC asset hrefs with GDAL exactly as a cloud read does: HTTP(S) through ``/vsicurl/`` range requests.

:func:`open_asset` turns an href into a rasterio dataset under :data:`GDAL_HTTP_ENV`, and turns GDAL's terse
failures into :class:`AssetReadError` naming the asset (404 -> "not found"). With ``resign=`` (see
:mod:`pipeline.catalog.signing`) a read refused for an expired token is retried once with a re-signed href.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import rasterio
from rasterio.errors import RasterioIOError

from pipeline.catalog.signing import is_auth_failure, strip_token

log = logging.getLogger(__name__)

GDAL_HTTP_ENV: dict[str, Any] = {
    # One HEAD then ranged GETs: never list the "directory" of a remote file.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.jp2,.TIF,.TIFF,.JP2,.vrt",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
}
"""GDAL configuration for reading assets over HTTP (use with ``rasterio.Env(**GDAL_HTTP_ENV)``)."""


class AssetReadError(OSError):
    """An asset could not be opened or read; the message names the asset and the likely cause."""


def gdal_path(href: str) -> str:
    """The GDAL path for an href: ``/vsicurl/`` for http(s), ``/vsis3/`` for s3, local paths unchanged."""
    if href.startswith(("http://", "https://")):
        return f"/vsicurl/{href}"
    if href.startswith("s3://"):
        return "/vsis3/" + href.removeprefix("s3://")
    return href.removeprefix("file://")


def _explain(href: str, err: Exception) -> str:
    msg = str(err)
    shown = strip_token(href)  # never print a SAS token
    if "404" in msg or "No such file" in msg or "does not exist" in msg:
        cause = "not found (HTTP 404 / missing file): the catalog points at an asset that is not there"
    elif is_auth_failure(msg):
        cause = "access refused (HTTP 403): the href is unsigned or its token expired"
    else:
        cause = msg
    return f"cannot read asset {shown}: {cause}"


@contextlib.contextmanager
def open_asset(
    href: str, *, resign: Callable[[str], str] | None = None, env: dict[str, Any] | None = None
) -> Iterator[rasterio.io.DatasetReader]:
    """Open an asset href for reading (local path, ``http(s)://`` via ``/vsicurl/``, ``s3://``).

    Args:
        href: the asset's href.
        resign: re-sign hook called once when the open is refused with 403 / an expired token.
        env: extra GDAL options on top of :data:`GDAL_HTTP_ENV`.

    Raises:
        AssetReadError: naming the asset (without its token) and the cause.

    """
    options = {**GDAL_HTTP_ENV, **(env or {})}
    with rasterio.Env(**options):
        try:
            ds = rasterio.open(gdal_path(href))
        except RasterioIOError as err:
            if resign is None or not is_auth_failure(str(err)):
                raise AssetReadError(_explain(href, err)) from err
            log.info("token refused for %s; re-signing once", strip_token(href))
            try:
                ds = rasterio.open(gdal_path(resign(href)))
            except RasterioIOError as err2:
                raise AssetReadError(_explain(href, err2)) from err2
        with ds:
            yield ds
