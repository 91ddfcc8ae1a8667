"""Seamless tiled inference with the real backbone: the mosaic of overlapping tiles equals one untiled run.

Model: the committed pre-trained tiny checkpoint (the demo's model). Data: real Sentinel-2 L1C pixels of the
eo-learn Slovenia scenes (``tests/infer_fixtures.py``), 96 x 96 px at 10 m, 3 usable dates. Tiles of 64 px with
32 px overlap and a 16 px margin give 2 x 2 tiles; the reference is one 96 px tile over the whole grid.

With local context (stages 3-4 attend to a 17 x 17 neighbourhood) every output pixel far enough from a tile edge
is the same in every tile, so the stitched mosaic matches the untiled run and the seam metric of the mosaic equals
that of the untiled run (the model's own Swin window structure sits on the same aligned lines in both). With
global attention the tiles disagree everywhere: the same comparison shows it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from infer_fixtures import SCENES, write_cube

from pipeline.infer.actor import TileProcessor
from pipeline.infer.params import InferenceParams
from pipeline.infer.runner import prepare_store
from pipeline.mosaic.quality import seam_score
from pipeline.mosaic.stitch import open_mosaic, stitch_tiles

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "skysense_v2_tiny_ssl.pt"
GRID = 96
INNER = slice(0, GRID - 40)  # the far edges: padding differs between the runs within the receptive field (~40 px)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCENES.exists(), reason="eo-learn Slovenia sample data not available"),
    pytest.mark.skipif(not CHECKPOINT.exists(), reason="demo checkpoint not committed"),
]


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> str:
    return write_cube(tmp_path_factory.mktemp("seams") / "cube.zarr", size=(GRID, GRID), nodata_corner=0)


def _mosaic(cube: str, out: Path, size: int, overlap: int, margin: int, radius: int | None):
    params = InferenceParams(
        cube_url=cube, output_url=str(out), checkpoint=str(CHECKPOINT), kind="embeddings", modalities=("s2",),
        periods=[("2015-07-01", "2015-09-30")], tile_size=size, overlap=overlap, margin=margin, context_radius=radius,
    )  # fmt: skip
    plan = prepare_store(params)
    proc = TileProcessor(params)
    try:
        records = proc.process([(t.id, 1) for t in plan.tiles])
    finally:
        proc.close()
    assert [r["status"] for r in records] == ["done"] * len(plan.tiles)
    mosaic = open_mosaic(stitch_tiles(plan.url, str(out / "mosaic.zarr")))
    origins = np.array([(t.row, t.col) for t in plan.tiles])
    return mosaic["data"].values, origins


@pytest.mark.parametrize(("radius", "seamless"), [(8, True), (None, False)])
def test_tiled_mosaic_matches_one_untiled_run(cube, tmp_path, radius, seamless):
    tiled, origins = _mosaic(cube, tmp_path / "tiled", 64, 32, 16, radius)
    assert len(origins) == 4 and {tuple(o) for o in origins} == {(0, 0), (0, 32), (32, 0), (32, 32)}
    untiled, _ = _mosaic(cube, tmp_path / "untiled", GRID, 0, 0, radius)
    assert np.isfinite(tiled).all() and np.isfinite(untiled).all()

    scale = float(untiled.std())
    diff = np.abs(tiled - untiled)[:, INNER, INNER] / scale
    ratios = [
        seam_score(tiled, origins, 64, zones=z) / seam_score(untiled, origins, 64, zones=z) for z in (False, True)
    ]
    if seamless:
        assert diff.mean() < 1e-3 and diff.max() < 0.1  # the same map up to the model's far-field leak
        assert ratios == pytest.approx([1, 1], abs=0.05)  # tile borders no more visible than in the untiled map
    else:
        assert diff.mean() > 0.05  # global attention: every pixel carries its tile's context


def test_tiles_past_the_grid_edge_see_the_edge_not_padding(tmp_path):
    """A 100 px grid: the last tiles start at 40 (window-aligned) and stick out by 4 px. They are cut to the grid, so
    the mosaic's far edges equal one untiled run there too (no band of made-up zero pixels along the edges)."""
    cube = write_cube(tmp_path / "cube.zarr", size=(100, 100), nodata_corner=0)
    tiled, origins = _mosaic(cube, tmp_path / "tiled", 64, 32, 16, 8)
    assert {tuple(o) for o in origins} >= {(40, 40), (0, 40), (40, 0)}  # 40 + 64 = 104 > 100
    untiled, _ = _mosaic(cube, tmp_path / "untiled", 104, 0, 0, 8)  # one tile, cut to the 100 px grid as well
    assert tiled.shape[-2:] == (100, 100) and np.isfinite(tiled).all()
    diff = np.abs(tiled - untiled) / float(untiled.std())
    assert diff.mean() < 1e-3 and diff.max() < 0.1
    edge = np.zeros((100, 100), bool)
    edge[-8:, :] = edge[:, -8:] = True
    assert diff[:, edge].mean() < 1e-3  # the far-edge band is as faithful as the interior
