"""The job runner's pure parts: stage outputs, change periods, cube state, status of a job (no Ray)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from infer_fixtures import write_cube, write_job

from pipeline.cube.layout import cube_state
from pipeline.job.stages import JobContext, job_stages
from pipeline.job.status import format_status, job_status
from pipeline.spec import load_job


def _outputs(job) -> dict[str, str]:
    return {k: v for stage in job_stages(JobContext(job)) for k, v in stage.outputs().items()}


def test_paths_and_periods(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path / "job.yaml", "cube.zarr", str(tmp_path / "out"), "skysense_v2_tiny"))
    paths = _outputs(job)
    assert paths["tiles"] == f"{tmp_path}/out/tiles.zarr" and paths["archive"].endswith("out/archive")
    assert [s.name for s in job_stages(JobContext(job))] == ["cube", "inference", "mosaic", "cog", "archive",
                                                            "quicklook"]  # fmt: skip
    assert job.periods() == [(date(2015, 7, 1), date(2015, 9, 30))]
    change = load_job(write_job(tmp_path / "c.yaml", "cube.zarr", "out", "m", output={"kind": "change", "path": "out"}))
    before, after = change.periods()
    assert before == (date(2015, 7, 1), date(2015, 8, 15)) and after == (date(2015, 8, 16), date(2015, 9, 30))
    assert "classes_cog" in _outputs(change) and "archive" not in _outputs(change)


def test_cube_state_and_status(tmp_path: Path) -> None:
    assert cube_state(str(tmp_path / "none.zarr"), ["s2"]) == "missing"
    cube = write_cube(tmp_path / "cube.zarr", size=(32, 32))
    assert cube_state(cube, ["s2"]) == "complete"  # no build manifest: made by other means, nothing to resume
    assert cube_state(cube, ["s2", "s1"]) == "incomplete"
    (tmp_path / "cube.zarr.manifest").mkdir()
    assert cube_state(cube, ["s2"]) == "complete"  # the group was finalised (valid_fraction)
    job = load_job(write_job(tmp_path / "job.yaml", cube, str(tmp_path / "out"), "skysense_v2_tiny"))
    status = job_status(job)
    assert status["cube"]["state"] == "complete" and not status["tiles"]["present"]
    text = format_status(status)
    assert "tiles      none yet" in text and "mosaic     missing" in text


@pytest.mark.parametrize("kind", ["embeddings", "segmentation"])
def test_status_counts_tiles(tmp_path: Path, kind: str) -> None:
    from pipeline.infer.params import InferenceParams
    from pipeline.infer.runner import prepare_store
    from pipeline.infer.store import TileManifest

    cube = write_cube(tmp_path / "cube.zarr", size=(32, 32))
    job = load_job(write_job(tmp_path / "job.yaml", cube, str(tmp_path / "out"), "skysense_v2_tiny"))
    plan = prepare_store(InferenceParams(
        cube_url=cube, output_url=str(tmp_path / "out"), checkpoint="skysense_v2_tiny", kind=kind, modalities=("s2",),
        periods=job.periods(), tile_size=24, overlap=4, num_classes=2 if kind == "segmentation" else None,
    ))  # fmt: skip
    manifest = TileManifest(str(tmp_path / "out"))
    manifest.write({"tile_id": 0, "status": "done"})
    manifest.write({"tile_id": 1, "status": "failed", "error": "boom"})
    status = job_status(job)
    assert (status["tiles"]["total"], status["tiles"]["done"], status["tiles"]["failed"]) == (len(plan.tiles), 1, 1)
    assert "tile 1: boom" in format_status(status)


def test_explicit_change_periods_and_class_fields(tmp_path: Path) -> None:
    from pipeline.spec import JobSpecError

    before, after = {"start": date(2015, 7, 1), "end": date(2015, 7, 31)}, {"start": "2015-08-21", "end": "2015-09-30"}
    out = {"kind": "change", "path": "o", "before": before, "after": after}
    job = load_job(write_job(tmp_path / "c.yaml", "cube.zarr", "o", "m", output=out))
    assert job.periods() == [(date(2015, 7, 1), date(2015, 7, 31)), (date(2015, 8, 21), date(2015, 9, 30))]
    with pytest.raises(JobSpecError, match="both before and after"):
        load_job(write_job(tmp_path / "d.yaml", "cube.zarr", "o", "m", output={"kind": "change", "before": before}))
    with pytest.raises(JobSpecError, match="class_names"):
        seg = {"kind": "segmentation", "num_classes": 3, "class_names": ["a", "b"]}
        load_job(write_job(tmp_path / "e.yaml", "cube.zarr", "o", "m", output=seg))


def test_status_rate_and_eta_from_finish_stamps() -> None:
    from pipeline.job.status import rate

    stamps = {i: {"status": "done", "finished_at": f"2026-01-01T00:00:{2 * i:02d}+00:00"} for i in range(10)}
    r = rate(stamps, pending=30)
    assert r["tiles_per_h"] == pytest.approx(1800.0)  # one tile per 2 s
    assert r["eta_s"] == pytest.approx(60.0) and r["last_finished"].startswith("2026-01-01T00:00:18")
    assert rate({0: stamps[0]}, pending=3)["tiles_per_h"] is None  # one stamp: no rate yet
