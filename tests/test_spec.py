"""The job spec: the shipped examples validate; invalid specs fail with the file, the field and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.spec import JobSpec, JobSpecError, load_job, parse_job

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
region: [-0.78, 38.08, -0.73, 38.13]
time: {start: 2019-09-17, end: 2019-09-18}
catalog: local
modalities: [s2, s1]
cube: {path: out/cube.zarr}
"""


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["cube-sen1floods11.yaml", "cube-slovenia.yaml"])
def test_shipped_examples_validate(name):
    job = load_job(REPO / "jobs" / name)
    assert isinstance(job, JobSpec)
    assert job.cube.path.startswith("outputs/") and job.cube.path.endswith(".zarr")
    assert job.output.kind in ("embeddings", "segmentation", "change")


def test_sen1floods11_example_fields():
    job = load_job(REPO / "jobs/cube-sen1floods11.yaml")
    assert job.name == "sen1floods11" and job.modalities == ["s2", "s1"]
    assert job.bbox == (-0.7819, 38.0828, -0.7359, 38.1288)
    assert job.crs is None and job.catalog == "local"
    assert (job.cube.chunks.y, job.cube.chunks.x) == (256, 256)


def test_defaults(tmp_path):
    job = load_job(_write(tmp_path, MINIMAL))
    assert job.name == "job"
    assert (job.cube.chunks.y, job.cube.chunks.x, job.cube.chunks.time) == (512, 512, 1)
    assert job.resolution == {} and job.crs is None and job.max_cloud is None
    assert job.output.kind is None and job.output.output_kind.name == "embeddings"  # the checkpoint may decide
    assert job.tiles.size == 256 and job.tiles.overlap == 48
    assert job.tiles.margin_px == 16 and job.tiles.context_radius == 8
    assert job.batch_size == 8 and job.actors == 1 and job.gpus_per_actor == 0
    assert job.checkpoint is None


def test_crs_is_normalised_and_urls_kept(tmp_path):
    job = load_job(_write(tmp_path, MINIMAL.replace("out/cube.zarr", "memory://bucket/c.zarr") + "crs: 32630\n"))
    assert job.crs == "EPSG:32630" and job.cube.path == "memory://bucket/c.zarr"


