"""Raw source values -> cube units: nodata, scale/offset, linear -> dB, scene-classification masks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pipeline.cube.writer import to_units


def _plan(**kw) -> SimpleNamespace:
    base = {
        "bands": ["VV", "VH"],
        "scale": np.array([[1.0, 1.0]]),
        "offset": np.array([[0.0, 0.0]]),
        "linear_to_db": False,
        "mask_ref": None,
        "mask_invalid_values": [],
    }
    return SimpleNamespace(**{**base, **kw})


def test_nodata_becomes_nan_and_invalid():
    raw = np.array([[[[0, 5]], [[7, 0]]]], dtype="uint16")  # (1, 2 bands, 1, 2)
    data, valid = to_units(raw, [0.0, 0.0], _plan(), 0)
    assert data.dtype == np.float32 and valid.dtype == np.uint8
    assert np.isnan(data[0, 0, 0, 0]) and data[0, 0, 0, 1] == 5 and np.isnan(data[0, 1, 0, 1])
    assert valid.tolist() == [[[0, 0]]]


def test_scale_offset_per_date_and_band():
    raw = np.full((1, 2, 1, 1), 2000, dtype="uint16")
    plan = _plan(scale=np.array([[1.0, 1.0], [1.0, 0.5]]), offset=np.array([[0.0, 0.0], [-1000.0, 0.0]]))
    data, valid = to_units(raw, [None, None], plan, 1)
    assert data[0, :, 0, 0].tolist() == [1000.0, 1000.0] and valid.all()


def test_linear_to_db_and_non_positive_values():
    raw = np.array([[[[0.01, 1.0, 0.0]], [[0.1, 10.0, -1.0]]]], dtype="float32")
    data, valid = to_units(raw, [np.nan, np.nan], _plan(linear_to_db=True), 0)
    np.testing.assert_allclose(data[0, 0, 0, :2], [-20.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(data[0, 1, 0, :2], [-10.0, 10.0], atol=1e-5)
    assert np.isnan(data[0, :, 0, 2]).all() and valid.tolist() == [[[1, 1, 0]]]


def test_scene_classification_mask():
    # S2 SCL classes as the last raw band: 4 vegetation, 8/9 cloud, 3 shadow.
    raw = np.array([[[[100, 100, 100, 100]], [[200, 200, 200, 200]], [[4, 8, 9, 3]]]], dtype="uint16")
    plan = _plan(bands=["B04", "B08"], mask_ref="scl", mask_invalid_values=[3, 8, 9, 10])
    data, valid = to_units(raw, [0.0, 0.0, 0.0], plan, 0)
    assert data.shape == (1, 2, 1, 4) and valid.tolist() == [[[1, 0, 0, 0]]]
    assert np.isfinite(data).all()  # clouds are masked in `valid`, the values are kept
