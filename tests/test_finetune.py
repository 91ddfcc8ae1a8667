"""Fine-tuning end to end on tiny real data: each task learns, round-trips through its checkpoint, is scored by
``skypipe eval``, and a trained segmentation head makes a region job write real class outputs.

The backbone is a micro SkySense V2 (random weights, saved as a real checkpoint file so adapters can name it by
sha256); the data are small real samples of ../shared/data. The numbers are not the point here (a few steps on a
random micro backbone); that losses fall, files are right and errors are clear is.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from infer_fixtures import write_checkpoint, write_cube, write_job
from shared_data import needs_shared, shared_path

from pipeline.cli import main
from pipeline.finetune.checkpoint import AdapterMismatchError, read_task_meta
from pipeline.finetune.loop import ResumeMismatchError, run_loop
from pipeline.finetune.spec import FinetuneSpecError, parse_finetune
from pipeline.infer.task import resolve_task

pytestmark = [needs_shared("rsscn7")]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("ft") / "micro.pt")


def _spec(tmp: Path, backbone: str, **fields: object):
    base = {"name": "t", "backbone": backbone, "storage": str(tmp / "store"), "batch_size": 8, "eval_every": 10,
            "optim": {"lr": 3e-3, "warmup_steps": 2}}  # fmt: skip
    return parse_finetune(base | fields)


def _falls(losses: list[float], k: int = 8) -> bool:
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k]))


RSSCN7 = {"format": "class_folders", "path": str(shared_path("rsscn7")), "classes": ["aGrass", "eForest"],
          "size": 32, "gsd": 2.5, "split": {"fractions": [0.6, 0.2, 0.2]}}  # fmt: skip


def test_classification_learns_round_trips_and_is_scored(backbone, tmp_path, capsys):
    spec = _spec(tmp_path, backbone, task="classification", modalities=["hr"], data=RSSCN7, steps=40,
                 adapt={"mode": "full"}, head={"pooling": "mean"}, optim={"lr": 1e-3, "warmup_steps": 4})  # fmt: skip
    result = run_loop(spec, progress=False)
    assert _falls(result["losses"]), result["losses"]
    assert Path(spec.model_path).exists() and result["metric"]["val"]["accuracy"] >= 0
    meta = read_task_meta(spec.model_path)
    assert meta.kind == "classification" and meta.class_names == ["aGrass", "eForest"] and meta.adapt == "full"
    assert meta.backbone["sha256"] and meta.data["sources"][0]["format"] == "class_folders"
    resolved = resolve_task(spec.model_path, None)  # the checkpoint decides the kind
    assert resolved.kind.name == "classification" and resolved.head_config == {"pooling": "mean"}
    task = resolved.build()
    x = {"hr": torch.zeros(2, 1, 3, 32, 32)}
    with torch.no_grad():
        assert task(x).shape == (2, 2)
    capsys.readouterr()
    assert main(["model", "info", spec.model_path]) == 0
    info = capsys.readouterr().out
    assert "task           classification (adapt: full" in info and "0 aGrass #" in info and "metrics (val)" in info
    test = tmp_path / "test"
    for c in ("aGrass", "eForest"):  # a class-folder layout with any number of images per class
        (test / c).mkdir(parents=True)
        for f in sorted((shared_path("rsscn7") / c).glob("*.jpg"))[-3 if c == "aGrass" else -5 :]:
            os.symlink(f, test / c / f.name)
    assert main(["eval", "classification", "--checkpoint", spec.model_path, "--test", str(test), "--size", "32",
                 "--gsd", "2.5", "--bootstrap", "50", "--report", str(tmp_path / "rep")]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("accuracy ") and "95% CI" in out[-2]
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["n_samples"] == 8 and (tmp_path / "rep_confusion.png").stat().st_size > 0
    # a test set with other classes, and a task the checkpoint cannot do, are clear errors
    (test / "zOther").mkdir()
    os.symlink(next((shared_path("rsscn7") / "bField").glob("*.jpg")), test / "zOther" / "x.jpg")
    assert main(["eval", "classification", "--checkpoint", spec.model_path, "--test", str(test)]) == 2
    assert "must be the same classes" in capsys.readouterr().err
    assert main(["eval", "segmentation", "--checkpoint", spec.model_path, "--test", str(test)]) == 2
    assert "cannot do segmentation: it has classification" in capsys.readouterr().err


@needs_shared("sen1floods11")
def test_segmentation_adapter_drives_a_region_job(backbone, tmp_path, capsys):
    floods = {"format": "raster_pairs", "path": str(shared_path("sen1floods11")), "size": 64,
              "modalities": {"s2": {"glob": "S2Hand/*_S2Hand.tif",
                                    "bands": {b: i for b, i in zip(
                                        ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"],
                                        [2, 3, 4, 5, 6, 7, 8, 9, 12, 13])},
                                    "nodata": 0}},
              "label": {"glob": "LabelHand/*_LabelHand.tif"}, "classes": {0: "land", 1: "water"},
              "label_nodata": [-1], "split": {"fractions": [0.6, 0.2, 0.2], "block": 128, "gap": 8}}  # fmt: skip
    spec = _spec(tmp_path, backbone, task="segmentation", modalities=["s2"], data=floods, steps=24, head={"width": 32},
                 adapt={"mode": "frozen"}, loss={"name": "ce+dice", "class_weights": "auto"})  # fmt: skip
    result = run_loop(spec, progress=False)
    assert _falls(result["losses"]), result["losses"]
    meta = read_task_meta(spec.model_path)
    assert meta.adapt == "frozen" and meta.class_names == ["land", "water"] and meta.label_nodata == [-1.0]
    assert Path(spec.model_path).stat().st_size < Path(backbone).stat().st_size / 4  # an adapter: head only
    assert "miou" in result["metric"]["val"]

    cube = write_cube(tmp_path / "cube.zarr", size=(48, 48))
    job = write_job(
        tmp_path / "job.yaml",
        cube,
        str(tmp_path / "out"),
        spec.model_path,
        output={"path": str(tmp_path / "out")},
        tiles={"size": 32, "overlap": 8},
    )  # no output.kind: the adapter says segmentation
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "land" in text and "water" in text and "mapped" in text  # the area table in the summary
    with rasterio.open(tmp_path / "out" / "classes.tif") as src:
        assert src.colormap(1)[0][:3] != (0, 0, 0) and src.crs.to_epsg() == 32633
        assert json.loads(src.tags()["class_names"]) == ["land", "water"]
    polygons = gpd.read_parquet(tmp_path / "out" / "polygons.parquet")
    assert polygons.crs.to_epsg() == 32633 and set(polygons["class"]) <= {"land", "water"}
    assert (tmp_path / "out" / "areas.csv").exists() and (tmp_path / "out" / "quicklook.png").exists()

    # the adapter refuses a backbone with other weights
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter.pt").write_bytes(Path(spec.model_path).read_bytes())
    torch.manual_seed(1)
    from pipeline.model import create_model
    from pipeline.model.checkpoint import save_checkpoint

    save_checkpoint(create_model("skysense_v2_tiny", dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), fusion_dim=64,
                                 fusion_heads=2), other / "micro.pt")  # fmt: skip
    with pytest.raises(AdapterMismatchError, match="was trained on backbone sha256"):
        resolve_task(str(other / "adapter.pt"), None)


@needs_shared("levir_cd")
def test_change_with_lora(backbone, tmp_path):
    levir = {"format": "change_folders", "path": str(shared_path("levir_cd")), "size": 64, "gsd": 0.5,
             "split": {"fractions": [0.7, 0.3, 0.0]}}  # fmt: skip
    spec = _spec(tmp_path, backbone, task="change", modalities=["hr"], data=levir, steps=12, eval_every=6,
                 adapt={"mode": "lora", "rank": 4}, head={"width": 32})  # fmt: skip
    result = run_loop(spec, progress=False)
    assert np.isfinite(result["losses"]).all()
    resolved = resolve_task(spec.model_path, None)
    assert resolved.kind.name == "change" and resolved.lora["config"]["r"] == 4
    task = resolved.build()
    assert any("lora_" in n for n, _ in task.named_parameters())
    x = {"hr": torch.rand(1, 1, 3, 64, 64) * 255}
    with torch.no_grad():
        assert task(x, x).shape == (1, 2, 64, 64)


@needs_shared("bigearthnet_v1")
def test_multilabel_bigearthnet_is_scored(backbone, tmp_path, capsys):
    ben = {"format": "bigearthnet", "path": str(shared_path("bigearthnet_v1")), "size": 16}
    spec = _spec(tmp_path, backbone, task="multilabel", modalities=["s2", "s1"], data=ben, steps=10, eval_every=5,
                 adapt={"mode": "frozen"})  # fmt: skip
    result = run_loop(spec, progress=False)
    assert "map" in result["metric"]["val"]
    spec_file = tmp_path / "test.yaml"
    spec_file.write_text(json.dumps(ben))
    capsys.readouterr()
    assert main(["eval", "multilabel", "--checkpoint", spec.model_path, "--test", str(spec_file)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("map ")


def _train_in_child(spec_json: str) -> None:
    from pipeline.finetune.spec import FinetuneSpec

    run_loop(FinetuneSpec.model_validate_json(spec_json), progress=False)


def test_a_killed_run_resumes_to_the_same_model(backbone, tmp_path):
    def spec(name: str):
        return _spec(tmp_path / name, backbone, task="classification", modalities=["hr"], data=RSSCN7, steps=12,
                     eval_every=4, adapt={"mode": "partial", "stages": 1})  # fmt: skip

    reference = spec("ref")
    run_loop(reference, progress=False)
    killed = spec("killed")
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_train_in_child, args=(killed.model_dump_json(),))
    child.start()
    state = Path(killed.storage) / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists():  # the state of step 4 is written: kill it there
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not Path(killed.model_path).exists()  # an interrupted run leaves no model file as if it were complete
    result = run_loop(killed, progress=False)
    assert result["resumed_from"] >= 4
    a, b = (torch.load(s.model_path, weights_only=True)["state_dict"] for s in (reference, killed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_run_is_not_resumed_on_another_backbone(backbone, tmp_path, capsys):
    """The saved state holds the whole model: resuming it after `backbone:` changed would mislabel the result."""
    import yaml

    from pipeline.model.checkpoint import load_checkpoint, save_checkpoint

    first = _spec(tmp_path, backbone, task="classification", modalities=["hr"], data=RSSCN7, steps=2, eval_every=2)
    run_loop(first, progress=False)
    other = tmp_path / "other.pt"
    save_checkpoint(load_checkpoint(backbone)[0], other, provenance={"note": "another backbone"})
    moved = first.model_copy(update={"backbone": str(other)})
    with pytest.raises(ResumeMismatchError, match="holds a run started on another backbone"):
        run_loop(moved, progress=False)
    job = tmp_path / "ft.yaml"
    job.write_text(yaml.safe_dump(moved.model_dump(mode="json")))
    assert main(["finetune", str(job), "--no-progress"]) == 2  # refused before Ray starts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set a new `storage`" in err[0]
    again = first.model_copy(update={"steps": 3})  # the same backbone: resumes
    assert run_loop(again, progress=False)["resumed_from"] == 2


@pytest.mark.slow
def test_bad_data_is_one_line_before_and_after_ray_starts_and_good_data_trains(backbone, tmp_path, capsys):
    """A missing data folder is refused before Ray starts; data a worker cannot use (a folder without the
    spec's class sub-folders) fails in the worker, and the command still prints the worker's one line and exits 2.
    Then the same command trains on good data through Ray Train."""
    import yaml

    def finetune(path: Path) -> list[str]:
        spec = _spec(tmp_path, backbone, task="classification", modalities=["hr"], steps=2, max_failures=0,
                     data=RSSCN7 | {"path": str(path)})  # fmt: skip
        job = tmp_path / "ft.yaml"
        job.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        assert main(["finetune", str(job), "--no-progress"]) == 2
        return capsys.readouterr().err.strip().splitlines()

    err = finetune(tmp_path / "nowhere")
    assert len(err) == 1 and "data[0].path" in err[0] and "nowhere not found" in err[0], err
    (tmp_path / "empty").mkdir()
    err = finetune(tmp_path / "empty")
    assert err[-1].startswith("skypipe: error:") and "empty/aGrass not found" in err[-1], err[-3:]
    assert not (tmp_path / "store" / "summary.json").exists()
    good = _spec(tmp_path, backbone, task="classification", modalities=["hr"], steps=2, eval_every=2, data=RSSCN7)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(good.model_dump(mode="json")))
    assert main(["finetune", str(tmp_path / "ft.yaml"), "--no-progress"]) == 0  # the same path, through Ray Train
    assert "fine-tuned t: 2 steps" in capsys.readouterr().out
    assert read_task_meta(good.model_path).class_names == ["aGrass", "eForest"]


def test_spec_errors_name_the_field(backbone, tmp_path):
    with pytest.raises(FinetuneSpecError, match=r"task: .*'embeddings' is not a task to fine-tune"):
        _spec(tmp_path, backbone, task="embeddings", modalities=["hr"], data=RSSCN7)
    with pytest.raises(FinetuneSpecError, match=r"multi-label: use loss bce"):
        _spec(tmp_path, backbone, task="multilabel", modalities=["s2"], data=RSSCN7, loss={"name": "ce"})
    with pytest.raises(FinetuneSpecError, match=r"adapt\.mode"):
        _spec(tmp_path, backbone, task="classification", modalities=["hr"], data=RSSCN7, adapt={"mode": "some"})
