"""Detection as one more fine-tuning task: a few steps on real DOTA and DIOR-R chips lower the loss, the checkpoint
carries the detection head and its decoding settings, ``skypipe eval detection`` scores it (mAP, headline last),
and a loss that does not fit boxes is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_fixtures import write_checkpoint
from shared_data import needs_shared, shared_path

from pipeline.cli import main
from pipeline.finetune.checkpoint import read_task_meta
from pipeline.finetune.loop import run_loop
from pipeline.finetune.spec import parse_finetune
from pipeline.infer.task import resolve_task
from pipeline.model.skysense import ModalityInput

pytestmark = [needs_shared("detection")]

CLASSES = ["ship", "harbor", "large-vehicle", "small-vehicle", "golffield"]
DOTA = {
    "format": "dota",
    "path": str(shared_path("detection/dota")),
    "select": ["P0706"],
    "classes": CLASSES,
    "size": 128,
    "overlap": 32,
    "split": {"seed": 0, "fractions": [0.7, 0.1, 0.2], "block": 320, "gap": 16},
}
DIOR = {"format": "voc", "path": str(shared_path("detection/dior")), "gsd": 2.0, "classes": CLASSES, "size": 128,
        "annotations": "Annotations/Oriented_Bounding_Boxes", "split": {"fractions": [1, 0, 0]},
        "weight": 0.25}  # fmt: skip


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("det") / "micro.pt")


def _spec(tmp: Path, backbone: str, **fields: object):
    base = {"name": "det", "task": "detection", "backbone": backbone, "modalities": ["hr"], "data": [DOTA, DIOR],
            "storage": str(tmp / "store"), "batch_size": 4, "eval_every": 12, "steps": 24,
            "head": {"width": 16, "convs": 1}, "optim": {"lr": 2e-3, "warmup_steps": 2}}  # fmt: skip
    return parse_finetune(base | fields)


def test_detection_learns_on_dota_and_dior_chips_and_is_scored(backbone, tmp_path, capsys):
    spec = _spec(tmp_path, backbone)
    result = run_loop(spec, progress=False)
    losses = result["losses"]
    assert np.isfinite(losses).all() and np.mean(losses[-8:]) < np.mean(losses[:8]), losses
    assert {"map50", "map50_95"} <= set(result["metric"]["val"])
    meta = read_task_meta(spec.model_path)
    assert meta.kind == "detection" and meta.class_names == CLASSES
    assert meta.head_config == {"width": 16, "convs": 1, "oriented": True, "score_threshold": 0.3, "nms_iou": 0.1,
                                "max_detections": 300}  # fmt: skip
    assert [s["format"] for s in meta.data["sources"]] == ["dota", "voc"]
    assert meta.data["sources"][0]["gsd"] == {"hr": 0.3125} and meta.data["sources"][1]["gsd"] == {"hr": 2.5}
    # the checkpoint decides the kind; its task decodes raw outputs into boxes
    task = resolve_task(spec.model_path, None).build()
    x = torch.rand(1, 1, 3, 128, 128) * 255
    with torch.no_grad():
        raw = task({"hr": ModalityInput(x, gsd=0.3125)})  # pyramid levels of stride 4, 8, 16, 32
        assert raw.shape == (1, 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4, 9 + len(CLASSES))
        assert task({"hr": x}).shape[1] == 32 * 32 + 16 * 16 + 8 * 8  # at 0.625 m stages 3 and 4 are one level
    det = task.decode(raw, score_threshold=0.0)[0]
    assert det["boxes"].shape[1] == 5 and len(det["scores"]) == len(det["classes"]) <= 300

    test = tmp_path / "test.yaml"
    test.write_text(json.dumps(DOTA))
    capsys.readouterr()
    assert main(["eval", "detection", "--checkpoint", spec.model_path, "--test", str(test), "--bootstrap", "20",
                 "--report", str(tmp_path / "rep")]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("map50 ") and "95% CI" in out[-2]
    assert any(line.startswith("ship ") for line in out)
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["task"] == "detection" and report["per_class"]["ship"]["support"] > 0
    assert (tmp_path / "rep_ap.png").stat().st_size > 0
    # a folder in DOTA's layout is scored whole
    assert main(["eval", "detection", "--checkpoint", spec.model_path, "--test", str(shared_path("detection/dota")),
                 "--size", "128"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("map50 ")


def test_a_loss_that_does_not_fit_boxes_is_refused(backbone, tmp_path):
    spec = _spec(tmp_path, backbone, loss={"name": "ce"}, steps=1)
    with pytest.raises(ValueError, match="loss 'ce' does not fit object boxes"):
        run_loop(spec, progress=False)
