"""Data pipeline: modality readers, the multi-modal folder dataset, joint transforms, synthetic scenes,
downstream datasets and the preparation tools for real datasets.

Names are loaded on first use, so that command-line tools in this package (``python -m
attent_vision.data.prepare``, ``python -m attent_vision.data.synthetic``) start without importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "COCO_SEMSEG_NUM_CLASSES": "constants",
    "DEPTH_PNG_SCALE": "constants",
    "IMAGENET_DEFAULT_MEAN": "constants",
    "IMAGENET_DEFAULT_STD": "constants",
    "IMAGE_EXTENSIONS": "constants",
    "SEG_IGNORE_INDEX": "constants",
    "MultiModalFolder": "folder",
    "MODALITIES": "modalities",
    "DataFormatError": "modalities",
    "Modality": "modalities",
    "read_depth": "modalities",
    "read_rgb": "modalities",
    "read_semseg": "modalities",
    "MultiModalTransform": "transforms",
    "to_tensors": "transforms",
    "IMAGE_CLASSES": "synthetic",
    "OBJECT_CLASSES": "synthetic",
    "SEMSEG_CLASSES": "synthetic",
    "ensure_synthetic_dataset": "synthetic",
    "load_difficulty": "synthetic",
    "ClassificationDataModule": "downstream",
    "DenseDataModule": "downstream",
    "ensure_classification_scenes": "synthetic_downstream",
    "ensure_nyu_like_scenes": "synthetic_downstream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
