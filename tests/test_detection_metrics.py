"""Detection mAP against known answers: a perfect prediction scores 1, a hand-ranked list of true and false
positives gives the hand-computed VOC AP, difficult objects are neither found nor missed, oriented IoU decides at
each threshold, and the bootstrap resamples images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import TASK_METRICS, DetectionMetrics, bootstrap_ci
from pipeline.eval.report import format_report
from pipeline.finetune.sample import collate_boxes

NAMES = ["ship", "plane"]


def _label(boxes: list[list[float]], classes: list[int], ignore: list[bool] | None = None) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5), "classes": torch.tensor(classes),
            "ignore": torch.tensor(ignore or [False] * len(classes))}  # fmt: skip


def _pred(boxes: list[list[float]], scores: list[float], classes: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 5), "scores": np.array(scores),
            "classes": np.array(classes)}  # fmt: skip


def _box(x: float, y: float = 20.0, angle: float = 0.0) -> list[float]:
    return [x, y, 10.0, 6.0, angle]


def test_registered_for_the_detection_task() -> None:
    assert TASK_METRICS["detection"] is DetectionMetrics


def test_a_perfect_prediction_scores_one() -> None:
    m = DetectionMetrics(class_names=NAMES)
    gts = [_label([_box(10), _box(40, angle=0.5)], [0, 1]), _label([_box(70, angle=-0.3)], [0])]
    preds = [_pred([_box(10), _box(40, angle=0.5)], [0.9, 0.8], [0, 1]), _pred([_box(70, angle=-0.3)], [0.7], [0])]
    m.update(preds, collate_boxes(gts))
    r = m.compute()
    assert r["overall"]["map50"] == pytest.approx(1.0) and r["overall"]["map50_95"] == pytest.approx(1.0)
    assert r["per_class"]["ship"]["support"] == 2 and r["per_class"]["ship"]["recall"] == 1.0
    assert format_report(r, NAMES).splitlines()[-1] == "map50 1.0000"


def test_hand_ranked_true_and_false_positives() -> None:
    # 3 ships over two images. Ranked detections: TP .9, FP .8 (nothing there), TP .7, FP .6 (a duplicate of the
    # .9 one), TP .5. Precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1; interpolated (best precision
    # at any higher recall): 1, 2/3, 3/5 at the three recall steps -> AP = (1 + 2/3 + 3/5) / 3.
    gts = [_label([_box(10), _box(40)], [0, 0]), _label([_box(70)], [0])]
    preds = [
        _pred([_box(10), _box(120), _box(40), _box(10.5)], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0]),
        _pred([_box(70)], [0.5], [0]),
    ]
    m = DetectionMetrics(class_names=NAMES)
    m.update(preds, collate_boxes(gts))
    r = m.compute()
    assert r["per_class"]["ship"]["ap"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert math.isnan(r["per_class"]["plane"]["ap"])  # no plane anywhere: not scored
    assert r["overall"]["classes_scored"] == 1 and r["overall"]["map50"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # the same detections called planes are all false positives of planes, and the ships are missed
    m2 = DetectionMetrics(class_names=NAMES)
    m2.update([_pred(p["boxes"], p["scores"], [1] * len(p["scores"])) for p in preds], collate_boxes(gts))
    assert m2.compute()["per_class"]["ship"]["ap"] == 0.0


def test_difficult_objects_are_neither_found_nor_missed() -> None:
    gts = [_label([_box(10), _box(40)], [0, 0], ignore=[False, True])]
    m = DetectionMetrics(class_names=NAMES)
    m.update([_pred([_box(40), _box(10)], [0.9, 0.8], [0, 0])], collate_boxes(gts))  # the difficult one ranks first
    r = m.compute()
    assert r["per_class"]["ship"]["ap"] == pytest.approx(1.0) and r["per_class"]["ship"]["support"] == 1
    m = DetectionMetrics(class_names=NAMES)
    m.update([_pred([_box(10)], [0.9], [0])], collate_boxes(gts))  # not finding it is no miss either
    assert m.compute()["per_class"]["ship"]["ap"] == pytest.approx(1.0)


def test_oriented_iou_decides_at_each_threshold() -> None:
    # a square object and a detection turned by 45 degrees on it: IoU 1/sqrt 2 = 0.707: a hit at 0.5 ... 0.7, a
    # miss from 0.75 on, so AP@[.5:.95] = 5 / 10
    gt = _label([[30, 30, 10, 10, 0.0]], [0])
    m = DetectionMetrics(class_names=NAMES)
    m.update([_pred([[30, 30, 10, 10, math.pi / 4]], [0.9], [0])], collate_boxes([gt]))
    r = m.compute()
    assert r["overall"]["map50"] == pytest.approx(1.0) and r["overall"]["map75"] == 0.0
    assert r["overall"]["map50_95"] == pytest.approx(0.5)


def test_images_without_objects_count_their_false_positives_and_bootstrap_resamples_images() -> None:
    gts = [_label([_box(10)], [0]), _label([], []), _label([_box(50)], [0])]
    preds = [_pred([_box(10)], [0.6], [0]), _pred([_box(10)], [0.9], [0]), _pred([_box(80)], [0.5], [0])]
    m = DetectionMetrics(class_names=NAMES, per_sample=True)
    m.update(preds, collate_boxes(gts))
    r = m.compute()
    assert r["n_samples"] == 3
    assert r["per_class"]["ship"]["ap"] == pytest.approx(0.5 * 0.5)  # FP .9, TP .6, FP .5: one of 2 at precision 1/2
    ci = bootstrap_ci(m, n_resamples=200, seed=0)
    assert ci["n_samples"] == 3 and 0.0 <= ci["low"] <= r["overall"]["map50"] <= ci["high"] <= 1.0
    assert bootstrap_ci(m, n_resamples=200, seed=0) == ci
