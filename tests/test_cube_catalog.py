"""End to end through the catalog layer: local catalog served on loopback (rustac + range server) -> search -> cube.

Also the real CLI (``skypipe cube build`` / ``info``) on a job YAML, and a cube on an fsspec ``memory://`` URL.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import xarray as xr
from catalog_fixtures import local_catalog_dir, local_stac_server  # noqa: F401
from test_cube_support import S1F_BBOX, require_data, s1f_items, s1f_sources

from pipeline.catalog import load_catalog
from pipeline.catalog.search import search
from pipeline.cli import main
from pipeline.cube import build_cube, cube_info, open_modality

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def test_served_catalog_search_then_cube_equals_local_read(local_stac_server, tmp_path):  # noqa: F811
    catalog = load_catalog("local")
    result = search(
        catalog,
        region=list(S1F_BBOX),
        start="2019-09-17",
        end="2019-09-19",
        modalities=["s2", "s1"],
        url=local_stac_server.url,
    )
    hrefs = [a.href for items in result.items.values() for it in items for a in it.assets.values()]
    assert hrefs and all(h.startswith(local_stac_server.assets_url) for h in hrefs)
    n_before = len(local_stac_server.asset_server.requests)
    served = str(tmp_path / "served.zarr")
    report = build_cube(served, result.items, result.sources, region=S1F_BBOX, chunks=(256, 256), progress=False)
    assert report.failures == {"s2": [], "s1": []}
    ranged = [r for r in local_stac_server.asset_server.requests[n_before:] if r[0] == "GET"]
    assert ranged and all(r[2] and r[2].startswith("bytes=") for r in ranged)  # every pixel read is a range request

    local = str(tmp_path / "local.zarr")
    build_cube(local, s1f_items(), s1f_sources(), region=S1F_BBOX, chunks=(256, 256), progress=False, quicklooks=False)
    for name in ("s2", "s1"):
        a, b = open_modality(served, name), open_modality(local, name)
        assert a.rio.crs == b.rio.crs and a.rio.transform() == b.rio.transform()
        np.testing.assert_array_equal(a["data"].values, b["data"].values)
        np.testing.assert_array_equal(a["valid"].values, b["valid"].values)
    assert open_modality(served, "s2").attrs["processing_level"] == "L1C"


def test_cli_build_and_info(local_catalog_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SKYPIPE_LOCAL_CATALOG", str(local_catalog_dir))
    cube = tmp_path / "out" / "cube.zarr"
    job = tmp_path / "job.yaml"
    job.write_text(
        "region: [-0.7819, 38.0828, -0.7359, 38.1288]\n"
        "time: {start: 2019-09-17, end: 2019-09-19}\n"
        "catalog: local\nmodalities: [s1]\n"
        f"cube: {{path: {cube}, chunks: {{y: 256, x: 256}}}}\n"
    )
    assert main(["cube", "build", str(job), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[s1] 1 date(s) x 2 band(s) x 521 x 417 px at 10 m, EPSG:32630" in out
    assert "quicklook" in out and (tmp_path / "out" / "cube.zarr.quicklooks" / "s1.png").is_file()
    assert main(["cube", "info", str(cube)]) == 0
    out = capsys.readouterr().out
    assert "2019-09-17" in out and "valid  94.8" in out
    # Run again: everything is already done.
    assert main(["cube", "build", str(job), "--no-progress"]) == 0
    assert "6 already done, 0 written" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["cube", "info", str(tmp_path / "nothing.zarr")]) == 2
    assert "no Zarr cube at" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("region: [0, 0, 1, 1]\n")
    assert main(["cube", "build", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: invalid job spec" in err and "cube: Field required" in err


def test_cube_on_memory_url():
    require_data()
    url = "memory://skypipe-test/cube.zarr"
    items, sources = s1f_items(), s1f_sources()
    report = build_cube(
        url, {"s1": items["s1"]}, {"s1": sources["s1"]}, region=S1F_BBOX, chunks=(256, 256), progress=False
    )
    ds = xr.open_zarr(url, group="s1", decode_coords="all", consolidated=False)
    assert ds.rio.crs.to_epsg() == 32630 and float(ds["valid"].mean()) > 0.9
    assert cube_info(url)["modalities"]["s1"]["valid_fraction"] == report.valid_fraction["s1"]
    assert report.quicklooks == ["memory://skypipe-test/cube.zarr.quicklooks/s1.png"]
    with fsspec.open(report.quicklooks[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fsspec.filesystem("memory").rm("/skypipe-test", recursive=True)