def test_geojson_region_relative_to_job_file(tmp_path):
    (tmp_path / "aoi").mkdir()
    geom = {"type": "Polygon", "coordinates": [[[14.55, 45.86], [14.57, 45.86], [14.57, 45.88], [14.55, 45.86]]]}
    (tmp_path / "aoi" / "region.geojson").write_text(json.dumps({"type": "Feature", "geometry": geom}))
    text = MINIMAL.replace("region: [-0.78, 38.08, -0.73, 38.13]", "region: aoi/region.geojson")
    job = load_job(_write(tmp_path, text))
    assert Path(job.region).is_absolute()
    assert job.bbox == (14.55, 45.86, 14.57, 45.88)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("region: [-0.78, 38.08, -0.73, 38.13]", "region: [1, 2, 0, 3]"), r"region: bbox \[1\.0, 2\.0, 0\.0, 3\.0\]"),
        (("region: [-0.78, 38.08, -0.73, 38.13]", "region: missing.geojson"), r"region: file 'missing\.geojson'"),
        (("end: 2019-09-18", "end: 2019-09-01"), r"time: start 2019-09-17 is after end 2019-09-01"),
        (("modalities: [s2, s1]", "modalities: [s2, s3]"), r"modalities\.1: unknown modality 's3'; known"),
        (("modalities: [s2, s1]", "modalities: []"), r"modalities: List should have at least 1 item"),
        (("modalities: [s2, s1]", "modalities: [s2, s2]"), r"modalities: modalities must not repeat"),
        (("cube: {path: out/cube.zarr}", "cube: {}"), r"cube\.path: Field required"),
        (("cube: {path: out/cube.zarr}", "cube: {path: c.zarr, chunks: {x: 0}}"), r"cube\.chunks\.x: .*greater than 0"),
        (("cube: {path: out/cube.zarr}", "cube: {path: c.zarr, chunks: {time: 2}}"), r"cube\.chunks\.time"),
        (("catalog: local", "catalog: local\nmax_cloud: 150"), r"max_cloud: .*less than or equal to 100"),
        (("catalog: local", "catalog: local\ncrs: EPSG:4326"), r"crs: .*not a projected CRS"),
        (("catalog: local", "catalog: local\nresolution: {s2: 7}"), r"resolution\.s2 must be one of"),
        (("catalog: local", "catalog: local\nresolution: {hr: 0.5}"), r"resolution given for 'hr'"),
        (("catalog: local", "catalog: local\ntiles: {size: 64, overlap: 32}"), r"tiles: overlap 32 must be less"),
        (("catalog: local", "catalog: local\ntiles: {size: 64, overlap: 12}"), r"tiles: .*multiple of 8"),
        (("catalog: local", "catalog: local\ntiles: {size: 64, overlap: 16, margin: 9}"), r"margin 9 must be at most"),
        (("catalog: local", "catalog: local\ntiles: {size: 64, overlap: 8, context: wide}"), r"tiles\.context"),
        (("catalog: local", "catalog: local\nbatch_size: 0"), r"batch_size: .*greater than 0"),
        (("catalog: local", "catalog: local\noutput: {kind: pictures}"), r"output\.kind: unknown output kind"),
        (("catalog: local", "catalog: local\nregoin: x"), r"regoin: unknown field"),
        (("catalog: local", "catalog: ./nope.yaml"), r"catalog: file '\./nope\.yaml' not found"),
    ],
)
def test_invalid_specs_name_file_and_field(tmp_path, change, expected):
    path = _write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(JobSpecError, match=expected) as err:
        load_job(path)
    assert str(path) in str(err.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = _write(tmp_path, MINIMAL + "cube: {path: [unclosed\n")
    with pytest.raises(JobSpecError, match=r"job\.yaml: line \d+, column \d+: not valid YAML"):
        load_job(path)


def test_missing_file_and_non_mapping():
    with pytest.raises(JobSpecError, match="not found"):
        load_job("/nonexistent/job.yaml")
    with pytest.raises(JobSpecError, match="must be a YAML mapping"):
        parse_job(["a", "list"])


def test_jobspec_error_is_a_value_error_for_the_cli():
    assert issubclass(JobSpecError, ValueError)


def _shipped_specs() -> list[Path]:
    return sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped_specs(), ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    """Region jobs, pre-training, fine-tuning and test-data specs each load with their own command's loader."""
    import yaml

    from pipeline.finetune.data import parse_data_spec
    from pipeline.finetune.spec import FinetuneSpec, load_finetune
    from pipeline.train.spec import PretrainSpec, load_pretrain_spec

    raw = yaml.safe_load(path.read_text()) or {}
    if path.name.startswith("pretrain-"):
        assert isinstance(load_pretrain_spec(path), PretrainSpec)
    elif "task" in raw:  # `skypipe finetune` specs name their task
        assert isinstance(load_finetune(path), FinetuneSpec)
    elif "format" in raw:  # test data of `skypipe eval <task> --test`
        assert parse_data_spec(raw, base_dir=path.parent, source=str(path)).format == raw["format"]
    else:
        assert isinstance(load_job(path), JobSpec)


def test_there_are_shipped_specs_of_every_command() -> None:
    names = [p.name for p in _shipped_specs()]
    assert any(n.startswith("pretrain-") for n in names) and any(n.startswith("finetune-") for n in names)
    assert len(names) >= 6


@pytest.mark.parametrize(
    ("command", "name", "meant"),
    [("run", "finetune-water-s2.yaml", "skypipe finetune"), ("run", "pretrain-tiny.yaml", "skypipe pretrain"),
     ("finetune", "demo-water.yaml", "skypipe run"), ("finetune", "detection-test-p1888.yaml", "skypipe eval")],
)  # fmt: skip
def test_a_spec_given_to_the_wrong_command_names_the_right_one(command, name, meant, capsys) -> None:
    from pipeline.cli import main

    assert main([command, str(REPO / "jobs" / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a spec for `{meant}" in err[0] and name in err[0]
