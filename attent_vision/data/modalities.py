"""The modality registry (`MODALITIES`) and the per-modality image readers.

Each `Modality` record says how one modality is read from disk, turned into a tensor, resized, tokenised by
MultiMAE and scored in pretraining; everything else derives from it. The readers fail loudly, naming the file,
when a file has the wrong format.

This module does not import torch at load time (the `prepare` and `validate` tools use the readers without it);
the tensor converters import it when first called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .constants import DEPTH_PNG_SCALE, IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODALITIES",
    "IMAGE_MODALITY",
    "MODALITIES",
    "NORM_PIX_TASK",
    "DataFormatError",
    "Modality",
    "check_modalities",
    "get_modality",
    "image_size",
    "is_image_file",
    "loss_target",
    "output_tasks",
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


def _rgb_tensor(value: Any) -> torch.Tensor:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor → (3, H, W) uint8 tensor."""
    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor

    if isinstance(value, Image.Image):
        return pil_to_tensor(value.convert("RGB"))
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))
    return value


def _depth_tensor(value: Any) -> torch.Tensor:
    """Raw uint16 depth (array or tensor, (H, W) or (1, H, W)) → (1, H, W) float32 = value / 2**16.

    Depth is converted to float before any resampling: several torchvision kernels do not support uint16, and float
    keeps sub-unit precision when interpolating. Floating-point input is taken as already scaled.
    """
    import torch

    if isinstance(value, Image.Image):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        is_raw = not np.issubdtype(value.dtype, np.floating)
        depth = torch.from_numpy(value.astype(np.float32))
    else:
        is_raw = not value.is_floating_point()
        depth = value.to(torch.float32)
    if is_raw:
        depth = depth * (1.0 / DEPTH_PNG_SCALE)
    return depth if depth.ndim == 3 else depth.unsqueeze(0)


def _class_id_tensor(value: Any) -> torch.Tensor:
    """Class-id map (array or tensor, (H, W) or (1, H, W)) → (1, H, W) integer tensor (uint8 kept: resizes faster)."""
    import torch

    if isinstance(value, Image.Image):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            value = value.astype(np.int64)
        elif not (value.flags.writeable and value.flags.c_contiguous):
            # torch.from_numpy warns on read-only arrays (e.g. np.asarray of a PIL image).
            value = value.copy()
        value = torch.from_numpy(value)
    return value if value.ndim == 3 else value.unsqueeze(0)


@dataclass(frozen=True)
class Modality:
    """Everything the pipeline knows about one modality: how it is stored, resampled, tokenised and scored.

    The data pipeline (`MultiModalFolder`, `MultiModalTransform`), the model builders
    (`attent_vision.models.build_pretrain_multimae`, `build_multivit`), the pretraining losses and the config
    checks read this record, so a new modality is one more entry in `MODALITIES`.

    Args:
        name: Folder name and dictionary key of the modality.
        reader: Reads one file into a PIL image or numpy array.
        to_tensor: Turns what `reader` returns (or an array / tensor of the same data) into a (C, H, W) tensor,
            before any resampling.
        channels: C, the channels of the tensor the model sees and predicts (1 for a class-id map; its
            prediction has one logit per class instead).
        interpolation: The torchvision `InterpolationMode` value it is resized with.
        loss: Import path of its default pretraining loss (`attent_vision.models.losses`), built with
            `patch_size`, `stride` and `loss_kwargs`.
        loss_kwargs: Further arguments of `loss`.
        class_ids: A map of class ids rather than of measurements. MultiMAE embeds it (a learned 64-d vector per
            class) instead of projecting patches of it, reads and predicts it at `semseg_stride` times lower
            resolution, and predicts one logit per class; the transforms return it as int64 (H, W) at that
            stride.
        normalize: The transforms standardise it with their `rgb_mean` / `rgb_std` (after resizing the uint8
            values, as torchvision's image pipeline does).
        extension: Extension the synthetic generator writes (readers accept any image extension).
    """

    name: str
    reader: Callable[[str | os.PathLike[str]], Any]
    to_tensor: Callable[[Any], torch.Tensor]
    channels: int
    interpolation: str
    loss: str
    loss_kwargs: Mapping[str, Any] = field(default_factory=dict)
    class_ids: bool = False
    normalize: bool = False
    extension: str = "png"


# Filters: depth is bilinear, not bicubic: bicubic overshoots at depth discontinuities (object against wall),
# inventing depths in front of or behind both surfaces, even negative ones; bilinear stays within its neighbours'
# range. Labels use nearest-exact, which is nearest-neighbour sampling at pixel centres (what PIL's NEAREST does):
# torch's plain "nearest" samples the top-left of each source cell and shifts labels by up to half a downsampling
# step relative to the rgb and depth pixels they describe.
MODALITIES: dict[str, Modality] = {
    "rgb": Modality(
        "rgb",
        read_rgb,
        _rgb_tensor,
        channels=3,
        interpolation="bicubic",
        loss="attent_vision.models.losses.MaskedMSELoss",
        normalize=True,
    ),
    "depth": Modality(
        "depth",
        read_depth,
        _depth_tensor,
        channels=1,
        interpolation="bilinear",
        loss="attent_vision.models.losses.MaskedL1Loss",
    ),
    "semseg": Modality(
        "semseg",
        read_semseg,
        _class_id_tensor,
        channels=1,
        interpolation="nearest-exact",
        loss="attent_vision.models.losses.MaskedCrossEntropyLoss",
        class_ids=True,
    ),
}

# The modalities MultiMAE pretrains on by default, in token order.
DEFAULT_MODALITIES: tuple[str, ...] = ("rgb", "depth", "semseg")

# A bare tensor given to the model is this modality; the extra normalised-pixel output reconstructs it.
IMAGE_MODALITY = "rgb"
NORM_PIX_TASK = f"norm_{IMAGE_MODALITY}"


def get_modality(name: str) -> Modality:
    """Looks up a registered modality, naming the known ones when it is missing."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known modalities: {sorted(MODALITIES)}") from None


def check_modalities(kind: str, names: Sequence[str]) -> list[str]:
    """Returns `names` as a list after checking they are distinct registered modalities (at least one).

    Raises:
        ValueError: Naming `kind` (e.g. "in_domains") and the registered modalities.
    """
    names = list(names)
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; allowed: {list(MODALITIES)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{kind} must be a non-empty list of distinct modalities, got {names}")
    return names


def output_tasks(modalities: Sequence[str], *, norm_pix: bool) -> list[str]:
    """The pretraining output tasks: every modality, then the normalised-pixel output when it is on."""
    return [*modalities, *([NORM_PIX_TASK] if norm_pix else [])]


def loss_target(task: str) -> str:
    """The modality an output task is compared with (the normalised-pixel output reconstructs the image)."""
    return IMAGE_MODALITY if task == NORM_PIX_TASK else task


def image_size(value: Image.Image | np.ndarray) -> tuple[int, int]:
    """Returns (height, width) of a PIL image or an (H, W[, C]) array."""
    if isinstance(value, Image.Image):
        return value.height, value.width
    return int(value.shape[0]), int(value.shape[1])


def is_image_file(path: str | Path) -> bool:
    """Whether the file name has one of the accepted image extensions (case-insensitive)."""
    return Path(path).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
