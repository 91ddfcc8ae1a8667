"""Reading STAC assets onto a cube grid: asset checks, and odc-stac's reader as the reference for pixel values.

Why odc-stac and not stackstac (see ``shared/reference/stack-notes.md``): stackstac 0.5.1 accepts only one asset
per band, while local GeoTIFF catalogs (eo-learn's 13-band scenes, Sen1Floods11 chips) have multi-band assets;
it reads only ``proj:epsg``, which pystac 1.15 rewrites to ``proj:code`` when items come from a STAC API; and it
neither reproduces the exact native grid by default nor writes a ``spatial_ref`` coordinate. odc-stac 0.5 handles
``proj:code``, multi-band assets (``asset.N``), an explicit :class:`~odc.geo.geobox.GeoBox` and per-band
resampling out of the box.

Builds do not call :func:`load_bands` any more: :mod:`pipeline.cube.chunk_reader` reads the same pixels (the same
odc-stac metadata resolution and the same GDAL calls) with datasets kept open across chunks, which made the build's
read path 3-4x faster (``benchmarks/RESULTS.md``: a dask graph per row of chunks, and every COG tile decoded again for
every chunk and band, were most of odc-stac's cost). :func:`load_bands` stays as the reference the chunk reader is
tested against (``tests/test_cube_reader_perf.py``) and as the "before" of ``benchmarks/bench_cube.py``.

:func:`check_assets` opens every asset header once before anything is read, so missing files (HTTP 404),
unreadable headers and absent bands become per-item failures with the item id and href in the message; the cause
comes from :func:`pipeline.catalog.diagnose.diagnose` (status codes and probes, not GDAL's wording). Every open uses
the one GDAL configuration, :mod:`pipeline.catalog.gdal`. An :class:`AssetProblem` holds the href without its
token (:func:`pipeline.catalog.redact.public_href`): problems are stored in the cube and its manifest, and logged.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dask.array as da
import odc.stac
import pystac
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.errors import NotGeoreferencedWarning, WindowError
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from pipeline.catalog.diagnose import diagnose
from pipeline.catalog.gdal import GDAL_ENV, gdal_path
from pipeline.catalog.redact import public_href, redact

log = logging.getLogger(__name__)

# odc-loader warps into a bare numpy array and rasterio then warns that the destination "has no geotransform",
# although dst_transform is given: harmless, silenced for rasterio.warp only.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.warp")

__all__ = ["AssetProblem", "asset_href", "check_assets", "find_unreadable", "load_bands", "split_band_ref"]


def split_band_ref(ref: str) -> tuple[str, int]:
    """``"key.N"`` -> (``key``, N) for band N (1-based) of a multi-band asset; ``"key"`` -> (``key``, 1)."""
    key, sep, idx = ref.rpartition(".")
    if sep and idx.isdigit():
        return key, int(idx)
    return ref, 1


def asset_href(item: pystac.Item, key: str) -> str:
    """Absolute href of asset ``key`` of ``item``."""
    return item.assets[key].get_absolute_href() or item.assets[key].href


@dataclass(frozen=True)
class AssetProblem:
    """One asset of one item that cannot be used, with what to do about it.

    The one stored and shown form of a problem: ``href`` is kept without its token and ``error`` / ``hint`` are
    redacted when the problem is made, whatever the caller passed.
    """

    item: str
    asset: str
    href: str
    error: str
    hint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "href", public_href(self.href))
        object.__setattr__(self, "error", redact(self.error))
        object.__setattr__(self, "hint", redact(self.hint))

    def message(self) -> str:
        """One line naming the item, the asset and the remedy."""
        return f"item {self.item!r} asset {self.asset!r} ({self.href}): {self.error.rstrip('.')}. {self.hint}"


def check_assets(
    items: Sequence[pystac.Item],
    band_refs: Sequence[str],
    patch_url: Callable[[str], str] | None = None,
    max_workers: int = 16,
) -> tuple[list[AssetProblem], dict[str, str]]:
    """Open the header of every asset the cube needs.

    Returns:
        The problems found (one per unusable asset) and the CRS of each readable item (``item id -> EPSG``),
        used to report sources that will be reprojected.

    """
    keys = sorted({split_band_ref(r)[0] for r in band_refs})
    max_band = {k: max(split_band_ref(r)[1] for r in band_refs if split_band_ref(r)[0] == k) for k in keys}
    jobs = [(item, key) for item in items for key in keys]

    def probe(job: tuple[pystac.Item, str]) -> tuple[str, str, AssetProblem | None]:
        item, key = job
        href = asset_href(item, key)
        read_href = patch_url(href) if patch_url else href
        try:
            with rasterio.Env(**GDAL_ENV), rasterio.open(gdal_path(read_href)) as src:
                if src.count < max_band[key]:
                    err = f"has {src.count} band(s) but band {max_band[key]} is requested"
                    return item.id, "", AssetProblem(item.id, key, href, err, "Fix the band mapping in the catalog")
                return item.id, str(src.crs), None
        except Exception as exc:  # rasterio raises several types; all mean "unusable"
            why = diagnose(read_href, exc)
            hint = f"{why.hint[0].upper()}{why.hint[1:]}; this item is skipped"
            return item.id, "", AssetProblem(item.id, key, href, why.describe(), hint)

    problems: list[AssetProblem] = []
    crs_of: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        for item_id, crs, problem in pool.map(probe, jobs):
            if problem is not None:
                problems.append(problem)
            elif crs:
                crs_of.setdefault(item_id, crs)
    return problems, crs_of


def find_unreadable(
    items: Sequence[pystac.Item],
    band_refs: Sequence[str],
    bounds: tuple[float, float, float, float],
    crs: str,
    patch_url: Callable[[str], str] | None = None,
) -> list[AssetProblem]:
    """Which assets fail to read inside ``bounds`` (in ``crs``): names the culprit after a failed chunk read.

    GDAL's read errors often omit the file name ("Read failed. See previous exception"), so each asset of the
    date's items is read again over the chunk's footprint, one at a time.
    """
    problems = []
    for item in items:
        for key in sorted({split_band_ref(r)[0] for r in band_refs}):
            idx = sorted({split_band_ref(r)[1] for r in band_refs if split_band_ref(r)[0] == key})
            href = asset_href(item, key)
            read_href = patch_url(href) if patch_url else href
            try:
                with rasterio.Env(**GDAL_ENV), rasterio.open(gdal_path(read_href)) as src:
                    left, bottom, right, top = transform_bounds(crs, src.crs, *bounds, densify_pts=21)
                    win = from_bounds(left, bottom, right, top, src.transform)
                    win = win.intersection(Window(0, 0, src.width, src.height)).round_offsets().round_lengths()
                    src.read(idx, window=win)
            except WindowError:
                continue  # no overlap with this chunk
            except Exception as exc:
                why = diagnose(read_href, exc)
                hint = f"Its pixel data cannot be read: {why.hint}"
                problems.append(AssetProblem(item.id, key, href, why.describe(), hint))
    return problems


def load_bands(
    groups: Sequence[Sequence[pystac.Item]],
    band_refs: Sequence[str],
    geobox: GeoBox,
    chunks: tuple[int, int],
    resampling: Sequence[str],
    nodata: float | None = None,
    fail_on_error: bool = True,
    patch_url: Callable[[str], str] | None = None,
) -> tuple[list[da.Array], list[float | None]]:
    """Lazily read assets onto ``geobox`` as raw source values, one time step per group of items, with odc-stac.

    The reference for :class:`pipeline.cube.chunk_reader.ChunkReader`, which builds use (same values, faster).

    With a known ``nodata`` the bands are read and warped in their own dtype (GDAL warps uint16 about twice as
    fast as float32 with a NaN fill, and the chunk is half the size); without one they are read as float32 so
    that pixels no item covers come back as NaN instead of a plausible 0.

    Args:
        groups: items per output time step (each non-empty); items of one group are mosaicked (first valid wins).
        band_refs: asset references (``key`` or ``key.N``), one per output band.
        geobox: the target grid; sources in other CRSs are reprojected onto it.
        chunks: (y, x) chunk shape of the dask arrays.
        resampling: GDAL resampling name per band (``bilinear`` for reflectance, ``nearest`` for classes).
        nodata: source nodata overriding the items' ``raster:bands`` value.
        fail_on_error: raise on unreadable data; ``False`` fills the failing reads with nodata instead.
        patch_url: href rewriter applied at read time (re-signing tokens of signed catalogs).

    Returns:
        One (time, y, x) dask array per band, chunks (1, *chunks), and the fill value of each band (the source
        nodata, or NaN) for :func:`pipeline.cube.writer.to_units` to turn into NaN. Bands are stacked per chunk
        by the caller (a dask rechunk across bands would add a task layer per chunk for nothing).

    """
    flat = [item for group in groups for item in group]
    group_of = [g for g, group in enumerate(groups) for _ in group]
    unique_refs = list(dict.fromkeys(band_refs))
    kwargs = {} if nodata is None else {"nodata": nodata}
    with rasterio.Env(**GDAL_ENV):  # odc-stac captures this environment into its read tasks
        ds = odc.stac.load(
            flat,
            bands=unique_refs,
            geobox=geobox,
            groupby=lambda _item, _parsed, idx: group_of[idx],
            resampling=dict(zip(band_refs, resampling)),
            dtype=None if nodata is not None else "float32",
            chunks={"time": 1, "y": chunks[0], "x": chunks[1]},
            fail_on_error=fail_on_error,
            patch_url=patch_url,
            **kwargs,
        )
    if ds.sizes["time"] != len(groups):
        raise RuntimeError(f"odc-stac returned {ds.sizes['time']} time steps for {len(groups)} groups")
    fills = [None if ds[r].attrs.get("nodata") is None else float(ds[r].attrs["nodata"]) for r in band_refs]
    return [ds[r].data for r in band_refs], fills
