"""Oriented boxes against known answers: conversions, rotated IoU of hand-computed polygons, NMS keeping and
suppressing the right boxes (rotated and horizontal paths), the merge rule for cut boxes, and the ProbIoU loss term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from pipeline.finetune.detection import probiou
from pipeline.geometry import (
    is_axis_aligned,
    nms,
    normalize_boxes,
    obb_to_polygons,
    polygons_to_obb,
    quads_to_obb,
    rotated_iou,
    score_order,
    suppress,
)

SQ2 = math.sqrt(2)


def test_conversions_round_trip_and_canonical_form() -> None:
    boxes = np.array([[3.0, 4.0, 5.0, 2.0, 0.3], [0.0, 0.0, 2.0, 6.0, -1.2], [10.0, -3.0, 1.0, 1.0, 2.9]])
    back = polygons_to_obb(obb_to_polygons(boxes))
    np.testing.assert_allclose(rotated_iou(back, boxes).diagonal(), 1.0, atol=1e-9)  # the same rectangles
    assert (back[:, 4] >= -math.pi / 4).all() and (back[:, 4] < math.pi / 4).all()
    # (w, h, a + pi/2) is (h, w, a): canonical form swaps the sides so that the angle lies in [-45, 45) degrees
    np.testing.assert_allclose(normalize_boxes(np.array([[0, 0, 4, 2, math.pi / 2]])), [[0, 0, 2, 4, 0]], atol=1e-12)
    # a horizontal rectangle given as four corners (DIOR bndbox, DOTA quads) comes out with angle exactly 0
    hbb, ok = quads_to_obb(np.array([[[0, 0], [4, 0], [4, 2], [0, 2]], [[1, 1], [2, 2], [3, 3], [4, 4]]], float))
    np.testing.assert_array_equal(ok, [True, False])  # collinear points: no area
    np.testing.assert_allclose(hbb, [[2, 1, 4, 2, 0]], atol=1e-12)
    assert hbb[0, 4] == 0.0 and is_axis_aligned(hbb).all()
    # a DOTA-style quadrilateral that is not quite a rectangle -> its minimum-area rectangle (a 45-degree square)
    diamond, _ = quads_to_obb(np.array([[[0, 0], [2, 2], [0, 4], [-2, 2]]], float))
    np.testing.assert_allclose(diamond[0, :4], [0, 2, 2 * SQ2, 2 * SQ2], atol=1e-9)
    assert abs(abs(diamond[0, 4]) - math.pi / 4) < 1e-9


def test_rotated_iou_of_hand_computed_polygons() -> None:
    square = [0.0, 0.0, 1.0, 1.0, 0.0]
    turned = [0.0, 0.0, 1.0, 1.0, math.pi / 4]  # overlap: a regular octagon of area 2 (sqrt 2 - 1)
    iou = rotated_iou(np.array([square, turned]), np.array([square, turned]))
    np.testing.assert_allclose(iou, [[1, 1 / SQ2], [1 / SQ2, 1]], atol=1e-12)
    # a 4 x 2 box and the same box turned by 90 degrees: a 2 x 2 overlap, union 12
    long, tall = np.array([[0, 0, 4, 2, 0.0]]), np.array([[0, 0, 4, 2, math.pi / 2]])
    assert rotated_iou(long, tall)[0, 0] == pytest.approx(1 / 3)
    # two 2 x 2 squares shifted by 1 along x: overlap 2, union 6; rotated together by 30 degrees: the same
    a = np.array([[0, 0, 2, 2, 0.0], [0, 0, 2, 2, math.pi / 6]])
    b = np.array([[1, 0, 2, 2, 0.0], [math.cos(math.pi / 6), math.sin(math.pi / 6), 2, 2, math.pi / 6]])
    np.testing.assert_allclose(rotated_iou(a, b).diagonal(), [1 / 3, 1 / 3], atol=1e-12)
    # far apart: no candidate pair at all; touching: 0
    assert rotated_iou(np.array([square]), np.array([[10, 10, 1, 1, 0.3], [1, 0, 1, 1, 0]])).tolist() == [[0.0, 0.0]]


def test_horizontal_iou_matches_torchvision() -> None:
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 50, (40, 2)), rng.uniform(2, 20, (40, 2)), np.zeros((40, 1))], 1)
    xyxy = torch.from_numpy(np.concatenate([boxes[:, :2] - boxes[:, 2:4] / 2, boxes[:, :2] + boxes[:, 2:4] / 2], 1))
    np.testing.assert_allclose(rotated_iou(boxes, boxes), torchvision.ops.box_iou(xyxy, xyxy).numpy(), atol=1e-12)


def test_nms_keeps_and_suppresses_the_right_boxes() -> None:
    # A (0.9) and B (0.8) overlap with IoU 0.6 (75 / 125); C (0.7) overlaps B by IoU 0.6 and A by 1/3 (50 / 150):
    # B goes, so C stays. The squares are turned by 0.2 rad and shifted along their own axis.
    step = 2.5 * np.array([math.cos(0.2), math.sin(0.2)])
    boxes = np.array([[*(k * step), 10, 10, 0.2] for k in range(3)])
    iou = rotated_iou(boxes, boxes)
    assert iou[0, 1] == pytest.approx(0.6) and iou[1, 2] == pytest.approx(0.6) and iou[0, 2] == pytest.approx(1 / 3)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.65).tolist() == [0, 1, 2]  # IoU must be above the threshold
    assert nms(boxes, scores, 0.5, classes=np.array([0, 1, 0])).tolist() == [0, 1, 2]  # per class
    assert nms(boxes, scores[::-1].copy(), 0.5).tolist() == [2, 0]  # C first now: it suppresses B, A stays
    assert nms(boxes, scores, 0.5, max_keep=1).tolist() == [0]
    # the square and its 45-degree turn: IoU 1/sqrt 2
    turn = np.array([[0, 0, 1, 1, 0.0], [0, 0, 1, 1, math.pi / 4]])
    assert nms(turn, np.array([0.5, 0.6]), 0.7).tolist() == [1]
    assert nms(turn, np.array([0.5, 0.6]), 0.75).tolist() == [1, 0]


def test_horizontal_nms_path_agrees_with_the_rotated_walk() -> None:
    rng = np.random.default_rng(1)
    boxes = np.concatenate([rng.uniform(0, 60, (300, 2)), rng.uniform(3, 25, (300, 2)), np.zeros((300, 1))], 1)
    scores = rng.uniform(0, 1, 300)
    classes = rng.integers(0, 3, 300)
    via_torchvision = nms(boxes, scores, 0.3, classes)
    via_polygons = suppress(boxes, score_order(scores), 0.3, classes)
    assert via_torchvision.tolist() == via_polygons.tolist()


def test_cut_boxes_are_suppressed_by_the_box_that_covers_them() -> None:
    whole = [10, 10, 8, 4, 0.3]
    piece = [7.5, 8.8, 3, 3.5, 0.3]  # a part of it (as a tile that sees only one end of the object would box it)
    other = [16, 16, 3, 3, 0.0]  # a small neighbour that the whole box only grazes
    boxes = np.array([whole, piece, other])
    assert rotated_iou(boxes, boxes)[0, 1] < 0.5  # IoU alone would keep the piece
    partial = np.array([False, True, True])
    kept = suppress(boxes, np.array([0, 1, 2]), 0.5, partial=partial, cover_threshold=0.5)
    assert kept.tolist() == [0, 2]


def test_probiou_known_values() -> None:
    box = torch.tensor([[5.0, 5.0, 8.0, 3.0, 0.4]])
    assert float(probiou(box, box)) == pytest.approx(1.0, abs=1e-3)
    # the same rectangle in other parametrisations (angle + pi; sides swapped with angle + pi/2): the same Gaussian
    same = torch.tensor([[5.0, 5.0, 8.0, 3.0, 0.4 + math.pi], [5.0, 5.0, 3.0, 8.0, 0.4 + math.pi / 2]])
    np.testing.assert_allclose(probiou(box.expand(2, -1), same).numpy(), 1.0, atol=1e-3)
    # against the Bhattacharyya distance computed with explicit covariance matrices
    a, b = np.array([0.0, 0.0, 6.0, 2.0, 0.3]), np.array([1.0, 0.5, 4.0, 3.0, -0.5])

    def cov(x: np.ndarray) -> np.ndarray:
        r = np.array([[math.cos(x[4]), -math.sin(x[4])], [math.sin(x[4]), math.cos(x[4])]])
        return r @ np.diag([x[2] ** 2 / 12, x[3] ** 2 / 12]) @ r.T

    s = (cov(a) + cov(b)) / 2
    d = a[:2] - b[:2]
    bd = d @ np.linalg.inv(s) @ d / 8 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(np.linalg.det(cov(a)) *
                                                                                   np.linalg.det(cov(b))))  # fmt: skip
    expected = 1 - math.sqrt(1 - math.exp(-bd))
    got = float(probiou(torch.from_numpy(a[None]), torch.from_numpy(b[None]), eps=1e-12))
    assert got == pytest.approx(expected, rel=1e-5)
