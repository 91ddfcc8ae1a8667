"""Random geo-windows from a Zarr cube in the ``pipeline.cube.layout`` layout, written from real eo-learn pixels.

The cube has an ``s2`` group (the 5 eo-learn Sentinel-2 reference scenes on a 10 m grid in EPSG:32633, the two
fully cloudy dates marked invalid) and an ``hr`` group at 2.5 m that is the nearest-neighbour 4x copy of the same
scenes' red/green/blue, starting one 10 m pixel south-east of the S2 grid: so footprint alignment is checkable
exactly (HR 4x4 block means == S2 pixels) and the HR offset is non-zero.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import shared_path

from pipeline.modalities import get_modality

DATA = shared_path()
SCENES = DATA / "eolearn_slovenia" / "reference_scenes"
pytestmark = pytest.mark.skipif(not SCENES.is_dir(), reason="needs ../shared/data")
CLOUDY = (1, 2)  # 2015-07-31 and 2015-08-20 are fully cloudy (README)


def write_cube(url: Path) -> tuple[np.ndarray, list[np.datetime64]]:
    import rasterio
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from pipeline.cube import layout

    files = sorted(SCENES.glob("S2L1C_*.tif"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(files[0]) as src:
            names, crs, t0 = list(src.descriptions), src.crs, src.transform
        stack = np.stack([rasterio.open(f).read() for f in files]).astype("float32")  # (5, 13, 101, 100)
    bands = list(get_modality("s2").bands)
    s2 = stack[:, [names.index(b) for b in bands]] * 10000.0  # reflectance -> x 10000
    dates = [np.datetime64(f"{f.stem[6:10]}-{f.stem[10:12]}-{f.stem[12:14]}") for f in files]
    T, _, H, W = s2.shape
    left, top = round(t0.c), round(t0.f)  # [test] snap the 9.995 m eo-learn grid to an exact 10 m grid
    layout.write_root(str(url), {"modalities": ["s2", "hr"]})
    valid = np.ones((T, H, W), dtype="uint8")
    valid[list(CLOUDY)] = 0
    gb = GeoBox((H, W), Affine(10, 0, left, 0, -10, top), crs)
    ds = layout.template(gb, dates, bands, (1, 64, 64), {}, {"units": "L1C TOA reflectance x 10000"})
    ds["data"], ds["valid"] = (("time", "band", "y", "x"), s2), (("time", "y", "x"), valid)
    ds.to_zarr(str(url), group="s2", mode="w", zarr_format=3, consolidated=False)
    rgb = stack[:, [names.index(b) for b in ("B04", "B03", "B02")], 1:, 1:] * 255.0  # starts 1 px south-east
    hr = rgb.repeat(4, axis=2).repeat(4, axis=3)
    gbh = GeoBox(hr.shape[-2:], Affine(2.5, 0, left + 10, 0, -2.5, top - 10), crs)
    dsh = layout.template(gbh, dates, ["R", "G", "B"], (1, 128, 128), {}, {"units": "8-bit DN"})
    dsh["data"] = (("time", "band", "y", "x"), hr)
    dsh["valid"] = (("time", "y", "x"), np.ones(hr[:, 0].shape, dtype="uint8"))
    dsh.to_zarr(str(url), group="hr", mode="w", zarr_format=3, consolidated=False)
    return s2, dates


def test_cube_windows_same_footprint_valid_dates_normalised(tmp_path: Path) -> None:
    from pipeline.train.cubes import CubeSource

    url = tmp_path / "slovenia.zarr"
    s2_raw, dates = write_cube(url)
    src = CubeSource(str(url), size=16, num_dates=3, min_valid=0.5)
    assert src.modalities == ("s2", "hr") and src.num_dates == {"s2": 3, "hr": 1}
    assert len(src) == 36  # 6 x 6 cells of 16 px; the HR group covers all but the first row/column of pixels
    spec2, spec_hr = get_modality("s2"), get_modality("hr")
    clear_doy = {int(np.datetime64(d, "D").astype(object).timetuple().tm_yday) for i, d in enumerate(dates)
                 if i not in CLOUDY}  # fmt: skip
    for i in range(len(src)):
        s = src.get(i, np.random.default_rng(i))
        assert s["s2"]["x"].shape == (3, 10, 16, 16) and s["hr"]["x"].shape == (1, 3, 64, 64)
        assert set(s["s2"]["doy"].tolist()) == clear_doy  # cloudy dates never drawn
        assert float(s["s2"]["gsd"]) == 10.0 and float(s["hr"]["gsd"]) == 2.5
    # Un-augmented window: exact footprint alignment and normalisation.
    s = src.get(7)
    y0, x0 = src.window(7, None)
    raw = s2_raw[[0, 3, 4], :, y0 : y0 + 16, x0 : x0 + 16]
    torch.testing.assert_close(s["s2"]["x"], spec2.normalize(torch.from_numpy(raw), band_axis=1))
    hr = s["hr"]["x"][0] * torch.tensor(spec_hr.std)[:, None, None] + torch.tensor(spec_hr.mean)[:, None, None]
    blocks = torch.nn.functional.avg_pool2d(hr[None], 4)[0] / 255.0 * 10000.0  # (3, 16, 16), back to x 10000
    want = torch.from_numpy(s2_raw[0, [2, 1, 0], y0 : y0 + 16, x0 : x0 + 16])  # B04 B03 B02 of the HR date
    torch.testing.assert_close(blocks, want, rtol=1e-4, atol=0.5)
    # A window at the grid origin reaches outside the HR group: those pixels are invalid, not wrapped.
    origin = next(k for k in range(len(src)) if tuple(src.cells[k]) == (0, 0))
    v = src.get(origin)["hr"]["valid"][0]
    assert not v[:4].any() and not v[:, :4].any() and v[4:, 4:].all()


def test_cube_source_errors(tmp_path: Path) -> None:
    from pipeline.train.cubes import CubeSource

    with pytest.raises(FileNotFoundError, match="no Zarr cube"):
        CubeSource(str(tmp_path / "missing.zarr"))
    url = tmp_path / "c.zarr"
    write_cube(url)
    with pytest.raises(ValueError, match="no 64 x 64 window"):
        CubeSource(str(url), size=64, min_valid=0.99)  # HR misses the first row/column of the only cell


def _window_lonlat(src, y0: int, x0: int) -> tuple[float, float]:
    """WGS84 centre of a window, computed here from the scene's own transform (not the cube's coordinates)."""
    import rasterio
    from pyproj import Transformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(sorted(SCENES.glob("S2L1C_*.tif"))[0]) as f:
            crs, t = f.crs, f.transform
    x = round(t.c) + (x0 + src.size / 2) * 10.0  # the cube snaps the scene's corner to whole metres (write_cube)
    y = round(t.f) - (y0 + src.size / 2) * 10.0
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)


def test_cube_samples_carry_the_region_of_their_location(tmp_path: Path) -> None:
    from pipeline.ssl.regions import region_id
    from pipeline.train.cubes import CubeSource

    url = tmp_path / "slovenia.zarr"
    write_cube(url)
    src = CubeSource(str(url), size=16, num_dates=2, num_regions=4097)
    for i in (0, 7, 35):
        for rng in (None, np.random.default_rng(i)):
            s = src.get(i, rng)
            assert s["region"].dtype == torch.int64 and s["region"].shape == ()
            # Known answer: the patch (lon 14.551-14.564, lat 45.866-45.875) lies in cell 27 * 128 + 69 of 32 x 128.
            assert int(s["region"]) == 3525
    lon, lat = _window_lonlat(src, *src.window(7, None))
    assert 14.551 < lon < 14.564 and 45.866 < lat < 45.875
    assert int(CubeSource(str(url), size=16, num_regions=16).get(7)["region"]) == 12
    # The window, not the cube, decides: on a grid of ~1 km cells the 36 windows span 4 regions, each that of the
    # window's own centre.
    fine = CubeSource(str(url), size=16, num_regions=200_000_001)  # 8000 bands x 25000 sectors
    ids = set()
    for i in range(len(fine)):
        y0, x0 = fine.window(i, None)
        ids.add(int(fine.get(i)["region"]))
        assert fine.region(y0, x0) == region_id(*_window_lonlat(fine, y0, x0), 200_000_001)
    assert len(ids) == 4


def test_single_acquisition_modalities_take_one_date(tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.train.cubes import CubeSource

    url = tmp_path / "c.zarr"
    write_cube(url)
    # The number of dates follows the spec's ``temporal`` fact, not the group's name.
    specs = {"s2": replace(get_modality("s2"), temporal=False), "hr": replace(get_modality("hr"), temporal=True)}
    src = CubeSource(str(url), size=16, num_dates=3, specs=specs)
    assert src.num_dates == {"s2": 1, "hr": 3}
    s = src.get(0, np.random.default_rng(0))
    assert s["s2"]["x"].shape[0] == 1 and s["hr"]["x"].shape[0] == 3
