"""Class scores as probabilities: what the tile store of a class product holds, and the score COG that shows them.

Blending averages the tiles that cover a pixel, so what is blended must be something whose average means
something: per-class probabilities are (a convex combination of probability vectors is one again, in ``[0, 1]`` and
summing to 1), logits are not (their scale differs from tile to tile and their blend is no tile's opinion). The
actor therefore stores a class product's model output through the kind's activation
(:meth:`pipeline.kinds.OutputKind.activate`: softmax over classes, sigmoid for independent labels); the blended
mosaic, its score COG (:func:`write_score_cog`, bands ``p(<class name>)``) and the pooled per-tile vectors are then
probabilities too.
"""

from __future__ import annotations

import json

from pipeline.palette import default_colors

EXCLUSIVE = ("classes", "tile_classes")
"""Products of exclusive classes (probabilities sum to 1 over the classes)."""
INDEPENDENT = ("tile_labels",)
"""Products of independent labels (multi-label: one probability per class)."""


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
    from pipeline.mosaic.cog import dataarray_to_cog, write_cog
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
