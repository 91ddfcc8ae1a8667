"""Inference stage: region partitioning, tile reading, Ray actor inference, tile store and manifests.

``run_inference`` (:mod:`pipeline.infer.runner`) is the library entry point; ``skypipe run`` (:mod:`pipeline.run`)
chains it with the cube and mosaic stages. Names are imported on first use so ``skypipe --help`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_inference": "pipeline.infer.runner",
    "prepare_store": "pipeline.infer.runner",
    "connect_ray": "pipeline.infer.runner",
    "InferenceReport": "pipeline.infer.runner",
    "TileProcessor": "pipeline.infer.actor",
    "InferenceWorker": "pipeline.infer.actor",
    "CubeReader": "pipeline.infer.reader",
    "output_grid": "pipeline.infer.reader",
    "Tile": "pipeline.infer.tiling",
    "plan_tiles": "pipeline.infer.tiling",
    "TileManifest": "pipeline.infer.store",
    "TileStoreMismatchError": "pipeline.infer.store",
    "describe_task": "pipeline.infer.task",
    "load_task": "pipeline.infer.task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
