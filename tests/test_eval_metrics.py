"""Task metrics and reports (pipeline/eval/metrics.py, report.py): known answers, streaming, bootstrap, files."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from pipeline.eval.metrics import (
    ChangeMetrics,
    ClassificationMetrics,
    MultilabelMetrics,
    RegressionMetrics,
    SegmentationMetrics,
    average_precision,
    bootstrap_ci,
)
from pipeline.eval.report import format_report, write_report
from pipeline.finetune.sample import IGNORE

# one image, 2 x 4 pixels, two of them unlabelled; the predictions there (2 and 0) must not count
SEG_TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]]])
SEG_PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
# by hand: rows target, columns prediction
SEG_CM = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
SEG_IOU = [1 / 3, 2 / 3, 1 / 2]  # tp / (tp + fp + fn): 1/(1+1+1), 2/(2+1+0), 1/(1+0+1)
SEG_F1 = [2 / 4, 4 / 5, 2 / 3]  # 2tp / (2tp + fp + fn)


def _random_segmentation(seed: int, b: int = 6, k: int = 4, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(IGNORE, k, (b, size, size), generator=g)
    logits = torch.randn(b, k, size, size, generator=g)
    logits.scatter_add_(1, target.clamp_min(0)[:, None], torch.full((b, 1, size, size), 1.5))  # better than chance
    return logits, target


def test_perfect_predictions_score_one():
    target = torch.tensor([0, 1, 2, 2, 1])
    m = ClassificationMetrics(3)
    m.update(target, target)
    r = m.compute()
    assert r["overall"]["accuracy"] == r["overall"]["macro_f1"] == 1.0
    assert all(v == 1.0 for row in r["per_class"].values() for k, v in row.items() if k != "support")

    mask = torch.tensor([[[0, 1], [2, IGNORE]]])
    for metric in (SegmentationMetrics(3), ChangeMetrics(3)):
        metric.update(mask.clamp_min(0), mask)
        overall = metric.compute()["overall"]
        assert all(v == 1.0 for k, v in overall.items() if k != "classes_scored"), overall

    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])
    ml = MultilabelMetrics(3)
    ml.update(y * 0.8 + 0.1, y)
    o = ml.compute()["overall"]
    assert o["map"] == o["micro_f1"] == o["macro_f1"] == 1.0 and o["classes_scored"] == 3

    rg = RegressionMetrics()
    rg.update(torch.arange(8.0).view(2, 4), torch.arange(8.0).view(2, 4))
    assert rg.compute()["overall"] | {"n_values": 8} == {"rmse": 0.0, "mae": 0.0, "r2": 1.0, "n_values": 8}


def test_segmentation_hand_computed_and_ignore():
    m = SegmentationMetrics(class_names=["a", "b", "c"])
    m.update(SEG_PRED, SEG_TARGET)
    r = m.compute()
    assert r["confusion_matrix"] == SEG_CM
    assert r["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert [r["per_class"][c]["iou"] for c in "abc"] == pytest.approx(SEG_IOU)
    assert r["overall"]["miou"] == pytest.approx(0.5)
    assert r["overall"]["macro_f1"] == pytest.approx(sum(SEG_F1) / 3)
    assert m.headline == ("miou", pytest.approx(0.5))
    # logits give the same as their argmax; other predictions on the IGNORE pixels change nothing
    logits = torch.nn.functional.one_hot(SEG_PRED, 3).permute(0, 3, 1, 2).float()
    other = SEG_PRED.clone()
    other[0, 1, 2:] = 1
    for preds in (logits, other):
        m2 = SegmentationMetrics(3)
        m2.update(preds, SEG_TARGET)
        assert m2.compute()["confusion_matrix"] == SEG_CM


def test_absent_class_is_nan_and_left_out_of_means():
    m = SegmentationMetrics(4)  # class 3 is in neither target nor prediction
    m.update(SEG_PRED, SEG_TARGET)
    r = m.compute()
    assert math.isnan(r["per_class"]["class_3"]["iou"]) and r["overall"]["classes_scored"] == 3
    assert r["overall"]["miou"] == pytest.approx(0.5)


def test_segmentation_agrees_with_torchmetrics():
    logits, target = _random_segmentation(0)
    m = SegmentationMetrics(4)
    m.update(logits, target)
    o = m.compute()["overall"]
    assert o["miou"] == pytest.approx(MulticlassJaccardIndex(4, ignore_index=IGNORE)(logits, target).item(), abs=1e-6)
    assert o["macro_f1"] == pytest.approx(MulticlassF1Score(4, ignore_index=IGNORE)(logits, target).item(), abs=1e-6)


def test_classification_hand_computed():
    target, pred = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    m = ClassificationMetrics(3)
    m.update(pred, target)
    r = m.compute()
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r["overall"]["accuracy"] == pytest.approx(3 / 5)
    assert r["overall"]["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert r["overall"]["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert math.isnan(r["per_class"]["class_2"]["precision"])  # never predicted: undefined, not 0
    assert r["per_class"]["class_1"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})


def test_change_class_f1_hand_computed():
    target = torch.tensor([[[0, 0, 1, 1, 1, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1, 0, 1]]])
    m = ChangeMetrics()
    m.update(pred, target)
    r = m.compute()
    # change class: tp 2, fp 1, fn 1
    assert r["overall"]["f1"] == pytest.approx(4 / 6)
    assert r["overall"]["iou"] == pytest.approx(2 / 4)
    assert r["overall"]["precision"] == r["overall"]["recall"] == pytest.approx(2 / 3)
    assert m.headline == ("f1", pytest.approx(4 / 6))
    assert list(r["per_class"]) == ["no_change", "change"]


def test_multilabel_map_matches_sklearn():
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.3], [0.8, 0.6, 0.5, 0.1], [0.3, 0.6, 0.2, 0.7],
                           [0.3, 0.1, 0.9, 0.4], [0.1, 0.4, 0.5, 0.2]])  # fmt: skip  # ties in classes 0, 1, 2
    target = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]).float()
    m = MultilabelMetrics(4)
    m.update(scores, target)
    r = m.compute()
    expected = [average_precision_score(target[:, c], scores[:, c]) for c in range(3)]  # class 3: no positive
    assert r["overall"]["map"] == pytest.approx(np.mean(expected))
    assert r["overall"]["classes_scored"] == 3 and math.isnan(r["per_class"]["class_3"]["ap"])
    assert [r["per_class"][f"class_{c}"]["ap"] for c in range(3)] == pytest.approx(expected)
    # logits rank the same as probabilities, and are recognised as logits
    logit = MultilabelMetrics(4)
    logit.update(torch.logit(scores), target)
    rl = logit.compute()
    assert rl["logits"] and not r["logits"]
    assert rl["overall"] == pytest.approx(r["overall"])


def test_weighted_average_precision_is_resampling():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 3, generator=g).round(decimals=1)  # many ties
    target = (torch.rand(40, 3, generator=g) < 0.4).float()
    idx = torch.randint(40, (40,), generator=g)
    weights = torch.bincount(idx, minlength=40).double()[None]
    got = average_precision(scores, target, weights)[0]
    want = [average_precision_score(target[idx, c], scores[idx, c]) for c in range(3)]
    assert got.tolist() == pytest.approx(want)


def test_regression_ignores_nan_targets():
    target = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("nan"), 5.0]])
    preds = torch.tensor([[2.0, 2.0, 100.0], [3.0, -100.0, 2.0]])[:, None]  # (B, 1, P): channel dim squeezed
    m = RegressionMetrics()
    m.update(preds, target)
    o = m.compute()["overall"]
    # errors 1, 0, 0, -3 on targets 1, 2, 3, 5 (mean 2.75, sum of squares about it 8.75)
    assert o == pytest.approx({"rmse": math.sqrt(10 / 4), "mae": 1.0, "r2": 1 - 10 / 8.75, "n_values": 4})


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # after reset(), on purpose
@pytest.mark.parametrize("cls", [SegmentationMetrics, ChangeMetrics, ClassificationMetrics, MultilabelMetrics])
def test_streaming_equals_one_update(cls):
    logits, target = _random_segmentation(2, b=8, k=2)
    if cls is ClassificationMetrics:
        logits, target = logits[:, :, 0, 0], target[:, 0, 0]
    if cls is MultilabelMetrics:
        logits, target = logits[:, :, 0, 0], (target[:, 0, :2] > 0).float()
    kw = {} if cls is MultilabelMetrics else {"per_sample": True}
    one, many = cls(2, **kw), cls(2, **kw)
    one.update(logits, target)
    for i in range(0, 8, 3):
        many.update(logits[i : i + 3], target[i : i + 3])
    assert many.compute() == one.compute()
    assert bootstrap_ci(many, 50, seed=3) == bootstrap_ci(one, 50, seed=3)
    many.reset()
    assert many.compute()["n_samples"] == 0


def test_bootstrap_seeded_and_contains_estimate():
    logits, target = _random_segmentation(3, b=24)
    m = SegmentationMetrics(4, per_sample=True)
    m.update(logits, target)
    ci = bootstrap_ci(m, 300, seed=7)
    assert ci == bootstrap_ci(m, 300, seed=7) and ci != bootstrap_ci(m, 300, seed=8)
    _, miou = m.headline
    assert ci["low"] <= miou <= ci["high"] and ci["low"] < ci["high"]
    assert ci["n_samples"] == 24 and ci["metric"] == "miou"
    assert bootstrap_ci(m, 300, seed=7, max_elements=50) == ci  # chunking changes nothing

    ml = MultilabelMetrics(3)
    g = torch.Generator().manual_seed(4)
    y = (torch.rand(60, 3, generator=g) < 0.5).float()
    ml.update(torch.rand(60, 3, generator=g) + y, y)
    ci = bootstrap_ci(ml, 200, seed=0)
    assert ci["low"] <= ml.headline[1] <= ci["high"]


def test_bootstrap_resample_equals_recomputation():
    """A resample's headline from per-sample statistics is the metric recomputed on the resampled samples."""
    logits, target = _random_segmentation(5, b=10)
    idx = torch.tensor([0, 0, 3, 3, 3, 7, 9, 1, 1, 2])
    weights = torch.bincount(idx, minlength=10).double()[None]
    cases = [(ChangeMetrics(4, per_sample=True), logits, target),
             (ClassificationMetrics(4, per_sample=True), logits[:, :, 0, 0], target[:, 0, 0].clamp_min(0)),
             (RegressionMetrics(per_sample=True), logits[:, 0], target.float())]  # fmt: skip
    for m, p, t in cases:
        m.update(p, t)
        again = type(m)(**({"num_classes": 4} if m.task != "regression" else {}))
        again.update(p[idx], t[idx])
        assert m._resampled_headline(weights)[0].item() == pytest.approx(again.headline[1])


