"""Reading labelled data from disk: raster headers, band mapping to the model's bands, windowed reads, images.

Every read error names the file: a user with 10,000 chips needs to know which one is broken. Values come back as
float32 in the modality's units with NaN where a pixel is missing (nodata, outside the raster), which is how the
geometry code pads and how :func:`pipeline.train.sources.modality_entry` finds invalid pixels.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from affine import Affine
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError
from pipeline.modalities import BandMismatchError, ModalitySpec

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius: one degree of latitude is ``pi / 180 * R`` metres (GSD of geographic rasters)."""


class DataReadError(UserError):
    """A data file that cannot be read or does not hold what the spec says; the message names the file."""


class DataBandError(BandMismatchError, UserError):
    """The data cannot provide the bands the model expects; the message names the file and both band lists."""

    def __init__(self, path: str | Path, modality: str, expected: tuple[str, ...], got: tuple[str, ...]) -> None:
        super().__init__(modality, expected, got=list(got))
        self.path = str(path)
        self.args = (f"{path}: {self.args[0]}",)


@dataclass(frozen=True)
class RasterInfo:
    """What a raster header says: size, bands, nodata, georeference (CRS WKT or None), tags."""

    path: str
    shape: tuple[int, int]
    count: int
    descriptions: tuple[str, ...]
    nodata: float | None
    crs: str | None
    transform: Affine
    tags: Mapping[str, str]

    @property
    def gsd(self) -> float | None:
        """Pixel size in metres from the georeference (geographic CRS: along a meridian); None without one."""
        if self.crs is None:
            return None
        from pyproj import CRS

        crs = CRS.from_user_input(self.crs)
        a, e = abs(self.transform.a), abs(self.transform.e)
        if crs.is_geographic:
            return e * math.pi / 180 * EARTH_RADIUS_M
        factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return math.sqrt(a * e) * factor

    @property
    def doy(self) -> int:
        """Day of year of the acquisition, from a date tag or the file name; 0 = unknown."""
        for key in ("acquisition_time_utc", "datetime", "ACQUISITION_DATE", "acquisition_date"):
            if key in self.tags:
                d = parse_date(self.tags[key])
                if d:
                    return d
        return parse_date(Path(self.path).name)


_DATE = re.compile(r"(?<!\d)((?:19|20)\d{2})-?(\d{2})-?(\d{2})(?!\d)")


def parse_date(text: str) -> int:
    """Day of year of the first ``YYYYMMDD`` / ``YYYY-MM-DD`` date in ``text`` (0 if none)."""
    for m in _DATE.finditer(text):
        try:
            return dt.date(*(int(g) for g in m.groups())).timetuple().tm_yday
        except ValueError:
            continue
    return 0


def _rasterio():  # rasterio is heavy: imported on first use
    import rasterio

    return rasterio


def raster_info(path: str) -> RasterInfo:
    """The header of a raster (cached per path and modification time).

    Raises:
        DataReadError: the file is missing or not a raster GDAL reads.
    """
    try:
        stat = os.stat(path)
    except OSError:
        stat = None  # not a local file (a URL GDAL reads), or missing: GDAL says which
    return _raster_info(path, (stat.st_mtime_ns, stat.st_size) if stat else None)


@lru_cache(maxsize=4096)
def _raster_info(path: str, version: tuple[int, int] | None) -> RasterInfo:
    rio = _rasterio()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rio.errors.NotGeoreferencedWarning)
            with rio.open(path) as src:
                return RasterInfo(
                    path=str(path), shape=(src.height, src.width), count=src.count,
                    descriptions=tuple(d or "" for d in src.descriptions), nodata=src.nodata,
                    crs=src.crs.to_wkt() if src.crs else None, transform=src.transform, tags=dict(src.tags()),
                )  # fmt: skip
    except rio.errors.RasterioIOError as err:
        raise DataReadError(f"{path}: cannot read the raster ({err})") from None


def canonical_band(name: str) -> str:
    """Band name for matching: upper case, Sentinel-2 numbers zero-padded (``B2`` == ``B02``, ``b8a`` == ``B8A``)."""
    name = name.strip().upper()
    m = re.fullmatch(r"B(\d)(A?)", name)
    return f"B0{m.group(1)}{m.group(2)}" if m else name


