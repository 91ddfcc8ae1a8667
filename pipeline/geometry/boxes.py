"""Oriented boxes ``(cx, cy, w, h, angle)``: conversions, exact overlaps of their polygons, non-maximum suppression.

Convention: pixel coordinates with x to the right (columns) and y down (rows); ``angle`` in radians is the rotation
of the box's ``w`` side from +x towards +y (clockwise on screen). ``(w, h, angle + pi)`` and ``(h, w, angle + pi/2)``
are the same rectangle; :func:`normalize_boxes` picks the one with ``angle`` in ``[-pi/4, pi/4)`` [ours: mmrotate's
"le45"], so ``w`` is the side nearer the x axis and an axis-aligned box always has angle 0: horizontal boxes (HBB)
are exactly the boxes with angle 0.

Overlaps are exact polygon areas from shapely 2, vectorised over arrays of polygons. Candidate pairs are found
first from the boxes' enclosing axis-aligned boxes with an STR-tree, so N boxes against M cost about
``(N + M) log M`` plus one intersection per overlapping pair, never N x M polygon intersections; pairs of
axis-aligned boxes skip shapely altogether. Sets of axis-aligned boxes are suppressed with torchvision's NMS.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
import torch
import torchvision

BOX_DIM = 5
"""Values per box: cx, cy, w, h, angle."""


def _boxes(boxes: np.ndarray | torch.Tensor) -> np.ndarray:
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != BOX_DIM:
        raise ValueError(f"boxes must be (N, {BOX_DIM}) [cx, cy, w, h, angle], got {b.shape}")
    return b


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped into ``[-pi/2, pi/2)`` (a rectangle turned by pi is itself)."""
    return np.mod(np.asarray(angle, dtype=np.float64) + math.pi / 2, math.pi) - math.pi / 2


def normalize_boxes(boxes: np.ndarray) -> np.ndarray:
    """``(N, 5)`` boxes in the canonical form: angle in ``[-pi/4, pi/4)``, ``w``/``h`` swapped where needed (a copy)."""
    b = _boxes(boxes).copy()
    a = wrap_angle(b[:, 4])
    up, down = a >= math.pi / 4, a < -math.pi / 4
    swap = up | down
    b[:, 4] = np.where(up, a - math.pi / 2, np.where(down, a + math.pi / 2, a))
    b[swap, 2], b[swap, 3] = b[swap, 3], b[swap, 2].copy()
    return b


def obb_to_polygons(boxes: np.ndarray) -> np.ndarray:
    """``(N, 5)`` boxes -> ``(N, 4, 2)`` corners (x, y).

    The corners are in the order of the box's own half-extents (-w, -h), (+w, -h), (+w, +h), (-w, +h).
    """
    b = _boxes(boxes)
    cx, cy, w, h, a = b.T
    cos, sin = np.cos(a), np.sin(a)
    dx = np.array([-0.5, 0.5, 0.5, -0.5])[None] * w[:, None]  # (N, 4)
    dy = np.array([-0.5, -0.5, 0.5, 0.5])[None] * h[:, None]
    x = cx[:, None] + dx * cos[:, None] - dy * sin[:, None]
    y = cy[:, None] + dx * sin[:, None] + dy * cos[:, None]
    return np.stack([x, y], axis=-1)


def polygons_to_obb(corners: np.ndarray) -> np.ndarray:
    """``(N, 4, 2)`` corners of rectangles (in ring order) -> ``(N, 5)`` normalised boxes.

    The first edge gives ``w`` and the angle, the second ``h``; the centre is the corners' mean.
    """
    c = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2)
    e1, e2 = c[:, 1] - c[:, 0], c[:, 2] - c[:, 1]
    out = np.stack([c[..., 0].mean(1), c[..., 1].mean(1), np.hypot(*e1.T), np.hypot(*e2.T),
                    np.arctan2(e1[:, 1], e1[:, 0])], axis=1)  # fmt: skip
    return normalize_boxes(out)