def test_bad_input_is_named():
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"target has values outside the class ids 0\.\.2 .*\[5\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 5], [1, IGNORE]]]))
    with pytest.raises(ValueError, match="4 class scores"):
        m.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="per_sample=True"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
        bootstrap_ci(m, 10)
    with pytest.raises(ValueError, match="0 / 1"):
        MultilabelMetrics(2).update(torch.zeros(1, 2), torch.tensor([[0.0, 2.0]]))


def test_report_lines_json_and_png(tmp_path):
    names = ["water", "trees", "built"]
    m = SegmentationMetrics(class_names=names, per_sample=True)
    m.update(SEG_PRED, SEG_TARGET)
    m.update(SEG_PRED.flip(-1), SEG_TARGET)
    result = m.compute()
    text = format_report(result)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "iou", "f1", "precision", "recall", "support"]
    assert lines[1].startswith("water ")
    assert re.fullmatch(r"miou \d\.\d{4}", lines[-1]) and lines[-1] == f"miou {result['overall']['miou']:.4f}"
    assert "CI" not in text

    result["ci"] = bootstrap_ci(m, 100)
    lines = format_report(result, class_names=["W", "T", "B"]).splitlines()
    assert lines[1].startswith("W ")
    assert re.fullmatch(r"miou \d\.\d{4}  \(95% CI \d\.\d{4}-\d\.\d{4}\)", lines[-2])
    assert re.fullmatch(r"miou \d\.\d{4}", lines[-1])

    written = write_report(tmp_path / "out" / "report.json", result)
    assert [p.name for p in written] == ["report.json", "report_confusion.png"]
    saved = json.loads(written[0].read_text())
    assert saved["confusion_matrix"] == result["confusion_matrix"] and saved["ci"] == result["ci"]
    png = Image.open(written[1])
    assert written[1].stat().st_size > 1000 and png.width > 100 and png.height > 100

    ml = MultilabelMetrics(class_names=["a", "b"])
    ml.update(torch.tensor([[0.2, 0.9], [0.7, 0.1]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))  # "a": no positive
    r = ml.compute()
    assert format_report(r).splitlines()[-1] == "map 1.0000"
    written = write_report(tmp_path / "ml", r)
    assert [p.name for p in written] == ["ml.json", "ml_ap.png"] and written[1].stat().st_size > 500
    assert "NaN" not in written[0].read_text() and json.loads(written[0].read_text())["per_class"]["a"]["ap"] is None
