"""Where a sample's pixels come from: a square view on a scene, zoom/flip augmentation, and windows over scenes.

Every adapter works on a *reference grid* (the label raster's grid, or the finest modality's): a :class:`View` is a
square box on it (may extend past the scene: those pixels are padding, invalid inputs and IGNORE labels) plus
flips and a 90-degree rotation. Each layer (a modality's raster, the label) is cut with the same view scaled by its
own pixel ratio (:func:`layer_box`), resized to its output size (bilinear for images, nearest for labels) and
oriented alike (:func:`orient`), so inputs and labels stay aligned whatever the augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class View:
    """A square box (``top``, ``left``, ``side`` in reference pixels) and an orientation (flip x, flip y, rot90)."""

    top: float
    left: float
    side: float
    flip_x: bool = False
    flip_y: bool = False
    rot: int = 0


def window_origins(extent: int, side: float) -> list[float]:
    """Origins along one axis of windows of ``side`` px tiling ``[0, extent)``.

    Windows step by ``side``; the last one is moved back to end at the edge (it overlaps its neighbour rather than
    reading padding). A scene smaller than one window gets one centred window (padded on both sides).
    """
    if extent <= side:
        return [(extent - side) / 2]
    n = math.ceil(extent / side - 1e-9)
    return [min(i * side, extent - side) for i in range(n)]


def _place(start: float, side: float, extent: int) -> float:
    """``start`` clamped so that a box of ``side`` stays inside ``[0, extent)``, or centred when it cannot."""
    if side >= extent:
        return (extent - side) / 2
    return min(max(start, 0.0), extent - side)


def plan_view(shape: tuple[int, int], top: float, left: float, side: float, rng: np.random.Generator | None,
              scale: tuple[float, float] = (1.0, 1.0), jitter: float | None = None,
              quantum: float = 1.0) -> View:  # fmt: skip
    """The view of the box (``top``, ``left``, ``side``) on a scene of ``shape`` (H, W), augmented with ``rng``.

    Args:
        shape: scene size on the reference grid.
        top, left, side: the sample's box (its window, or the centred footprint of an image).
        rng: None = the box itself, unaugmented.
        scale: zoom range: the box side is divided by a factor drawn log-uniformly from it (2 = zoom in twice).
        jitter: the box centre moves by up to this many pixels per axis; None = anywhere inside the scene.
        quantum: boxes are snapped to multiples of this many reference pixels (the coarsest layer's pixel), so
            every layer is cut on whole pixels of its own grid.

    """
    if rng is None:
        return View(top, left, side)
    lo, hi = (math.log(s) for s in scale)
    s = side / math.exp(rng.uniform(lo, hi)) if hi > lo else side / scale[0]
    s = max(quantum, round(s / quantum) * quantum)
    H, W = shape
    if jitter is None:
        t = rng.uniform(0, max(H - s, 0))
        lft = rng.uniform(0, max(W - s, 0))
    else:
        t = top + side / 2 + rng.uniform(-jitter, jitter) - s / 2
        lft = left + side / 2 + rng.uniform(-jitter, jitter) - s / 2
    t, lft = (round(_place(v, s, n) / quantum) * quantum for v, n in ((t, H), (lft, W)))
    return View(t, lft, s, bool(rng.random() < 0.5), bool(rng.random() < 0.5), int(rng.integers(0, 4)))


def layer_box(view: View, ratio: float) -> tuple[int, int, int]:
    """(row, col, side) of ``view`` on a layer with ``ratio`` layer pixels per reference pixel (whole pixels)."""
    return round(view.top * ratio), round(view.left * ratio), max(1, round(view.side * ratio))


def crop(arr: np.ndarray, y0: int, x0: int, n: int, fill: float) -> np.ndarray:
    """``arr[..., y0:y0+n, x0:x0+n]`` with pixels outside the array set to ``fill``."""
    H, W = arr.shape[-2:]
    if min(y0, x0) >= 0 and y0 + n <= H and x0 + n <= W:
        return arr[..., y0 : y0 + n, x0 : x0 + n]
    out = np.full((*arr.shape[:-2], n, n), fill, dtype=np.result_type(arr.dtype, fill))
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y0 + n, H), max(x0, 0), min(x0 + n, W)
    if cy0 < cy1 and cx0 < cx1:
        out[..., cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[..., cy0:cy1, cx0:cx1]
    return out


def resize(x: Tensor, size: int, nearest: bool = False) -> Tensor:
    """(..., n, n) -> (..., size, size): antialiased bilinear (images, NaN spreads = invalid) or nearest (labels)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    lead = x.shape[:-2]
    flat = x.reshape(1, -1, *x.shape[-2:])
    if nearest:
        out = F.interpolate(flat.double(), size=(size, size), mode="nearest-exact").to(x.dtype)
    else:
        out = F.interpolate(flat.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*lead, size, size)


def orient(x: Tensor, view: View) -> Tensor:
    """Apply the view's flips and rotation to the last two axes."""
    if view.flip_x:
        x = x.flip(-1)
    if view.flip_y:
        x = x.flip(-2)
    return torch.rot90(x, view.rot, dims=(-2, -1)).contiguous() if view.rot else x.contiguous()


def finish(block: np.ndarray, view: View, size: int, nearest: bool = False) -> Tensor:
    """A layer's block already cut at :func:`layer_box`, resized to ``size`` and oriented like ``view``."""
    return orient(resize(torch.from_numpy(np.ascontiguousarray(block)), size, nearest), view)


def cut(arr: np.ndarray, view: View, ratio: float, size: int, fill: float, nearest: bool = False) -> Tensor:
    """One in-memory layer (..., H, W) seen through ``view``: cropped, resized to ``size`` and oriented."""
    y0, x0, n = layer_box(view, ratio)
    return finish(crop(arr, y0, x0, n, fill), view, size, nearest)
