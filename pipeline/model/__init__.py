"""The SkySense V2 model: layers, backbone, fusion, heads and self-describing checkpoints.

The names below load on first use (PEP 562), so that importing a light sub-module such as
``pipeline.model.config`` (the CLI's parser does) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "MODEL_CONFIGS": ".config",
    "SkySenseConfig": ".config",
    "get_config": ".config",
    "ModalityInput": ".skysense",
    "SkySenseV2": ".skysense",
    "create_model": ".skysense",
}

__all__ = ["MODEL_CONFIGS", "ModalityInput", "SkySenseConfig", "SkySenseV2", "create_model", "get_config"]

if TYPE_CHECKING:
    from .config import MODEL_CONFIGS, SkySenseConfig, get_config
    from .skysense import ModalityInput, SkySenseV2, create_model


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
