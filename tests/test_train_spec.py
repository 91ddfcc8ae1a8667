"""The pre-training job spec: the shipped recipes validate; mistakes fail at the edge with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.train.spec import PretrainSpec, load_pretrain_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["pretrain-tiny", "pretrain-base"])
def test_shipped_recipes_validate(name: str) -> None:
    spec = load_pretrain_spec(ROOT / "jobs" / f"{name}.yaml")
    assert spec.steps > 0 and spec.batch_size % (spec.workers * spec.accumulation) == 0
    for path in [d.path for d in spec.data] + [spec.storage]:  # relative paths resolved, URLs kept
        assert "://" in path or Path(path).is_absolute()
    if name == "pretrain-base":
        assert spec.model.name == "skysense_v2_base" and spec.use_gpu and spec.resolved_precision() == "bf16"
        assert spec.resolved_parallel() == "ddp" and spec.workers >= 8


def _spec(**over: object) -> dict:
    return {"data": [{"kind": "images", "path": "x"}], "steps": 10, "batch_size": 8, "storage": "s3://b/run"} | over


def test_defaults_and_resolution() -> None:
    spec = PretrainSpec.model_validate(_spec(workers=2, accumulation=2))
    assert spec.micro_batch == 2 and spec.storage == "s3://b/run"  # URLs are kept as they are
    assert spec.resolved_parallel() == "ddp" and spec.resolved_precision() == "fp32"
    huge = PretrainSpec.model_validate(_spec(model={"name": "skysense_v2_huge"}, use_gpu=True))
    assert huge.resolved_parallel() == "fsdp" and huge.resolved_precision() == "bf16"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"batch_size": 10, "workers": 4}, "divisible"),
        ({"model": {"name": "skysense_v2_giant"}}, "unknown model"),
        ({"data": [{"kind": "tiles", "path": "x"}]}, "tiles"),
        ({"data": []}, "at least 1"),
        ({"stepz": 3}, "stepz"),
        ({"optim": {"lr": -1}}, "lr"),
        ({"data": [{"kind": "images", "path": "x", "region": 16}]}, r"data\[0\]\.region: region id 16 is out of range"),
        ({"data": [{"kind": "images", "path": "x", "region": -1}]}, "region id is >= 0"),
        ({"data": [{"kind": "change_pairs", "path": "x", "region": [200.0, 10.0]}]}, r"\[lon, lat\]"),
        ({"data": [{"kind": "bigearthnet", "path": "x", "region": 2.5}]}, "region"),
        ({"data": [{"kind": "cube", "path": "x", "region": 3}]}, "region"),  # a cube knows where it lies
        ({"ssl": {"options": {"num_regions": 1}}}, "num_regions must be an integer >= 2"),
        ({"ssl": {"options": {"num_regions": "many"}}}, "num_regions"),
    ],
)
def test_invalid_specs_fail_with_the_field(over: dict, match: str, tmp_path: Path) -> None:
    import yaml

    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(_spec(**over)))
    with pytest.raises(ValueError, match=match):
        load_pretrain_spec(p)


def test_region_of_sources_without_georeference() -> None:
    data = [
        {"kind": "images", "path": "x"},
        {"kind": "change_pairs", "path": "y", "region": [-97.74, 30.27]},
        {"kind": "bigearthnet", "path": "z", "region": 4096},
    ]
    spec = PretrainSpec.model_validate(_spec(data=data, ssl={"options": {"num_regions": 4097}}))
    assert [d.region for d in spec.data] == [None, (-97.74, 30.27), 4096] and spec.num_regions == 4097
    assert PretrainSpec.model_validate(_spec()).num_regions == 16  # the meta-architecture's default
    base = load_pretrain_spec(ROOT / "jobs" / "pretrain-base.yaml")
    assert base.num_regions == 4097  # 4096 geographic cells (the paper's count) + unknown


def test_cli_parser_has_pretrain() -> None:
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["pretrain", "jobs/pretrain-tiny.yaml", "--steps", "3"])
    assert args.steps == 3 and args.func.__name__ == "_pretrain"
