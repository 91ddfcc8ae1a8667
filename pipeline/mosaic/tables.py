"""GeoParquet tables of class products: per-tile labels of classification outputs, and what every table shares.

``tile_labels.parquet`` (:func:`write_tile_labels`), one row per done tile of a class product's tile store::

    tile_id, row, col      the tile and its origin on the output grid
    label, class_id        the most probable class (name and index)
    score                  its probability
    labels                 multi-label products only: every class with probability >= 0.5
    p_<class name>         one column per class: the tile's probability of that class
    job, kind, model, code_version, checkpoint, checkpoint_sha256, time_start, time_end   provenance
    geometry               the tile's footprint clipped to the grid, in the grid CRS

The per-tile vectors come from the tile store's ``pooled`` array: a classification model writes its one score
vector per tile there (``data`` stays empty); for a per-pixel class product it is the tile's mean per-pixel
probability. What the vectors are is read from the store's ``product`` attribute: exclusive class probabilities
(``classes``, ``tile_classes``: they sum to 1) or independent per-class probabilities (``tile_labels``,
multi-label). The tile store of these products holds probabilities (the kind's activation, applied by the actor),
and a table of anything else is refused rather than mislabelled.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import shapely

from pipeline import storage
from pipeline.infer.store import open_tile_store
from pipeline.mosaic.scores import EXCLUSIVE, INDEPENDENT

TILE_LABELS = "tile_labels.parquet"
PRESENT = 0.5
"""Probability from which a class counts as present in a multi-label tile."""
_SUM_TOLERANCE = 1e-3  # float32 probabilities averaged over a tile still sum to 1 within ~1e-6


def _times(value: Any) -> list[str]:
    """Every date or datetime in a provenance ``time`` (one ``[start, end]`` or one per period), as text."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _times(v)]
    return [str(value)]


def provenance_columns(provenance: Mapping[str, Any], *, kind: str, job: str | None = None) -> dict[str, Any]:
    """The provenance of a job's outputs as table columns (one value each, repeated on every row).

    ``time_start`` / ``time_end`` span every period of the job (both periods of a change job).
    """
    times = sorted(_times(provenance.get("time")))
    text = {k: None if provenance.get(k) is None else str(provenance[k]) for k in
            ("model", "code_version", "checkpoint", "checkpoint_sha256")}  # fmt: skip
    return {"job": job, "kind": kind, **text, "time_start": times[0] if times else None,
            "time_end": times[-1] if times else None}  # fmt: skip


def write_geoparquet(table: gpd.GeoDataFrame, url: str) -> str:
    """Write ``table`` as GeoParquet at ``url`` (local path or fsspec URL) in one atomic write; returns ``url``."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes(url, buffer.getvalue())
    return url


def tile_labels_table(tiles_url: str, *, job: str | None = None) -> gpd.GeoDataFrame:
    """The label of every done tile of a class product (see the module docstring for the columns).

    Args:
        tiles_url: a ``tiles.zarr`` whose ``product`` is ``classes``, ``tile_classes`` or ``tile_labels``.
        job: job name for the provenance columns.

    Raises:
        ValueError: the store is not a class product, or its pooled scores are not probabilities.
    """
    store = open_tile_store(tiles_url)
    names = store.class_names
    multi = store.product in INDEPENDENT
    if store.product not in (*EXCLUSIVE, *INDEPENDENT) or not names:
        raise ValueError(f"{tiles_url} holds a {store.product!r} product, not class scores: no tile labels")
    done = store.done
    probs = np.asarray(store.group["pooled"][:], dtype=np.float64)[done].reshape(len(done), len(names))
    scored = ~np.isnan(probs).all(axis=1)
    p = np.nan_to_num(probs[scored])
    bad = ((p < -_SUM_TOLERANCE) | (p > 1 + _SUM_TOLERANCE)).any(axis=1)
    if not multi:
        bad |= np.abs(p.sum(axis=1) - 1) > _SUM_TOLERANCE
    if bad.any():
        tile = int(done[scored][bad][0])
        raise ValueError(
            f"{tiles_url}: the pooled scores of {int(bad.sum())} tile(s) are not probabilities (tile {tile}: "
            f"{np.round(p[bad][0], 4).tolist()}); a class product's tiles must hold the kind's activated scores "
            "(pipeline.kinds.OutputKind.activate)"
        )
    class_id = np.full(len(done), -1, dtype=np.int64)
    class_id[scored] = np.argmax(p, axis=1)
    score = np.full(len(done), np.nan)
    score[scored] = p.max(axis=1)
    bounds = np.array([store.footprint_bounds(i) for i in done.tolist()]).reshape(-1, 4)
    columns: dict[str, Any] = {
        "tile_id": done,
        "row": store.origins[done, 0],
        "col": store.origins[done, 1],
        "label": [names[c] if c >= 0 else None for c in class_id.tolist()],
        "class_id": class_id,
        "score": score,
        **({"labels": [[n for n, q in zip(names, row) if q >= PRESENT] for row in probs.tolist()]} if multi else {}),
        **{f"p_{name}": probs[:, k] for k, name in enumerate(names)},
        **provenance_columns(store.provenance, kind=store.kind, job=job),
    }
    geometry = shapely.box(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
    table = gpd.GeoDataFrame(pd.DataFrame(columns, index=pd.RangeIndex(len(done))), geometry=geometry, crs=store.crs)
    table.attrs["class_names"] = list(names)
    table.attrs["multi_label"] = multi
    return table


def label_counts(labels: pd.Series | list[Any], class_names: list[str]) -> dict[str, int]:
    """Tiles per class (every class listed, zero included), in class order.

    ``labels`` holds one name per tile, or a list of names per tile (multi-label: a tile counts for each).
    """
    flat = [n for v in labels for n in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
    counts = pd.Series(flat, dtype=object).value_counts()
    return {name: int(counts.get(name, 0)) for name in class_names}


def format_label_counts(counts: Mapping[str, int], tiles: int) -> list[str]:
    """Summary lines: tiles and share of the ``tiles`` labelled per class."""
    width = max([5, *(len(n) for n in counts)])
    lines = [f"{'label':<{width}}  {'tiles':>8}  {'share':>7}"]
    for name, n in counts.items():
        lines.append(f"{name:<{width}}  {n:>8,}  {100 * n / max(tiles, 1):6.1f} %")
    lines.append(f"{'tiles':<{width}}  {tiles:>8,}")
    return lines


def tile_label_counts(url: str) -> tuple[dict[str, int], int]:
    """Tiles per class of a written ``tile_labels.parquet``, and the number of tiles.

    The classes are its ``p_<class name>`` columns; multi-label tables count every present class of a tile.
    """
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        file = pq.ParquetFile(f)
        columns = file.schema_arrow.names
        names = [c.removeprefix("p_") for c in columns if c.startswith("p_")]
        labels = file.read(columns=["labels" if "labels" in columns else "label"]).column(0).to_pylist()
    return label_counts(labels, names), len(labels)


def count_rows(url: str) -> int:
    """Rows of a Parquet file (from its footer)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def write_tile_labels(tiles_url: str, out_url: str, *, job: str | None = None) -> tuple[str, dict[str, int]]:
    """Write :func:`tile_labels_table` of ``tiles_url`` as GeoParquet at ``out_url``.

    Returns:
        ``out_url`` and the tiles per class (:func:`label_counts`).
    """
    table = tile_labels_table(tiles_url, job=job)
    write_geoparquet(table, out_url)
    labels = table["labels"] if table.attrs["multi_label"] else table["label"]
    return out_url, label_counts(labels, table.attrs["class_names"])
