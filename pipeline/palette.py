"""Colours of class maps: a fixed palette (tab20, then golden-ratio hues) shared by COG colour tables and PNGs.

Class ``i`` always gets colour ``i`` unless a checkpoint or job names its own colours, so maps of one model look
the same in QGIS (the COG's colour table) and in the quicklooks. Index 255 is the no-data value of class maps.
"""

from __future__ import annotations

import numpy as np

CLASS_NODATA = 255
"""No-data value of uint8 class maps."""

_TAB20 = [
    "1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf",
    "aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5", "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5",
]  # fmt: skip


def hex_to_rgb(colours: list[str]) -> np.ndarray:
    """``["1f77b4", "#ff7f0e"]`` -> ``(n, 3)`` float64 RGB in 0..255."""
    cs = [c.lstrip("#") for c in colours]
    return np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in cs], dtype=np.float64).reshape(-1, 3)


def rgb_to_hex(rgb: np.ndarray) -> list[str]:
    """``(n, 3)`` RGB in 0..255 -> ``["#1f77b4", ...]``."""
    return ["#" + "".join(f"{int(v):02x}" for v in row) for row in np.asarray(rgb).round().astype(int)]


def _palette() -> np.ndarray:
    """``(256, 3)`` uint8 class colours; index 255 (no data) is black (and transparent in PNGs)."""
    hues = (np.arange(20, 256) * 0.618033988749895) % 1.0
    sat, val = 0.65, 0.9
    k = (np.array([5, 3, 1])[None] + hues[:, None] * 6) % 6  # HSV -> RGB, vectorised
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    out = np.vstack([hex_to_rgb(_TAB20), rgb * 255])
    out[CLASS_NODATA] = 0
    return np.round(out).astype(np.uint8)


PALETTE = _palette()


def default_colors(n: int) -> list[str]:
    """The palette's first ``n`` colours as ``#rrggbb``."""
    if not 0 < n < CLASS_NODATA:
        raise ValueError(f"{n} classes do not fit a uint8 class map (1..{CLASS_NODATA - 1})")
    return rgb_to_hex(PALETTE[:n])


def palette_for(colors: list[str] | None) -> np.ndarray:
    """``(256, 3)`` uint8 palette with the first entries replaced by ``colors`` (``#rrggbb``), if given."""
    out = PALETTE.copy()
    if colors:
        out[: len(colors)] = hex_to_rgb(colors).round().astype(np.uint8)
    return out
