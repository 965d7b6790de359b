"""Joint augmentation of the modalities: one crop and one flip decision shared by every modality."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .modalities import MODALITIES

__all__ = ["MultiModalTransform", "to_tensors"]

InterpolationMode = v2.InterpolationMode


def _as_tensors(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    unknown = set(sample) - set(MODALITIES)
    if unknown:
        raise ValueError(f"cannot transform modalities {sorted(unknown)}; supported: {list(MODALITIES)}")
    tensors = {name: MODALITIES[name].to_tensor(value) for name, value in sample.items()}
    sizes = {name: tuple(t.shape[-2:]) for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"modalities differ in size (H, W): {sizes}")
    return tensors


def to_tensors(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Converts raw modalities to tensors without resizing or augmentation.

    Args:
        sample: Registered modalities (`modalities.MODALITIES`), e.g. "rgb" (PIL image or HWC uint8), "depth"
            (raw uint16), "semseg" (class ids).

    Returns:
        Each modality as its registry converter gives it, e.g. rgb as uint8 (3, H, W) and depth as float32
        (1, H, W) = raw / 2**16; class-id maps (semseg) as int64 (H, W).
    """
    tensors = _as_tensors(sample)
    for name, tensor in tensors.items():
        if MODALITIES[name].class_ids:
            tensors[name] = tensor.squeeze(0).to(torch.int64)
    return tensors


class MultiModalTransform:
    """Crops, resizes, flips and converts the modalities of a sample with the same geometry for every modality.

    Train mode draws one RandomResizedCrop box and one horizontal-flip decision from torch's global RNG (so
    DataLoader worker seeding applies) and applies them to every modality, each with its own filter from the
    registry (`modalities.MODALITIES`; with antialiasing): bicubic for rgb, bilinear for depth, nearest-exact for
    labels. The box is drawn once with torchvision's `RandomResizedCrop.get_params` and applied with
    `v2.functional` kernels, because a single v2 transform object carries one interpolation for all images and
    rgb and depth need different ones. Modalities stay plain tensors, not tv_tensors: v2 resizes a tv_tensors.Mask
    with plain NEAREST whatever interpolation it is given. Eval mode takes the central square of side min(H, W)
    and resizes it to `input_size` (the same as resizing the shorter side and centre cropping), without
    randomness.

    Args:
        input_size: Output side S in pixels.
        train: Random crop and flip when True; deterministic centre crop when False.
        scale: RandomResizedCrop area fraction range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: Probability of a horizontal flip (train mode only).
        semseg_stride: Class-id maps (semseg) are returned at S / semseg_stride (MultiMAE predicts semseg at
            stride 4).
        rgb_mean: Per-channel mean used to normalise rgb (the modalities marked `normalize`) in [0, 1].
        rgb_std: Per-channel standard deviation used to normalise rgb.

    Returns (from `__call__`):
        The modalities present in the input, in registry order: rgb float32 (3, S, S) normalised, depth float32
        (1, S, S) = raw / 2**16, semseg int64 (S / semseg_stride, S / semseg_stride).
    """

    def __init__(
        self,
        *,
        input_size: int,
        train: bool = True,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (0.75, 4 / 3),
        hflip: float = 0.5,
        semseg_stride: int = 4,
        rgb_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        rgb_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if input_size <= 0 or semseg_stride <= 0:
            raise ValueError(
                f"input_size and semseg_stride must be positive, got {input_size} and {semseg_stride}"
            )
        if input_size % semseg_stride:
            raise ValueError(f"input_size {input_size} is not divisible by semseg_stride {semseg_stride}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if len(rgb_mean) != 3 or len(rgb_std) != 3:
            raise ValueError("rgb_mean and rgb_std must have 3 values each")
        self.input_size = input_size
        self.train = train
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.semseg_stride = semseg_stride
        # Folding 1/255 into mean and std turns normalisation into one multiply-add on the uint8 values.
        std = torch.tensor(rgb_std, dtype=torch.float32).view(3, 1, 1)
        self._rgb_mul = 1.0 / (255.0 * std)
        self._rgb_add = -torch.tensor(rgb_mean, dtype=torch.float32).view(3, 1, 1) / std

    def _crop_box(self, reference: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the region that becomes the S×S output."""
        if self.train:
            return v2.RandomResizedCrop.get_params(reference, list(self.scale), list(self.ratio))
        height, width = reference.shape[-2:]
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Transforms one sample; see the class docstring for input and output formats."""
        tensors = _as_tensors(sample)
        if not tensors:
            return {}
        top, left, height, width = self._crop_box(next(iter(tensors.values())))
        flip = self.train and self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        size = [self.input_size, self.input_size]

        def crop(tensor: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
            return F.resized_crop(
                tensor, top, left, height, width, size, interpolation=interpolation, antialias=True
            )

        out: dict[str, torch.Tensor] = {}
        for name in [m for m in MODALITIES if m in tensors]:  # registry order, whatever the sample's order
            modality = MODALITIES[name]
            interpolation = InterpolationMode(modality.interpolation)
            tensor = crop(tensors[name], interpolation)
            if modality.normalize:
                tensor = tensor.to(torch.float32) * self._rgb_mul + self._rgb_add
            elif modality.class_ids:
                # Labels are cut from the same S×S crop, then reduced to the prediction stride (as in the reference).
                if self.semseg_stride != 1:
                    small = self.input_size // self.semseg_stride
                    tensor = F.resize(tensor, [small, small], interpolation=interpolation, antialias=False)
                tensor = tensor.squeeze(0).to(torch.int64)
            out[name] = tensor
        if flip:
            # Flipped last, so that a flipped sample is the exact mirror image of the unflipped one at every stride.
            out = {name: tensor.flip(-1) for name, tensor in out.items()}
        return out

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mode={mode}, scale={self.scale}, "
            f"ratio={self.ratio}, hflip={self.hflip}, semseg_stride={self.semseg_stride})"
        )