def quads_to_obb(quads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-area rectangles of ``(N, K, 2)`` polygons (DOTA's four corners, building outlines, ...).

    Returns:
        ``(M, 5)`` normalised boxes of the polygons with a positive area, and the ``(N,)`` mask of those polygons
        (degenerate ones: collinear or repeated points, have none).
    """
    q = np.asarray(quads, dtype=np.float64)
    if q.ndim != 3 or q.shape[-1] != 2 or q.shape[1] < 3:
        raise ValueError(f"polygons must be (N, K >= 3, 2) vertices, got {q.shape}")
    hulls = shapely.convex_hull(shapely.multipoints(q))
    ok = shapely.area(hulls) > 0
    if not ok.any():
        return np.zeros((0, BOX_DIM)), ok
    return rects_to_obb(shapely.minimum_rotated_rectangle(hulls[ok])), ok


def rects_to_obb(rects: np.ndarray) -> np.ndarray:
    """Shapely rectangle polygons (e.g. from ``minimum_rotated_rectangle``) -> ``(N, 5)`` normalised boxes."""
    rings = shapely.get_exterior_ring(np.asarray(rects, dtype=object))
    n = shapely.get_num_coordinates(rings)
    if (n != 5).any():
        raise ValueError("not rectangles: every ring must have 4 corners (5 coordinates, closed)")
    return polygons_to_obb(shapely.get_coordinates(rings).reshape(-1, 5, 2)[:, :4])


def shapely_polygons(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` shapely polygons of ``(N, 5)`` boxes."""
    return shapely.polygons(obb_to_polygons(boxes))


def hbb_of(boxes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` enclosing axis-aligned boxes ``x0, y0, x1, y1``."""
    c = obb_to_polygons(boxes)
    return np.concatenate([c.min(1), c.max(1)], axis=1)


def is_axis_aligned(boxes: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """``(N,)`` whether each box's sides are parallel to the axes (angle a multiple of pi/2)."""
    a = np.mod(_boxes(boxes)[:, 4], math.pi / 2)
    return (a < tol) | (math.pi / 2 - a < tol)


def candidate_pairs(
    a: np.ndarray, b: np.ndarray, labels: tuple[np.ndarray, np.ndarray] | None = None, min_ratio: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(ia, ib)``: pairs whose enclosing axis-aligned boxes intersect, sorted (an STR-tree query, no clipping).

    Args:
        a, b: ``(N, 5)`` and ``(M, 5)`` boxes.
        labels: ``(labels_a, labels_b)``: only pairs with equal labels (class-aware matching).
        min_ratio: only pairs whose enclosing boxes overlap by more than this fraction of the larger box's area:
            a necessary condition for an IoU above ``min_ratio`` (the rotated boxes' intersection is at most their
            enclosing boxes', their union at least the larger box), which spares NMS most polygon clipping.
    """
    a, b = _boxes(a), _boxes(b)
    if not len(a) or not len(b):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ha, hb = hbb_of(a), hbb_of(b)
    tree = shapely.STRtree(shapely.box(*hb.T))
    ia, ib = tree.query(shapely.box(*ha.T), predicate="intersects")
    if labels is not None:
        same = np.asarray(labels[0])[ia] == np.asarray(labels[1])[ib]
        ia, ib = ia[same], ib[same]
    if min_ratio > 0:
        lo, hi = np.maximum(ha[ia, :2], hb[ib, :2]), np.minimum(ha[ia, 2:], hb[ib, 2:])
        bound = np.clip(hi - lo, 0, None).prod(1)
        enough = bound > min_ratio * np.maximum(areas(a)[ia], areas(b)[ib])
        ia, ib = ia[enough], ib[enough]
    order = np.lexsort((ib, ia))
    return ia[order].astype(np.int64), ib[order].astype(np.int64)


def box_overlaps(
    a: np.ndarray, b: np.ndarray, labels: tuple[np.ndarray, np.ndarray] | None = None, min_ratio: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of boxes that overlap, with the exact area of their intersection.

    Args:
        a, b: ``(N, 5)`` and ``(M, 5)`` boxes.
        labels, min_ratio: see :func:`candidate_pairs`.

    Returns:
        ``(ia, ib, area)``: the :func:`candidate_pairs` and the area of the intersection of each pair's rotated
        rectangles (0 for pairs that only touch or whose corners only come close).
    """
    a, b = _boxes(a), _boxes(b)
    ia, ib = candidate_pairs(a, b, labels, min_ratio)
    area = np.zeros(len(ia))
    aligned = is_axis_aligned(a)[ia] & is_axis_aligned(b)[ib]
    if aligned.any():  # rectangles that are their own enclosing boxes: no polygon clipping needed
        ha, hb = hbb_of(a[ia[aligned]]), hbb_of(b[ib[aligned]])
        area[aligned] = np.clip(np.minimum(ha[:, 2:], hb[:, 2:]) - np.maximum(ha[:, :2], hb[:, :2]), 0, None).prod(1)
    rest = ~aligned
    if rest.any():
        ua, ub = np.unique(ia[rest]), np.unique(ib[rest])  # one polygon per box, not per pair
        pa, pb = np.empty(len(a), dtype=object), np.empty(len(b), dtype=object)
        pa[ua], pb[ub] = shapely_polygons(a[ua]), shapely_polygons(b[ub])
        area[rest] = shapely.area(shapely.intersection(pa[ia[rest]], pb[ib[rest]]))
    return ia, ib, area


def areas(boxes: np.ndarray) -> np.ndarray:
    """``(N,)`` box areas ``w * h``."""
    b = _boxes(boxes)
    return b[:, 2] * b[:, 3]


def rotated_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, M)`` intersection over union of the rotated rectangles (0 for pairs that do not overlap)."""
    a, b = _boxes(a), _boxes(b)
    out = np.zeros((len(a), len(b)))
    ia, ib, inter = box_overlaps(a, b)
    union = areas(a)[ia] + areas(b)[ib] - inter
    out[ia, ib] = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by index (a deterministic order)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(s)), -s))


def suppress(boxes: np.ndarray, order: np.ndarray, iou_threshold: float, classes: np.ndarray | None = None,
             partial: np.ndarray | None = None, cover_threshold: float = 1.0,
             max_keep: int | None = None) -> np.ndarray:  # fmt: skip
    """Greedy suppression walking ``order``: the indices kept, in that order.

    A kept box suppresses a later box of the same class (when ``classes`` is given) whose IoU with it is above
    ``iou_threshold``, or, for a later box flagged ``partial`` (e.g. cut by a tile's edge), more than
    ``cover_threshold`` of whose area it covers. At most ``max_keep`` boxes are kept (the walk stops there).
    Polygons are clipped only between each kept box and its still-alive candidate neighbours
    (:func:`candidate_pairs`), so the cost follows the boxes kept, not all pairs.
    """
    b = _boxes(boxes)
    n = len(b)
    cls = np.zeros(n, dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
    part = np.zeros(n, dtype=bool) if partial is None else np.asarray(partial, dtype=bool)
    ia, ib = candidate_pairs(b, b, labels=(cls, cls), min_ratio=0.0 if part.any() else iou_threshold)
    starts = np.searchsorted(ia, np.arange(n + 1))
    polys = shapely_polygons(b)
    area = areas(b)
    alive = np.ones(n, dtype=bool)
    keep: list[int] = []
    for i in np.asarray(order, dtype=np.int64).tolist():
        if not alive[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        alive[i] = False
        nb = ib[starts[i] : starts[i + 1]]
        nb = nb[alive[nb]]
        if len(nb):
            inter = shapely.area(shapely.intersection(polys[i], polys[nb]))
            hit = inter > iou_threshold * (area[i] + area[nb] - inter)
            hit |= part[nb] & (inter > cover_threshold * area[nb])
            alive[nb[hit]] = False
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, classes: np.ndarray | None = None,
        max_keep: int | None = None) -> np.ndarray:  # fmt: skip
    """Non-maximum suppression: indices of the boxes kept, by descending score (ties by index).

    A box is suppressed by a kept box of higher score (of the same class when ``classes`` is given) whose IoU
    with it is above ``iou_threshold``; at most ``max_keep`` boxes are kept. Axis-aligned sets go through
    ``torchvision.ops.batched_nms``, others through :func:`suppress` (exact polygon IoU).
    """
    b = _boxes(boxes)
    s = np.asarray(scores, dtype=np.float64)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    order = score_order(s)
    if is_axis_aligned(b).all():
        cls = np.zeros(len(b), dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
        hbb = torch.from_numpy(hbb_of(b[order]))
        keep = torchvision.ops.batched_nms(hbb, torch.from_numpy(s[order]), torch.from_numpy(cls[order]),
                                           iou_threshold)  # fmt: skip
        return order[np.sort(keep.numpy())][:max_keep]  # in our score order, whatever torch's sort did with ties
    return suppress(b, order, iou_threshold, classes, max_keep=max_keep)
