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

from pipeline.modalities import get_modality

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
