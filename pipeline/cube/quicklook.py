"""PNG quicklooks of a cube, one per modality, written beside it (``<cube>.quicklooks/<modality>.png``).

Each shows the date with the most valid pixels, read with a stride so that the longer side is at most ``max_size``
pixels (memory stays small for any cube), stretched per channel between the 2nd and 98th percentiles of the valid
pixels. Invalid pixels are black.
"""

from __future__ import annotations

import io
import logging
import math

import fsspec
import numpy as np
import zarr
from PIL import Image

from pipeline.cube import layout
from pipeline.cube.manifest import sidecar_url
from pipeline.modalities import DEFAULT_MODALITIES

log = logging.getLogger(__name__)


def _channels(bands: list[str], modality: str) -> list[tuple[int, int | None]]:
    """(band index, subtracted band index or None) per RGB channel (the modality's ``quicklook`` recipe)."""
    spec = DEFAULT_MODALITIES.get(modality)
    recipe = spec.quicklook if spec is not None else None
    names = set(bands)
    if recipe and all(all(p in names for p in c.split("-")) for c in recipe):
        out = []
        for c in recipe:
            a, _, b = c.partition("-")
            out.append((bands.index(a), bands.index(b) if b else None))
        return out
    return [(min(i, len(bands) - 1), None) for i in range(3)]  # fallback: first three bands (or grey)


def stretch(x: np.ndarray, valid: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
    """Map ``x`` to uint8 between its ``lo`` and ``hi`` percentiles over ``valid`` pixels; invalid -> 0."""
    good = valid & np.isfinite(x)
    if not good.any():
        return np.zeros(x.shape, dtype=np.uint8)
    a, b = np.percentile(x[good], [lo, hi])
    scaled = np.clip((x - a) / max(b - a, 1e-12), 0.0, 1.0) * 254.0 + 1.0  # 1..255: 0 is reserved for invalid
    return np.where(good, scaled, 0).astype(np.uint8)


def quicklook_array(url: str, modality: str, max_size: int = 1024) -> np.ndarray:
    """(h, w, 3) uint8 RGB quicklook of one modality group, at most ``max_size`` pixels on its longer side."""
    group = zarr.open_group(url, mode="r", zarr_format=3)[modality]
    data, valid = group[layout.DATA_VAR], group[layout.VALID_VAR]
    _, _, h, w = data.shape
    step = max(1, math.ceil(max(h, w) / max_size))
    fractions = group.attrs.get("valid_fraction")
    if fractions is None:
        fractions = [float(valid[t, ::step, ::step].mean()) for t in range(data.shape[0])]
    t = int(np.argmax(fractions))
    bands = [str(b) for b in group["band"][:]]
    mask = valid[t, ::step, ::step].astype(bool)
    channels = _channels(bands, modality)
    needed = sorted({i for pair in channels for i in pair if i is not None})
    # One strided, orthogonal read: every chunk is decoded once for all needed bands.
    planes = data.get_orthogonal_selection((t, needed, slice(None, None, step), slice(None, None, step)))
    rgb = []
    for a, b in channels:
        x = planes[needed.index(a)]
        if b is not None:
            x = x - planes[needed.index(b)]
        rgb.append(stretch(x, mask))
    return np.stack(rgb, axis=-1)


def write_quicklooks(url: str, max_size: int = 1024) -> list[str]:
    """Write one PNG per modality group of the cube at ``url``; returns their paths/URLs."""
    root = zarr.open_group(url, mode="r", zarr_format=3)
    out_dir = sidecar_url(url, "quicklooks")
    fs, base = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(base, exist_ok=True)
    written = []
    for modality in root.attrs.get("modalities", []):
        buf = io.BytesIO()
        Image.fromarray(quicklook_array(url, modality, max_size)).save(buf, format="PNG")
        path = f"{base.rstrip('/')}/{modality}.png"
        fs.pipe_file(path, buf.getvalue())
        written.append(f"{out_dir.rstrip('/')}/{modality}.png")
        log.info("quicklook %s", written[-1])
    return written
