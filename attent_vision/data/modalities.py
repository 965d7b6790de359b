"""Per-modality image readers that fail loudly, naming the file, when a file has the wrong format."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .constants import IMAGE_EXTENSIONS

__all__ = [
    "MODALITIES",
    "DataFormatError",
    "Modality",
    "get_modality",
    "image_size",
    "is_image_file",
    "read_depth",
    "read_rgb",
    "read_semseg",
]

# Pillow modes that carry 16-bit single-channel data ("I" is how some Pillow versions and TIFFs expose it).
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SEMSEG_MODES = ("L", "P")


class DataFormatError(ValueError):
    """A data file or folder does not have the layout or format the pipeline expects."""


def _open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Opens and fully decodes an image, so that truncated or garbage files fail here and not later."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataFormatError(f"{path}: cannot decode image ({exc})") from exc
    return image


def read_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Reads a colour image as 8-bit RGB.

    Args:
        path: Image file (any format Pillow reads).

    Returns:
        The image in mode "RGB".

    Raises:
        DataFormatError: The file is not a decodable image, or holds 16-bit / float data (likely a depth map).
    """
    image = _open_image(path)
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow would clip these to 0..255 and return a mostly white image.
        raise DataFormatError(f"{path}: rgb must be an 8-bit colour image, got mode {image.mode!r}")
    return image.convert("RGB")


def read_depth(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a depth map stored as a 16-bit single-channel PNG.

    Args:
        path: 16-bit greyscale image file.

    Returns:
        A native-endian uint16 array of shape (H, W) with the raw stored values.

    Raises:
        DataFormatError: The file is not decodable, or is not 16-bit single-channel (an 8-bit "L" depth map has lost
            almost all of its precision and is rejected).
    """
    image = _open_image(path)
    if image.mode not in _DEPTH_MODES:
        raise DataFormatError(
            f"{path}: depth must be a 16-bit single-channel image (Pillow mode I;16), got mode {image.mode!r}"
        )
    depth = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    if image.mode == "I" and depth.size and (depth.min() < 0 or depth.max() > np.iinfo(np.uint16).max):
        raise DataFormatError(
            f"{path}: depth values span [{depth.min()}, {depth.max()}], outside the 16-bit range [0, 65535]"
        )
    return depth.astype(np.uint16, copy=False)


def read_semseg(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a semantic segmentation map of class ids.

    Args:
        path: Single-channel image file; palette ("P") images are read as their raw palette indices.

    Returns:
        A uint8 array of class ids with shape (H, W).

    Raises:
        DataFormatError: The file is not decodable, or is not single-channel "L" / "P" (colour-coded labels must be
            converted to ids first).
    """
    image = _open_image(path)
    if image.mode not in _SEMSEG_MODES:
        raise DataFormatError(
            f"{path}: semseg must be a single-channel image of class ids (mode 'L' or 'P'), got mode {image.mode!r}; "
            "convert colour-coded labels to class ids first"
        )
    # np.array on a "P" image yields the palette indices, i.e. the class ids, not the palette colours.
    return np.array(image, dtype=np.uint8)


@dataclass(frozen=True)
class Modality:
    """How one modality is stored on disk.

    Args:
        name: Folder name and dictionary key of the modality.
        reader: Reads one file into a PIL image or numpy array.
        extension: Extension the synthetic generator writes (readers accept any image extension).
    """

    name: str
    reader: Callable[[str | os.PathLike[str]], Any]
    extension: str


MODALITIES: dict[str, Modality] = {
    "rgb": Modality("rgb", read_rgb, "png"),
    "depth": Modality("depth", read_depth, "png"),
    "semseg": Modality("semseg", read_semseg, "png"),
}


def get_modality(name: str) -> Modality:
    """Looks up a registered modality, naming the known ones when it is missing."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known modalities: {sorted(MODALITIES)}") from None


def image_size(value: Image.Image | np.ndarray) -> tuple[int, int]:
    """Returns (height, width) of a PIL image or an (H, W[, C]) array."""
    if isinstance(value, Image.Image):
        return value.height, value.width
    return int(value.shape[0]), int(value.shape[1])


def is_image_file(path: str | Path) -> bool:
    """Whether the file name has one of the accepted image extensions (case-insensitive)."""
    return Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
