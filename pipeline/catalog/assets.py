"""Opening STAC asset hrefs with GDAL exactly as a cloud read does: HTTP(S) through ``/vsicurl/`` range requests.

:func:`open_asset` turns an href into a rasterio dataset under :data:`~pipeline.catalog.gdal.GDAL_ENV` (the one
GDAL configuration of every reader, :mod:`pipeline.catalog.gdal`), and turns GDAL's terse failures into
:class:`AssetReadError` naming the asset (without its token) and the cause found by
:func:`pipeline.catalog.diagnose.diagnose`. With ``resign=`` (see :mod:`pipeline.catalog.signing`) a read refused
with HTTP 401 / 403 is retried once with a re-signed href.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import rasterio
from rasterio.errors import RasterioIOError

from pipeline.catalog.diagnose import Diagnosis, diagnose
from pipeline.catalog.gdal import GDAL_ENV, gdal_path
from pipeline.catalog.redact import public_href

log = logging.getLogger(__name__)

__all__ = ["GDAL_ENV", "AssetReadError", "gdal_path", "open_asset"]


class AssetReadError(OSError):
    """An asset could not be opened or read; the message names the asset (without its token) and the cause.

    Attributes:
        diagnosis: the cause, as :func:`pipeline.catalog.diagnose.diagnose` found it.

    """

    def __init__(self, href: str, diagnosis: Diagnosis) -> None:
        super().__init__(f"cannot read asset {public_href(href)}: {diagnosis.describe()}; {diagnosis.hint}")
        self.diagnosis = diagnosis


@contextlib.contextmanager
def open_asset(
    href: str, *, resign: Callable[[str], str] | None = None, env: dict[str, Any] | None = None
) -> Iterator[rasterio.io.DatasetReader]:
    """Open an asset href for reading (local path, ``http(s)://`` via ``/vsicurl/``, ``s3://``).

    Args:
        href: the asset's href (signed where its catalog signs).
        resign: re-sign hook, called once when the open is refused with HTTP 401 / 403.
        env: extra GDAL options on top of :data:`~pipeline.catalog.gdal.GDAL_ENV`.

    Raises:
        AssetReadError: naming the asset (without its token) and the cause.

    """
    options = {**GDAL_ENV, **(env or {})}
    with rasterio.Env(**options):
        try:
            ds = rasterio.open(gdal_path(href))
        except RasterioIOError as err:
            why = diagnose(href, err)
            if resign is None or why.kind != "denied":
                raise AssetReadError(href, why) from None  # GDAL's own message carries the signed href
            log.info("%s for %s; re-signing once", why.cause, public_href(href))
            fresh = resign(href)
            try:
                ds = rasterio.open(gdal_path(fresh))
            except RasterioIOError as err2:
                raise AssetReadError(fresh, diagnose(fresh, err2)) from None
        with ds:
            yield ds
