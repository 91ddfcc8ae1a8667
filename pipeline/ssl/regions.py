"""Geographic regions of GCPL: which set of prototypes a sample's location selects.

The reference gives only the count (4096 regions x 100 prototypes, section 4), not how the globe is cut. [ours]
Region ids ``0 .. num_regions - 2`` are the cells of an equal-area latitude/longitude grid; the last id,
``num_regions - 1``, is reserved for samples whose location is unknown.

Grid: ``n_lat`` latitude bands of equal area (equal steps of ``sin(lat)``) times ``n_lon`` longitude sectors of
equal width starting at 180 degrees west, so every cell covers the same area and no polar cell is a sliver that
a handful of samples would own. ``n_lat`` is the divisor of ``num_regions - 1`` closest (in ratio) to
``sqrt((num_regions - 1) / pi)``, which makes the equatorial cells about square; ``n_lon`` is the co-divisor.
The id of a cell is ``band * n_lon + sector`` (band 0 southernmost). Examples: ``num_regions=4097`` gives
32 x 128 cells of 124,500 km2 (2.8 degrees of longitude); ``16`` gives 3 x 5 (bands split at +-19.47 degrees
latitude, sectors 72 degrees wide); ``2`` gives one cell for the whole globe.

Unknown location [ours]: image folders, change pairs and BigEarthNet patches without a CRS default to
``num_regions - 1`` (a job spec may place such a source with ``region``). Not region 0: that is a real cell (the
Antarctic / south Pacific corner) whose prototypes would be taken over by HR scene folders, the bulk of a small
recipe. Nor "skip GCPL for them": the prototype objective would then vanish for most batches of such recipes.
A dedicated prototype set keeps the SwAV-style objective for them without mixing their semantics into any
place's prototypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

DEFAULT_NUM_REGIONS = 16
"""GCPL regions of the meta-architecture when a job gives none: 15 grid cells (3 x 5) + unknown."""


def check_num_regions(num_regions: int) -> None:
    """Raise ValueError unless ``num_regions`` can hold one grid cell and the unknown id."""
    if int(num_regions) != num_regions or num_regions < 2:
        raise ValueError(f"num_regions must be an integer >= 2 (grid cells + 1 unknown), got {num_regions}")


def unknown_region(num_regions: int) -> int:
    """The id of samples whose location is unknown: the last one."""
    check_num_regions(num_regions)
    return num_regions - 1


@lru_cache(maxsize=64)
def region_grid(num_regions: int) -> tuple[int, int]:
    """``(n_lat, n_lon)`` latitude bands x longitude sectors of the ``num_regions - 1`` geographic cells."""
    check_num_regions(num_regions)
    n = num_regions - 1
    target = math.sqrt(n / math.pi)
    divisors = {d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)}
    n_lat = min(sorted(divisors), key=lambda d: abs(math.log(d / target)))
    return n_lat, n // n_lat


def region_id(lon: float, lat: float, num_regions: int) -> int:
    """The grid cell (see module docstring) holding the point ``lon``, ``lat`` (WGS84 degrees).

    Longitudes wrap (180 and -180 are the same meridian); a point on a cell edge belongs to the cell north / east
    of it, except at the north pole and the last sector.

    Raises:
        ValueError: when ``lat`` is outside [-90, 90] or either coordinate is not finite.
    """
    if not (math.isfinite(lon) and math.isfinite(lat)) or abs(lat) > 90:
        raise ValueError(f"not a WGS84 position (lon, lat in degrees): ({lon}, {lat})")
    n_lat, n_lon = region_grid(num_regions)
    band = min(int((math.sin(math.radians(lat)) + 1) / 2 * n_lat), n_lat - 1)
    sector = min(int((lon + 180) % 360 / 360 * n_lon), n_lon - 1)
    return band * n_lon + sector


def region_bounds(region: int, num_regions: int) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` in degrees of the grid cell ``region``."""
    n_lat, n_lon = region_grid(num_regions)
    if not 0 <= region < n_lat * n_lon:
        raise ValueError(f"region {region} is not a grid cell: cells are 0..{n_lat * n_lon - 1}")
    band, sector = divmod(region, n_lon)
    lat = [math.degrees(math.asin(max(-1.0, min(1.0, 2 * b / n_lat - 1)))) for b in (band, band + 1)]
    return -180 + 360 * sector / n_lon, lat[0], -180 + 360 * (sector + 1) / n_lon, lat[1]


def resolve_region(region: int | Sequence[float] | None, num_regions: int) -> int:
    """The id a source without georeference gives its samples.

    Args:
        region: an id in ``[0, num_regions)``, a ``(lon, lat)`` position to bin with :func:`region_id`, or None
            for the unknown-location id.
        num_regions: GCPL regions of the job.

    Raises:
        ValueError: for an id out of range or a position that is not (lon, lat).
    """
    if region is None:
        return unknown_region(num_regions)
    if isinstance(region, Sequence):
        if len(region) != 2:
            raise ValueError(f"a region position is (lon, lat) in degrees, got {list(region)}")
        return region_id(float(region[0]), float(region[1]), num_regions)
    check_num_regions(num_regions)
    if not 0 <= int(region) < num_regions:
        raise ValueError(
            f"region id {region} is out of range [0, {num_regions}) for num_regions={num_regions} "
            f"({num_regions - 1} = unknown location); give a (lon, lat) position to have it binned"
        )
    return int(region)
