"""The per-batch inference logic without Ray: tile store writes, manifest, nodata skips, determinism, faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from infer_fixtures import write_checkpoint, write_cube

from pipeline.infer.actor import TileProcessor, parse_faults
from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import prepare_store
from pipeline.infer.store import TileManifest, TileStoreMismatchError

PERIOD = [("2015-07-01", "2015-09-30")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("actor")
    return {
        "cube": write_cube(root / "cube.zarr", size=(48, 48), nodata_corner=24),
        "checkpoint": write_checkpoint(root / "micro.pt"),
        "root": str(root),
    }


def _processor(setup: dict[str, str], out: Path, kind: str = "embeddings", **kw: object) -> TileProcessor:
    num_classes = kw.pop("num_classes", None)
    params = InferenceParams(cube_url=setup["cube"], output_url=str(out), checkpoint=setup["checkpoint"], kind=kind,
                             modalities=("s2",), periods=PERIOD, tile_size=16, overlap=4,
                             num_classes=num_classes)  # type: ignore[arg-type]  # fmt: skip
    plan = prepare_store(params)
    assert len(plan.tiles) == 16  # starts 0, 12, 24, 32 per axis
    return TileProcessor(params, **kw)  # type: ignore[arg-type]


def test_tiles_are_written_chunk_aligned_with_manifest(setup: dict[str, str], tmp_path: Path) -> None:
    proc = _processor(setup, tmp_path / "out")
    results = [r for batch in proc.run([[0, 1, 2], [15, 5]]) for r in batch]
    assert [r["status"] for r in results] == ["done", "done", "done", "skipped", "done"]
    assert results[3]["reason"] == "all-nodata"  # tile 15 lies inside the nodata corner
    g = zarr.open_group(str(tmp_path / "out" / "tiles.zarr"), mode="r")
    assert g["data"].shape == (16, 64, 16, 16) and g["data"].chunks == (1, 64, 16, 16)
    assert g["valid"].chunks == (1, 16, 16) and g["pooled"].chunks == (1, 64)
    assert g["origin"][5].tolist() == [12, 12]
    data, valid = g["data"][0], g["valid"][0]
    assert valid.all() and np.isfinite(data).all()
    np.testing.assert_allclose(g["pooled"][0], data.mean(axis=(1, 2)), rtol=1e-5)
    assert np.isnan(g["data"][15]).all() and not g["valid"][15].any()  # never written: fill values
    assert np.isnan(g["data"][3]).all()  # not processed
    records = TileManifest(str(tmp_path / "out")).read_all()
    assert sorted(records) == [0, 1, 2, 5, 15]
    assert records[5]["origin"] == [12, 12] and records[5]["attempts"] == 1 and records[5]["index"] == 5
    attrs = g.attrs.asdict()
    assert attrs["grid"]["transform"] == [10.0, 0.0, 465180.0, 0.0, -10.0, 5080250.0]
    assert attrs["provenance"]["preprocessing"]["s2"]["bands"][0] == "B02"
    assert len(attrs["provenance"]["checkpoint_sha256"]) == 64
    assert proc.stats["tiles"] == 5
    # a partly valid tile (crosses the nodata corner): NaN exactly where no input was valid
    v5, d5 = g["valid"][5].astype(bool), g["data"][5]
    assert 0 < v5.mean() < 1 and np.isnan(d5[:, ~v5]).all() and np.isfinite(d5[:, v5]).all()


def test_outputs_do_not_depend_on_batch_composition(setup: dict[str, str], tmp_path: Path) -> None:
    a, b = _processor(setup, tmp_path / "a"), _processor(setup, tmp_path / "b")
    list(a.run([[0, 1, 4]]))
    list(b.run([[4], [1, 0]]))
    ga, gb = (zarr.open_group(str(tmp_path / n / "tiles.zarr"), mode="r") for n in "ab")
    for name in ("data", "valid", "pooled"):
        assert np.array_equal(ga[name][:], gb[name][:], equal_nan=True), name


def test_segmentation_and_change_kinds(setup: dict[str, str], tmp_path: Path) -> None:
    seg = _processor(setup, tmp_path / "seg", kind="segmentation", num_classes=3)
    assert seg.process([(0, 1)])[0]["status"] == "done"
    g = zarr.open_group(str(tmp_path / "seg" / "tiles.zarr"), mode="r")
    assert g["data"].shape[1] == 3 and g.attrs["channels"] == ["class_0", "class_1", "class_2"]
    params = InferenceParams(cube_url=setup["cube"], output_url=str(tmp_path / "chg"), checkpoint=setup["checkpoint"],
                             kind="change", modalities=("s2",), tile_size=16, overlap=4,
                             periods=[("2015-07-01", "2015-07-31"), ("2015-08-21", "2015-09-30")])  # fmt: skip
    prepare_store(params)
    chg = TileProcessor(params)
    assert chg.process([(0, 1)])[0]["status"] == "done"
    g = zarr.open_group(str(tmp_path / "chg" / "tiles.zarr"), mode="r")
    assert g.attrs["channels"] == ["no_change", "change"] and np.isfinite(g["data"][0]).all()


def test_reopening_with_another_model_or_tiling_is_refused(setup: dict[str, str], tmp_path: Path) -> None:
    _processor(setup, tmp_path / "out")
    common = {"cube_url": setup["cube"], "output_url": str(tmp_path / "out"), "kind": "embeddings",
              "modalities": ["s2"], "periods": PERIOD, "tile_size": 16}  # fmt: skip
    prepare_store(InferenceParams(**common, checkpoint=setup["checkpoint"], overlap=4))  # same job: fine
    with pytest.raises(TileStoreMismatchError, match="overlap"):
        prepare_store(InferenceParams(**common, checkpoint=setup["checkpoint"], overlap=2))
    with pytest.raises(TileStoreMismatchError, match="checkpoint_sha256"):
        prepare_store(InferenceParams(**common, checkpoint="skysense_v2_tiny", overlap=4))


def test_injected_errors_are_per_tile(setup: dict[str, str], tmp_path: Path) -> None:
    assert parse_faults("3:exit-once, 7:exit,9:raise,4") == {3: "exit-once", 7: "exit", 9: "raise", 4: "exit"}
    with pytest.raises(ValueError, match="bad entry"):
        parse_faults("x:boom")
    proc = _processor(setup, tmp_path / "out", faults={1: "raise"})
    results = proc.process([(0, 1), (1, 2)])
    assert [r["status"] for r in results] == ["done", "error"]
    assert "injected fault" in results[1]["error"] and results[1]["attempts"] == 2
    assert TileManifest(str(tmp_path / "out")).read(1) is None  # errors are the driver's to record
