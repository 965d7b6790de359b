"""Data pipeline: modality readers, the multi-modal folder dataset, joint transforms and synthetic scenes."""

from typing import Any

from .constants import (
    COCO_SEMSEG_NUM_CLASSES,
    DEPTH_PNG_SCALE,
    IMAGE_EXTENSIONS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    SEG_IGNORE_INDEX,
)
from .folder import MultiModalFolder
from .modalities import MODALITIES, DataFormatError, Modality, read_depth, read_rgb, read_semseg
from .transforms import MultiModalTransform, to_tensors

__all__ = [
    "COCO_SEMSEG_NUM_CLASSES",
    "DEPTH_PNG_SCALE",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGE_CLASSES",
    "IMAGE_EXTENSIONS",
    "MODALITIES",
    "OBJECT_CLASSES",
    "SEG_IGNORE_INDEX",
    "SEMSEG_CLASSES",
    "DataFormatError",
    "Modality",
    "MultiModalFolder",
    "MultiModalTransform",
    "ensure_synthetic_dataset",
    "load_difficulty",
    "read_depth",
    "read_rgb",
    "read_semseg",
    "to_tensors",
]

# Loaded on first use, so that `python -m attent_vision.data.synthetic` does not import the module twice.
_SYNTHETIC_NAMES = (
    "IMAGE_CLASSES",
    "OBJECT_CLASSES",
    "SEMSEG_CLASSES",
    "ensure_synthetic_dataset",
    "load_difficulty",
)


def __getattr__(name: str) -> Any:
    if name in _SYNTHETIC_NAMES:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
