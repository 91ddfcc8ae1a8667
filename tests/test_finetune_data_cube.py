"""Fine-tuning data from a Zarr cube of the real Slovenia scenes plus real land-cover labels (raster and polygons)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
from infer_fixtures import MICRO, write_cube
from scipy.ndimage import maximum_filter
from shared_data import needs_shared, require

from pipeline.finetune.data import label_stats, open_dataset, parse_data_spec
from pipeline.finetune.data.cubelabels import LabelExtentError
from pipeline.finetune.data.readers import DataBandError
from pipeline.finetune.sample import IGNORE, batch_inputs, collate
from pipeline.modalities import DEFAULT_MODALITIES, HR, HR_RGBN, S2
from pipeline.model import create_model

pytestmark = needs_shared("eolearn_slovenia")
MODEL = dict(DEFAULT_MODALITIES)
NAMES = ["cultivated land", "forest", "grassland", "shrubland", "artificial surface"]


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> str:
    """S2 (10 m, 5 dates, 64 x 64) and HR (2.5 m, 256 x 256) of the real scenes on EPSG:32633."""
    return write_cube(tmp_path_factory.mktemp("cube") / "slovenia.zarr", size=(64, 64), hr=True)


def _data(cube: str, labels: str | Path, **kw: object) -> dict:
    """A cube data spec; ``labels`` is a file of ``eolearn_slovenia/`` or an absolute path."""
    labels = labels if Path(labels).is_absolute() else require(f"eolearn_slovenia/{labels}")
    return {"format": "cube", "path": cube, "labels": str(labels), "size": 64,
            "label_nodata": [0], "split": {"fractions": [1, 0, 0]}} | kw  # fmt: skip


def _polygons(cube: str, labels: str | Path = "lulc_polygons.gpkg", **kw: object) -> dict:
    return _data(cube, labels, **({"class_column": "LULC_ID", "name_column": "LULC_NAME"} | kw))


def test_cube_raster_labels_contract(cube: str) -> None:
    src = open_dataset(parse_data_spec(_data(cube, "lulc.tif")), "train", MODEL, train=False)
    assert src.task == "segmentation" and src.modalities == ("s2", "hr") and src.classes == NAMES  # from the tag
    assert len(src) == 16  # 4 x 4 windows of 64 HR px (= 16 S2 px) over the 256 px HR grid
    s = src.get(5)
    hr, s2 = s["periods"][0]["hr"], s["periods"][0]["s2"]
    assert hr["x"].shape == (1, 3, 64, 64) and float(hr["gsd"]) == 2.5
    assert s2["x"].shape == (5, 10, 16, 16) and float(s2["gsd"]) == 10.0
    assert s2["doy"].tolist() == [192, 212, 232, 242, 252]
    assert not s2["valid"][1].any() and s2["valid"][0].all()  # a cloudy date is invalid, a clear one valid
    assert s["label"].shape == (64, 64) and s["label"].dtype == torch.int64  # on the HR (finest) grid
    last = src.get(15)  # the bottom-right window holds the cube's nodata corner: invalid inputs
    assert not last["periods"][0]["s2"]["valid"][0, -2:, -2:].any()
    assert torch.equal(s["label"], src.get(5)["label"])
    again = pickle.loads(pickle.dumps(src)).get(5)  # DataLoader workers get a copy with its own Zarr handles
    assert torch.equal(again["label"], s["label"]) and torch.equal(again["periods"][0]["s2"]["x"], s2["x"])
    assert json.loads(json.dumps(src.describe()))["dates"] == {"s2": 5, "hr": 1}
    stats = label_stats(src)
    assert sum(stats["counts"]) == (src.scenes[0].label.labels != IGNORE).sum()  # every labelled HR pixel
    assert stats["counts"][NAMES.index("forest")] > stats["counts"][NAMES.index("grassland")] > 0


def test_cube_vector_labels_in_any_crs_match_the_raster(cube: str, tmp_path: Path) -> None:
    raster = open_dataset(parse_data_spec(_data(cube, "lulc.tif")), "train", MODEL, train=False)
    vector = open_dataset(parse_data_spec(_polygons(cube)), "train", MODEL, train=False)
    assert vector.classes == ["cultivated land", "forest", "grassland", "schrubland", "artificial surface"]
    gdf = gpd.read_file(require("eolearn_slovenia/lulc_polygons.gpkg")).to_crs("EPSG:4326")
    gdf[["LULC_ID", "geometry"]].to_file(tmp_path / "lulc.geojson", driver="GeoJSON")
    lonlat = open_dataset(parse_data_spec(_polygons(cube, tmp_path / "lulc.geojson", name_column=None)),
                          "train", MODEL, train=False)  # fmt: skip
    assert lonlat.classes == ["1", "2", "3", "4", "8"]
    for i in (0, 5, 10):
        a, b, c = (src.get(i)["label"] for src in (raster, vector, lonlat))
        both = (a != IGNORE) & (b != IGNORE)
        assert (a == b)[both].float().mean() > 0.95  # the README: rasterised polygons == lulc.tif
        assert (b == c).float().mean() > 0.99  # same polygons through EPSG:4326


def test_cube_blocked_split_time_range_and_training_views(cube: str) -> None:
    gap = 4
    data = _data(cube, "lulc.tif", split={"seed": 0, "fractions": [0.5, 0.25, 0.25], "block": 64, "gap": gap},
                 time={"start": "2015-08-25", "end": "2015-09-30"}, scale=[0.5, 2.0])  # fmt: skip
    spec = parse_data_spec(data)
    maps = {}
    for split in ("train", "val", "test"):
        src = open_dataset(spec, split, MODEL, train=False)
        canvas = np.zeros((256, 256), dtype=bool)
        for i, (_, top, left) in enumerate(src.windows):
            y, x = round(top), round(left)
            canvas[y : y + 64, x : x + 64] |= src.get(i)["label"].numpy() != IGNORE
        maps[split] = canvas
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert maps[a].any() and maps[b].any()
        assert not (maximum_filter(maps[a], size=2 * gap + 1) & maps[b]).any()
    train = open_dataset(spec, "train", MODEL, train=True)
    s = train.get(0, np.random.default_rng(0))
    assert s["periods"][0]["s2"]["doy"].tolist() == [242, 252]  # 2015-08-30 and 2015-09-09 only
    assert s["periods"][0]["hr"]["x"].shape == (1, 3, 64, 64) and s["label"].shape == (64, 64)
    # HR and S2 stay on the same ground after zoom/flips: HR (B04/B03/B02 repeated 4 x 4) pooled 4x4 ~ S2 B04
    r = s["periods"][0]["hr"]["x"][0, 0] * HR.std[0] + HR.mean[0]
    k = S2.bands.index("B04")
    b04 = s["periods"][0]["s2"]["x"][0, k] * S2.std[k] + S2.mean[k]
    valid = s["periods"][0]["s2"]["valid"][0]
    pooled = torch.nn.functional.avg_pool2d(r[None, None], 4)[0, 0]
    expected = (b04 / 3000 * 255).clamp(0, 255)
    assert torch.corrcoef(torch.stack([pooled[valid], expected[valid]]))[0, 1] > 0.9


def test_cube_errors_name_extents_and_bands(cube: str, tmp_path: Path) -> None:
    square = [[[0, 0], [0, 0.01], [0.01, 0.01], [0.01, 0], [0, 0]]]  # lon/lat near (0, 0): far from Slovenia
    feature = {"type": "Feature", "properties": {"c": 1}, "geometry": {"type": "Polygon", "coordinates": square}}
    far = {"type": "FeatureCollection", "features": [feature]}
    (tmp_path / "far.geojson").write_text(json.dumps(far))
    data = _data(cube, tmp_path / "far.geojson", class_column="c")
    with pytest.raises(LabelExtentError, match=r"far\.geojson: the labels \(EPSG:4326\) cover .* EPSG:32633.*extent"):
        open_dataset(parse_data_spec(data), "train", MODEL, train=False)
    with pytest.raises(Exception, match=r"class_column 'LULC' is not a column"):
        open_dataset(parse_data_spec(_polygons(cube, class_column="LULC")), "train", MODEL, train=False)
    with pytest.raises(DataBandError, match=r"slovenia\.zarr/hr: modality 'hr'.*'N'"):
        open_dataset(parse_data_spec(_data(cube, "lulc.tif")), "train", MODEL | {"hr": HR_RGBN}, train=False)


def test_cube_samples_feed_a_model(cube: str) -> None:
    """HR and S2 of one batch meet on the 10 m token grid of a micro model (the output-grid arithmetic holds)."""
    torch.manual_seed(0)
    model = create_model("skysense_v2_tiny", **MICRO).eval()
    specs = {m: model.config.modality(m) for m in ("s2", "hr")}
    src = open_dataset(parse_data_spec(_data(cube, "lulc.tif", scale=[0.5, 2.0])), "train", specs, train=True)
    batch = collate([src.get(i, np.random.default_rng(i)) for i in range(2)])
    with torch.no_grad():
        out = model.forward_features(batch_inputs(batch, "cpu")[0])
    assert out["fused"].shape[-2:] == (16, 16) and batch["label"].shape == (2, 64, 64)
