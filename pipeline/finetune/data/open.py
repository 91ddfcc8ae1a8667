"""Opening a dataset split for a model, and label statistics for class weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.modalities import ModalitySpec

from .bigearthnet import BigEarthNetLabelled
from .cube import CubeLabelled
from .dota import DotaSource
from .folders import ChangeFoldersSource, ClassFoldersSource
from .rasters import RasterPairsSource
from .source import LabelledSource, split_index
from .spec import (
    BigEarthNetSpec,
    ChangeFoldersSpec,
    ClassFoldersSpec,
    CubeDataSpec,
    DotaSpec,
    RasterPairsSpec,
    VectorBoxesSpec,
    VocSpec,
)
from .vector_boxes import VectorBoxesSource
from .voc import VocSource

ADAPTERS: dict[type, type[LabelledSource]] = {
    ClassFoldersSpec: ClassFoldersSource,
    RasterPairsSpec: RasterPairsSource,
    ChangeFoldersSpec: ChangeFoldersSource,
    BigEarthNetSpec: BigEarthNetLabelled,
    CubeDataSpec: CubeLabelled,
    DotaSpec: DotaSource,
    VocSpec: VocSource,
    VectorBoxesSpec: VectorBoxesSource,
}
"""The adapter class of each spec type (a new format is one spec model and one adapter)."""


def open_dataset(spec: Any, split: str, model_specs: Mapping[str, ModalitySpec], *, train: bool,
                 seed: int = 0) -> LabelledSource:  # fmt: skip
    """One split of a dataset as labelled samples for a model.

    Args:
        spec: a validated data spec (:data:`~.spec.DataSpec`).
        split: ``train``, ``val`` or ``test``.
        model_specs: the model's modalities (band order and normalisation come from the checkpoint).
        train: augment samples (zoom per ``scale``, flips, rotations) when ``get`` is given an ``rng``.
        seed: the task's seed: seeds the split when the spec's ``split.seed`` is not given (open every split of a
            task with the same seed).

    Raises:
        ValueError: bad split name, no training samples, or data the model cannot take (subclasses name the file).
    """
    split_index(split)
    try:
        adapter = ADAPTERS[type(spec)]
    except KeyError:
        raise TypeError(f"not a data spec: {type(spec).__name__}; validate it with parse_data_spec") from None
    source = adapter(spec, split, model_specs, train, seed)
    if source.colors is not None and source.classes is not None and len(source.colors) != len(source.classes):
        raise ValueError(
            f"{spec.path}: {len(source.colors)} colors for the {len(source.classes)} classes {source.classes}"
        )
    if split == "train" and len(source) == 0:
        raise ValueError(f"{spec.path}: the train split has no samples ({source.describe()})")
    return source


def label_stats(source: LabelledSource) -> dict[str, Any]:
    """Label statistics of a source, for class weights and the checkpoint's provenance.

    Returns:
        classification / segmentation / change / detection: ``counts`` (samples, labelled pixels or objects per
        class), ``frequencies``
        and ``weights`` (median-frequency balancing: ``median(f) / f``, 0 for absent classes); multilabel: positives
        per class, their frequencies over samples and ``pos_weight`` (negatives / positives, for BCE); regression:
        ``count``, ``mean``, ``std``, ``min``, ``max`` of the labelled values.
    """
    st = source.stats
    out: dict[str, Any] = {"task": source.task, "classes": source.classes, "samples": len(source)}
    if st.counts is None:
        mean = st.total / st.count if st.count else float("nan")
        var = st.total_sq / st.count - mean * mean if st.count else float("nan")
        return out | {"count": st.count, "mean": mean, "std": float(np.sqrt(max(var, 0.0))), "min": st.low,
                      "max": st.high}  # fmt: skip
    counts = st.counts.astype(np.float64)
    if source.task == "multilabel":
        n = max(len(source), 1)
        pos_weight = np.where(counts > 0, (n - counts) / np.maximum(counts, 1), 0.0)
        return out | {"counts": st.counts.tolist(), "frequencies": (counts / n).tolist(),
                      "pos_weight": pos_weight.tolist()}  # fmt: skip
    freq = counts / max(counts.sum(), 1.0)
    present = freq[freq > 0]
    median = float(np.median(present)) if present.size else 0.0
    weights = np.where(freq > 0, median / np.where(freq > 0, freq, 1.0), 0.0)
    return out | {"counts": st.counts.tolist(), "frequencies": freq.tolist(), "weights": weights.tolist()}
