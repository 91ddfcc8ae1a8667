"""The SkySense V2 model: layers, backbone, fusion, heads and self-describing checkpoints."""

from .config import MODEL_CONFIGS, SkySenseConfig, get_config
from .skysense import ModalityInput, SkySenseV2, create_model

__all__ = ["MODEL_CONFIGS", "ModalityInput", "SkySenseConfig", "SkySenseV2", "create_model", "get_config"]