def band_indices(info: RasterInfo, spec: ModalitySpec, mapping: Mapping[str, int | str] | None) -> list[int]:
    """1-based band indices of ``info`` holding the model's bands of ``spec``, in the model's order.

    ``mapping`` (model band -> 1-based index or band description) wins; without it the file's band descriptions
    are matched by :func:`canonical_band`, or the bands are taken in order when the file has exactly as many.

    Raises:
        DataBandError: naming the file, the model's bands and the file's.
    """
    names = [canonical_band(d) for d in info.descriptions]
    shown = tuple(d or f"band {i + 1}" for i, d in enumerate(info.descriptions))
    out: list[int] = []
    for band in spec.bands:
        src = (mapping or {}).get(band)
        if isinstance(src, int):
            if src > info.count:
                raise DataBandError(info.path, spec.name, spec.bands, shown)
            out.append(src)
        elif src is not None or canonical_band(band) in names:
            key = canonical_band(src if isinstance(src, str) else band)
            if key not in names:
                raise DataBandError(info.path, spec.name, spec.bands, shown)
            out.append(names.index(key) + 1)
        elif mapping is None and not any(names) and info.count == spec.num_bands:
            return list(range(1, info.count + 1))
        else:
            raise DataBandError(info.path, spec.name, spec.bands, shown)
    return out


def read_window(path: str, bands: list[int], y0: int, x0: int, h: int, w: int, fill: float = math.nan) -> np.ndarray:
    """(C, h, w) float64 of ``bands`` in the box at (``y0``, ``x0``); pixels outside the raster = ``fill``.

    Raises:
        DataReadError: the file cannot be read.
    """
    rio = _rasterio()
    from rasterio.windows import Window

    info = raster_info(path)
    H, W = info.shape
    out = np.full((len(bands), h, w), fill, dtype=np.float64)
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if cy0 >= cy1 or cx0 >= cx1:
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rio.errors.NotGeoreferencedWarning)
            with rio.open(path) as src:
                block = src.read(bands, window=Window(cx0, cy0, cx1 - cx0, cy1 - cy0))
    except rio.errors.RasterioError as err:
        raise DataReadError(f"{path}: cannot read pixels ({err})") from None
    out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block
    return out


def read_band(path: str, band: int = 1) -> np.ndarray:
    """The whole band ``band`` (1-based) of a raster as (H, W) float64."""
    info = raster_info(path)
    if band > info.count:
        raise DataReadError(f"{path}: has {info.count} band(s), no band {band}")
    return read_window(path, [band], 0, 0, *info.shape)[0]


def to_units(raw: np.ndarray, nodata: float | None, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Raw values -> float32 physical units; ``nodata`` and non-finite values become NaN."""
    x = np.asarray(raw, dtype=np.float64)
    if nodata is not None and not math.isnan(nodata):
        x = np.where(x == nodata, np.nan, x)
    return (x * scale + offset).astype(np.float32)


def _open_image(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataReadError(f"{path}: cannot read the image ({err})") from None
    return im


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError) as err:
        raise DataReadError(f"{path}: cannot read the image ({err})") from None


RGB = ("R", "G", "B")


def rgb_indices(path: Path, spec: ModalitySpec) -> list[int]:
    """Channels of an RGB image holding the model's bands, in the model's order.

    Raises:
        DataBandError: the model wants bands an RGB image does not have (e.g. NIR), naming ``path``.
    """
    if any(b not in RGB for b in spec.bands):
        raise DataBandError(path, spec.name, spec.bands, RGB)
    return [RGB.index(b) for b in spec.bands]


def read_rgb(path: Path, spec: ModalitySpec) -> np.ndarray:
    """(C, H, W) float32 of an RGB image's channels in the model's band order (``R``, ``G``, ``B`` subset).

    Raises:
        DataReadError: unreadable image.
        DataBandError: see :func:`rgb_indices`.
    """
    idx = rgb_indices(path, spec)
    with _open_image(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return arr.transpose(2, 0, 1)[idx]


def read_mask(path: Path) -> np.ndarray:
    """(H, W) raw values of a single-channel label image (PNG/TIFF; palette images give their indices).

    Raises:
        DataReadError: unreadable, or a colour image whose channels differ (colour-coded labels).
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_band(str(path))
    with _open_image(path) as im:
        arr = np.asarray(im.convert("L") if im.mode == "1" else im)  # bilevel: white = 255, as in greyscale
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataReadError(f"{path}: a colour label image; labels must be one channel of class values")
        arr = arr[..., 0]
    return arr
