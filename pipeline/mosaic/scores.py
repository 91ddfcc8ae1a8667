"""Class scores as probabilities: what the tile store of a class product holds, and the score COG that shows them.

Blending averages the tiles that cover a pixel, so what is blended must be something whose average means
something: per-class probabilities are (a convex combination of probability vectors is one again, in ``[0, 1]`` and
summing to 1), logits are not (their scale differs from tile to tile and their blend is no tile's opinion). The
actor therefore turns a class product's model output into probabilities with :func:`to_probabilities` before it
writes a tile; the blended mosaic, its score COG (:func:`write_score_cog`, bands ``p(<class name>)``) and the
pooled per-tile vectors are then probabilities too.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.palette import default_colors

EXCLUSIVE = ("classes", "tile_classes")
"""Products of exclusive classes: one softmax over the classes."""
INDEPENDENT = ("tile_labels",)
"""Products of independent labels (multi-label): one sigmoid per class."""


def to_probabilities(scores_K: np.ndarray, product: str) -> np.ndarray:
    """Per-class probabilities of a class product's scores; continuous products pass through unchanged.

    Exclusive classes (``classes``: per pixel, ``tile_classes``: per tile) get a softmax over axis 0, computed
    stably (the maximum is subtracted first). A single-channel class output is one logit of the positive class and
    gets a sigmoid, matching the class map, which reads a single band as ``p(positive) >= 0.5``; so do independent
    labels (``tile_labels``, multi-label). NaN-safe: a NaN score counts as ``-inf`` (probability 0, as the class
    map's argmax treats it), and a location whose scores are all NaN (no data, or outside the grid) stays NaN in
    every class; no warnings are raised.

    Args:
        scores_K: ``(K, ...)`` scores, classes first: a ``(K, H, W)`` tile, a ``(K,)`` per-tile vector, ...
        product: the tile store's ``product`` attribute (``classes``, ``tile_classes``, ``tile_labels``,
            ``continuous``).

    Returns:
        float32 array of the same shape: probabilities in ``[0, 1]`` (summing to 1 over axis 0 for exclusive
        classes) wherever any score was a number; ``scores_K`` itself for other products.
    """
    if product not in (*EXCLUSIVE, *INDEPENDENT):
        return scores_K
    x = np.asarray(scores_K, dtype=np.float32)
    nodata = np.isnan(x).all(axis=0)
    x = np.where(np.isnan(x), -np.inf, x)
    if x.shape[0] == 1 or product in INDEPENDENT:
        with np.errstate(over="ignore"):
            p = 1.0 / (1.0 + np.exp(-x))
    else:
        top = np.where(nodata, 0.0, x.max(axis=0))
        e = np.exp(x - top[None])
        p = e / np.where(nodata, 1.0, e.sum(axis=0))[None]
    return np.where(nodata[None], np.nan, p).astype(np.float32)


def score_descriptions(class_names: list[str]) -> list[str]:
    """Band descriptions of a class product's score COG: ``p(<class name>)``."""
    return [f"p({name})" for name in class_names]


def write_score_cog(mosaic_url: str, cog_path: str, *, blocksize: int = 512) -> str:
    """The mosaic's ``data`` as a COG; for class products with bands ``p(<class name>)`` and the class names in tags.

    Continuous products are written by :func:`pipeline.mosaic.cog.write_cog` unchanged (bands named after the
    channels).

    Returns:
        ``cog_path``.
    """
    from pipeline.mosaic.cog import dataarray_to_cog, write_cog  # here: to_probabilities stays NumPy-only
    from pipeline.mosaic.stitch import MOSAIC_VAR, open_mosaic

    ds = open_mosaic(mosaic_url)
    if ds.attrs.get("product") != "classes":
        return write_cog(mosaic_url, cog_path, blocksize=blocksize)
    names = list(ds.attrs.get("class_names") or [str(b) for b in ds["band"].values])
    tags = {
        "kind": str(ds.attrs.get("kind", "")),
        "provenance": json.dumps(ds.attrs.get("provenance", {})),
        "values": "class probabilities",
        "class_names": json.dumps(names),
        "class_colors": json.dumps(list(ds.attrs.get("class_colors") or default_colors(len(names)))),
    }
    return dataarray_to_cog(
        ds[MOSAIC_VAR], cog_path, descriptions=score_descriptions(names), resampling="average", tags=tags,
        blocksize=blocksize,
    )  # fmt: skip
