"""Labelled data for fine-tuning: a typed data spec per on-disk format, and adapters that return samples.

* :mod:`.spec`: the data spec (``class_folders``, ``raster_pairs``, ``change_folders``, ``bigearthnet``, ``cube``,
  and the object-box formats ``dota``, ``voc``, ``vector_boxes`` of :mod:`.boxes`), validated once at the edge;
* :func:`open_dataset`: one split of a dataset as a :class:`LabelledSource` of samples in the contract of
  :mod:`pipeline.finetune.sample`, normalised for the model's bands; :func:`label_stats` for class weights;
* shared pieces: :mod:`.splits` (explicit, seeded, stratified, spatially blocked), :mod:`.geometry` (views, zoom,
  flips, windows), :mod:`.labels` (raw values -> classes, IGNORE), :mod:`.readers` (files, bands, errors).
"""

from .open import label_stats, open_dataset
from .source import LabelledSource
from .spec import DataSpec, DataSpecError, parse_data_spec

__all__ = ["DataSpec", "DataSpecError", "LabelledSource", "label_stats", "open_dataset", "parse_data_spec"]
